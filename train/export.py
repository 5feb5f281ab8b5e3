"""``python -m train.export COMMAND RECIPE [section.key=value ...]``: INT8 edge export.

Commands:

* ``artefact``: FP32 ONNX + TorchScript, INT8 (ONNX Runtime), verification, and the
  self-describing folder (``train/recipes/export_*.toml``; see train.edge.run).
* ``pipeline``: pretrain -> evaluate -> distil -> export, with a final report and plots
  (``train/recipes/export_pipeline_*.toml``; see train.edge.pipeline).

Exit codes: 0 done, 2 bad configuration or input, 3 the INT8 model lost more than
``verify.max_drop`` points (unless ``--accept-drop``), other: a failed stage.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="INT8 quantization and edge export.")
    parser.add_argument("command", choices=("artefact", "pipeline"))
    parser.add_argument("recipe", help="a recipe file, or a name in train/recipes/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. quant.format=qdq")
    parser.add_argument(
        "--accept-drop",
        action="store_true",
        help="exit 0 even when INT8 loses more than verify.max_drop",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "pipeline":
            from train.edge.pipeline import load_pipeline_config, run_pipeline

            return run_pipeline(
                load_pipeline_config(args.recipe, args.overrides), accept_drop=args.accept_drop
            )
        from train.edge.config import load_export_config
        from train.edge.run import EXIT_DROP, run_export

        report = run_export(load_export_config(args.recipe, args.overrides))
    except ValueError as e:  # ConfigError included
        return user_error(e)
    if not report["passed"]:
        print(
            f"INT8 artefact {report['verdict']}"
            + (" (accepted by --accept-drop)" if args.accept_drop else ""),
            file=sys.stderr,
        )
        return 0 if args.accept_drop else EXIT_DROP
    return 0


if __name__ == "__main__":
    sys.exit(main())
