"""``python -m vitssl.train.evaluate PROTOCOL RECIPE [section.key=value ...]``: evaluate an encoder.

PROTOCOL is one of knn, linear, label-efficiency, pictures (a frozen encoder, recipe
``train/recipes/eval_*.toml``) or finetune (a training run, recipe ``finetune_*.toml``).
Launch it as is, or under ``torchrun`` / ``srun`` to split the work over ranks.
Exit codes: 0 done, 2 bad configuration or input.
"""

from __future__ import annotations

import sys

from vitssl.train.cli import (
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_USAGE,
    exit_codes_help,
    print_config,
    recipe_parser,
    setup_logging,
    stdout_for,
    user_error,
)
from vitssl.train.recipes import recipes_help

PROTOCOLS = ("knn", "linear", "finetune", "label-efficiency", "pictures")
DESCRIPTION = """Evaluate a pretrained encoder (a run directory, a checkpoint, an exported
encoder.safetensors or random:<timm name>) with one protocol:
  knn               weighted and majority k-NN on frozen features, top-1/5
  linear            linear probes on frozen features, several learning rates at once
  label-efficiency  k-NN and linear at 1 % / 10 % / 100 % labels, pretrained vs random
  pictures          t-SNE, MAE reconstructions, k-NN neighbours
  finetune          full fine-tuning on the DeepSpeed trainer (finetune_* recipes)
Results go to <output_dir>/<protocol>.json and .md."""


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        "python -m vitssl.train.evaluate",
        DESCRIPTION,
        recipes_help("evaluate", "finetune")
        + "\n\n"
        + exit_codes_help(EXIT_OK, EXIT_USAGE, EXIT_REQUEUE),
        command={
            "choices": PROTOCOLS,
            "metavar": "PROTOCOL",
            "help": "one of " + ", ".join(PROTOCOLS),
        },
    )
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    with stdout_for(args.print_config):
        import vitssl.models.methods.finetune  # noqa: F401  (registers the finetune method)
        from vitssl.train.evaluation import protocols

    try:
        if args.command == "finetune":
            from vitssl.train.config import load_config

            with stdout_for(args.print_config):
                cfg = load_config(args.recipe, args.overrides)
            if args.print_config:  # the configuration, before its data and checkpoint are checked
                return print_config(cfg)
            protocols.check_finetune(cfg)
            return protocols.run_finetune(cfg)
        from vitssl.train.evaluation.config import load_eval_config

        eval_cfg = load_eval_config(args.recipe, args.overrides)
        if args.print_config:
            return print_config(eval_cfg)
        run = {
            "knn": protocols.run_knn,
            "linear": protocols.run_linear,
            "label-efficiency": protocols.run_label_efficiency,
            "pictures": protocols.run_pictures,
        }[args.command]
        run(eval_cfg)
    except ValueError as e:  # ConfigError included
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
