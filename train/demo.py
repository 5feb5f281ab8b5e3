"""``make demo``: MAE pretraining on the embedded default data, then where everything is.

Runs the ``mae_vit_tiny_demo`` recipe with DeepSpeed in this process (the GPU when there
is one, else the CPU with gloo). On a CPU without native bf16 the demo trains in fp32,
which is several times faster there; extra arguments are passed on as overrides.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vitssl.train.cli import EXIT_OK, EXIT_REQUEUE, EXIT_USAGE, exit_codes_help, user_error
from vitssl.train.config import load_config

DATA = Path("data/default")


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitssl.train.demo",
        description=(
            "The demo: writes the embedded default data set to data/default/ when missing, then\n"
            "pretrains the mae_vit_tiny_demo recipe (ViT-tiny MAE, 32 px) in this process and\n"
            "prints where the logs, checkpoints and exported encoder are."
        ),
        epilog=exit_codes_help(EXIT_OK, EXIT_USAGE, EXIT_REQUEUE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    overrides = list(parser.parse_args(argv).overrides)
    import torch

    from vitssl.data_pipelines.synthetic import write_default_dataset

    if not (DATA / "train" / "index.json").is_file():
        write_default_dataset(DATA)
    if not torch.cuda.is_available() and not cpu_has_native_bf16():
        overrides.insert(0, "train.precision=fp32")
    try:
        cfg = load_config("mae_vit_tiny_demo", overrides)
    except ValueError as e:  # ConfigError included
        return user_error(e)
    from vitssl.train.trainer import run

    t0 = time.time()
    code = run(cfg)
    minutes = (time.time() - t0) / 60
    run_dir = Path(cfg.train.output_dir)
    print(f"\nMAE demo finished in {minutes:.1f} min ({cfg.train.precision}, exit code {code})")
    print(f"  TensorBoard logs : {run_dir / 'tb'}   (tensorboard --logdir {run_dir / 'tb'})")
    print(f"  metrics (JSONL)  : {run_dir / 'metrics.jsonl'}")
    print(f"  checkpoints      : {run_dir / 'checkpoints'}")
    print(f"  exported encoder : {run_dir / 'export' / 'encoder.safetensors'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
