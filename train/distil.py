"""``python -m train.distil RECIPE [section.key=value ...]``: distil a teacher into a student.

The same trainer as ``train.pretrain`` (``train.trainer.run``) with a ``distil_*`` recipe;
this entry point only registers the method, refuses other methods and checks that a
``method.cache`` matches the shards. Launch it as is, or under ``torchrun``, ``deepspeed``
or ``srun`` (slurm/distil.sbatch). Exit codes as train.pretrain: 0, 2, 75.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import setup_logging, user_error
from train.config import ConfigError, RunConfig, load_config


def check_distil(cfg: RunConfig) -> None:
    """Checks that need the data section: a cache must have been written for these shards."""
    if cfg.method.name != "distil":
        raise ConfigError(f"method.name={cfg.method.name!r}: train.distil runs distil recipes")
    cache = cfg.method.cache  # type: ignore[attr-defined]
    if cache:
        from data_pipelines.shard_index import expand_shards, read_index
        from models.methods.distil import check_cache

        index = read_index(expand_shards(cfg.data.train_shards), cfg.data.index or None)
        check_cache(
            cache,
            index.shards,
            index.counts,
            cfg.model.img_size,
            cfg.method.teacher_pool,  # type: ignore[attr-defined]
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Distillation into an edge student.")
    parser.add_argument("recipe", help="a distil recipe file, or a name in train/recipes/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.w_patch=1")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    import models.methods.distil  # noqa: F401  (registers the distil method)

    try:
        cfg = load_config(args.recipe, args.overrides)
        from train.ds_config import build_ds_config

        build_ds_config(cfg, world_size=1)
        check_distil(cfg)
    except ValueError as e:  # ConfigError included
        return user_error(e)
    from train.trainer import run

    try:
        return run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
