"""``python -m tests.integration.elastic_probe CHECKPOINT``: load it at world size 1, compare.

Builds the method from the checkpoint's saved config in one process, loads the checkpoint
through the trainer's elastic path (universal checkpoint), and prints the largest absolute
difference between the loaded weights and DeepSpeed's independent ``zero_to_fp32``
consolidation of the original partitions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vitssl.models.registry import create_method
from vitssl.train.checkpoint import load_checkpoint, read_meta
from vitssl.train.config import config_from_dict
from vitssl.train.engine import build_engine
from vitssl.train.trainer import init_distributed
from vitssl.train.weights import consolidated_state_dict


def main() -> None:
    ckpt = Path(sys.argv[1])
    rank, world, device = init_distributed()
    cfg = config_from_dict(read_meta(ckpt)["config"])
    method = create_method(cfg.method, cfg.model)
    engine = build_engine(cfg, method, world, device, resume_path=ckpt).engine  # universal
    load_checkpoint(engine, ckpt, rank, world)
    expected = consolidated_state_dict(ckpt)
    loaded = engine.module.state_dict()
    diff = max(float((loaded[k].float() - v).abs().max()) for k, v in expected.items())
    moved = max(
        float((loaded[k].float() - v).abs().max())
        for k, v in create_method(cfg.method, cfg.model).state_dict().items()
        if k in expected
    )
    step = int(engine.optimizer.state_dict()["base_optimizer_state"]["state"][0]["step"])
    print(f"ELASTIC max_abs_diff={diff} moved_from_init={moved} adam_step={step}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
