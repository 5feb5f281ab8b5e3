"""``python -m vitssl.train.cache_teacher RECIPE [key=value ...]``: cache teacher embeddings.

For a distillation recipe (``method.name = "distil"``), runs the frozen teacher
(``method.teacher``) once over every sample of ``data.train_shards`` on the deterministic
``eval`` view (resize to ``img_size / 0.875``, centre crop) and writes ``method.cache``:

* ``teacher.npy``: ``(N, D)`` pooled embeddings (``method.teacher_pool``), row ``i`` = the
  sample with the loader's ``sample_id == i`` (its position in the shard index);
* ``logits.npy``: ``(N, C)`` when the teacher has a classification head;
* ``meta.json``: teacher, its weights' SHA-256, pooling, img_size, shard names and counts.

The shards themselves are not copied: training with ``method.cache`` reads the images from
the same shards and the embeddings from the cache by ``sample_id``. Launch it as is or under
``torchrun`` (ranks split the samples); bf16 autocast on GPU, float32 on CPU.
Exit codes: 0 done, 2 bad configuration or input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vitssl.train.cli import (
    EXIT_OK,
    EXIT_USAGE,
    exit_codes_help,
    print_config,
    recipe_parser,
    setup_logging,
    user_error,
)
from vitssl.train.config import ConfigError, RunConfig, load_config
from vitssl.train.recipes import recipes_help

DTYPES = {"float16": np.float16, "float32": np.float32}


def cache_teacher(cfg: RunConfig, batch_size: int, num_workers: int, dtype: str) -> Path:
    """Write the cache of ``cfg.method`` (see the module docstring); collective over ranks."""
    from vitssl.data_pipelines.labelled import OrderedBatches, open_source, rank_range
    from vitssl.models import distributed
    from vitssl.models.methods.distil import CACHE_FEATURES, CACHE_LOGITS, CACHE_META
    from vitssl.train.evaluation.features import gather_ordered
    from vitssl.train.evaluation.protocols import init_eval_distributed
    from vitssl.train.weights import load_teacher

    method = cfg.method
    device = init_eval_distributed()
    rank, size = distributed.rank(), distributed.world_size()
    teacher = load_teacher(method.teacher, method.teacher_pool)  # type: ignore[attr-defined]
    teacher.to(device)
    source = open_source(cfg.data.train_shards, cfg.data.index or None)
    n = source.num_samples
    start, stop = rank_range(n, rank, size)
    data = OrderedBatches(
        source, start, stop, cfg.model.img_size, batch_size, labels=False, blank_unreadable=True
    )
    batches = DataLoader(data, batch_size=None, num_workers=num_workers) if num_workers else data
    embs, logits, ids, bad = [], [], [], 0
    for batch in batches:
        x = batch["image"].to(device)
        # bf16 on GPU, as the online teacher of a bf16 run computes (models.ema's policy)
        out = teacher(x.bfloat16() if device.type == "cuda" else x)
        embs.append(out.embedding.cpu())
        if out.logits is not None:
            logits.append(out.logits.cpu())
        ids.append(batch["index"])
        bad += int((~batch["ok"]).sum())
    comm = device if device.type == "cuda" else torch.device("cpu")

    def gathered(parts: list[torch.Tensor], width: int) -> torch.Tensor:
        local = torch.cat(parts) if parts else torch.zeros(0, width)
        local_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        return gather_ordered(local.to(comm), local_ids.to(comm), n)

    feats = gathered(embs, teacher.dim)
    all_logits = gathered(logits, teacher.num_classes) if teacher.num_classes else None
    bad_total = torch.tensor([bad], device=comm)
    if size > 1:
        torch.distributed.all_reduce(bad_total)
    out_dir = Path(method.cache)  # type: ignore[attr-defined]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / CACHE_FEATURES, feats.numpy().astype(DTYPES[dtype]))
        if all_logits is not None:
            np.save(out_dir / CACHE_LOGITS, all_logits.numpy().astype(DTYPES[dtype]))
        meta = {
            "teacher": teacher.source,
            "teacher_sha256": teacher.sha256().hex(),
            "pool": teacher.pool,
            "img_size": cfg.model.img_size,
            "view": "eval",
            "shards": [Path(s).name for s in source.shards],
            "counts": list(source.counts),
            "num_samples": n,
            "dim": teacher.dim,
            "num_classes": teacher.num_classes,
            "dtype": dtype,
            "unreadable_samples": int(bad_total.item()),
        }
        (out_dir / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n")
    if size > 1:
        torch.distributed.barrier()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        "python -m vitssl.train.cache_teacher",
        "Cache a distillation teacher's embeddings once (method.cache: the output folder,\n"
        "beside the shards), for cheap repeated student runs of the same distil recipe.",
        recipes_help("distil") + "\n" + exit_codes_help(EXIT_OK, EXIT_USAGE),
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    import vitssl.models.methods.distil  # noqa: F401  (registers the distil method)

    try:
        cfg = load_config(args.recipe, args.overrides)
        if cfg.method.name != "distil":
            raise ConfigError(f"method.name={cfg.method.name!r}: a distil recipe is needed")
        if not cfg.method.cache or not cfg.method.teacher:  # type: ignore[attr-defined]
            raise ConfigError("set method.teacher and method.cache (the output directory)")
        if args.print_config:
            return print_config(cfg)
        print(cache_teacher(cfg, args.batch_size, args.num_workers, args.dtype), flush=True)
    except ValueError as e:  # ConfigError included
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
