"""``python -m train.evaluate PROTOCOL RECIPE [section.key=value ...]``: evaluate an encoder.

PROTOCOL is one of knn, linear, label-efficiency, pictures (a frozen encoder, recipe
``train/recipes/eval_*.toml``) or finetune (a training run, recipe ``finetune_*.toml``).
Launch it as is, or under ``torchrun`` / ``srun`` to split the work over ranks.
Exit codes: 0 done, 2 bad configuration or input.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import setup_logging, user_error

PROTOCOLS = ("knn", "linear", "finetune", "label-efficiency", "pictures")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a pretrained encoder.")
    parser.add_argument("protocol", choices=PROTOCOLS)
    parser.add_argument("recipe", help="a recipe file, or a name in train/recipes/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. knn.k=10")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    import models.methods.finetune  # noqa: F401  (registers the finetune method)
    from train.evaluation import protocols

    try:
        if args.protocol == "finetune":
            from train.config import load_config

            cfg = load_config(args.recipe, args.overrides)
            protocols.check_finetune(cfg)
            return protocols.run_finetune(cfg)
        from train.evaluation.config import load_eval_config

        eval_cfg = load_eval_config(args.recipe, args.overrides)
        run = {
            "knn": protocols.run_knn,
            "linear": protocols.run_linear,
            "label-efficiency": protocols.run_label_efficiency,
            "pictures": protocols.run_pictures,
        }[args.protocol]
        run(eval_cfg)
    except ValueError as e:  # ConfigError included
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
