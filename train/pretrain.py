"""``python -m vitssl.train.pretrain RECIPE [section.key=value ...]``: pretrain one model.

Launch it as is (one process), or under ``torchrun``, ``deepspeed --module`` or ``srun``.
Exit codes: 0 done, 2 bad configuration or input, 5 loss still non-finite after
``train.max_rollbacks`` rollbacks, 75 stopped by a signal after a checkpoint.
"""

from __future__ import annotations

import sys

from vitssl.train.cli import (
    EXIT_DIVERGED,
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
from vitssl.train.config import load_config
from vitssl.train.recipes import recipes_help

DESCRIPTION = (
    "Self-supervised pretraining (MAE, SimCLR, MoCo v3, BYOL, SimSiam, DINO) on DeepSpeed:\n"
    "a recipe plus dotted overrides; writes a run directory (config, TensorBoard, JSONL,\n"
    "checkpoints, exported encoder). One process, or under torchrun / deepspeed --module / srun."
)


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        "python -m vitssl.train.pretrain",
        DESCRIPTION,
        recipes_help("pretrain")
        + "\n\n"
        + exit_codes_help(EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_REQUEUE),
    )
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        with stdout_for(args.print_config):
            cfg = load_config(args.recipe, args.overrides)
            from vitssl.train.ds_config import build_ds_config

            build_ds_config(cfg, world_size=1)  # refuse a bad DeepSpeed config before any group
    except ValueError as e:  # ConfigError included
        return user_error(e)
    if args.print_config:
        return print_config(cfg)
    from vitssl.train.trainer import run

    try:
        return run(cfg)
    except ValueError as e:  # bad input found at start-up (missing shards, bad checkpoint)
        return user_error(e)


if __name__ == "__main__":
    sys.exit(main())
