"""``python -m train.pretrain RECIPE [section.key=value ...]``: pretrain one model.

Launch it as is (one process), or under ``torchrun``, ``deepspeed`` or ``srun``.
Exit codes: 0 done, 2 bad configuration or input, 3 loss still non-finite after
``train.max_rollbacks`` rollbacks, 75 stopped by a signal after a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import user_error
from train.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Self-supervised pretraining on DeepSpeed.")
    parser.add_argument("recipe", help="a recipe file, or a name in train/recipes/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-4")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        from train.ds_config import build_ds_config

        build_ds_config(cfg, world_size=1)  # refuse a bad DeepSpeed config before any group
    except ValueError as e:  # ConfigError included
        return user_error(e)
    from train.trainer import run

    try:
        return run(cfg)
    except ValueError as e:  # bad input found at start-up (missing shards, bad checkpoint)
        return user_error(e)


if __name__ == "__main__":
    sys.exit(main())
