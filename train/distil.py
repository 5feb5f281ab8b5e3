"""``python -m vitssl.train.distil RECIPE [key=value ...]``: distil a teacher into a student.

The same trainer as ``vitssl.train.pretrain`` (``train.trainer.run``) with a ``distil_*`` recipe;
this entry point only registers the method, refuses other methods and checks that a
``method.cache`` matches the shards. Launch it as is, or under ``torchrun``, ``deepspeed``
or ``srun`` (slurm/distil.sbatch). Exit codes as train.pretrain: 0, 2, 75.
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
from vitssl.train.config import ConfigError, RunConfig, load_config
from vitssl.train.recipes import recipes_help

DESCRIPTION = (
    "Distil a frozen pretrained teacher (method.teacher: a run directory or an exported\n"
    "encoder) into an edge student (a timm CNN, MobileNetV3 by default) on the pretraining\n"
    "trainer. One process, or under torchrun / deepspeed --module / srun."
)


def check_distil(cfg: RunConfig) -> None:
    """Checks that need the data section: a cache must have been written for these shards."""
    if cfg.method.name != "distil":
        raise ConfigError(f"method.name={cfg.method.name!r}: train.distil runs distil recipes")
    cache = cfg.method.cache  # type: ignore[attr-defined]
    if cache:
        from vitssl.data_pipelines.shard_index import expand_shards, read_index
        from vitssl.models.methods.distil import check_cache

        index = read_index(expand_shards(cfg.data.train_shards), cfg.data.index or None)
        check_cache(
            cache,
            index.shards,
            index.counts,
            cfg.model.img_size,
            cfg.method.teacher_pool,  # type: ignore[attr-defined]
        )


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        "python -m vitssl.train.distil",
        DESCRIPTION,
        recipes_help("distil") + "\n" + exit_codes_help(EXIT_OK, EXIT_USAGE, EXIT_REQUEUE),
    )
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    import vitssl.models.methods.distil  # noqa: F401  (registers the distil method)

    try:
        with stdout_for(args.print_config):
            cfg = load_config(args.recipe, args.overrides)
            from vitssl.train.ds_config import build_ds_config

            build_ds_config(cfg, world_size=1)
            check_distil(cfg)
    except ValueError as e:  # ConfigError included
        return user_error(e)
    if args.print_config:
        return print_config(cfg)
    from vitssl.train.trainer import run

    try:
        return run(cfg)
    except ValueError as e:
        return user_error(e)


if __name__ == "__main__":
    sys.exit(main())
