"""``python -m vitssl.train.edge_export COMMAND RECIPE [section.key=value ...]``: INT8 edge export.

Commands:

* ``artefact``: FP32 ONNX + TorchScript, INT8 (ONNX Runtime), verification, and the
  self-describing folder (``train/recipes/export_*.toml``; see train.edge.run).
* ``pipeline``: pretrain -> evaluate -> distil -> export, with a final report and plots
  (``train/recipes/export_pipeline_*.toml``; see train.edge.pipeline).

Exit codes (vitssl.train.cli): 0 done, 2 bad configuration or input, 3 the INT8 model lost more than
``verify.max_drop`` points (unless ``--accept-drop``), 4 a pipeline stage failed (its
report.md says which and why), 75 a pipeline stage was stopped by a signal (run again).
"""

from __future__ import annotations

import sys

from vitssl.train.cli import (
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_STAGE,
    EXIT_USAGE,
    EXIT_VERIFY,
    exit_codes_help,
    print_config,
    recipe_parser,
    setup_logging,
    user_error,
)
from vitssl.train.recipes import recipes_help

DESCRIPTION = """INT8 quantization and edge export, one of two commands:
  artefact  an encoder (model.checkpoint: a run directory or exported encoder) to FP32 ONNX,
            INT8 ONNX (ONNX Runtime static QDQ), verified against PyTorch, with infer.py,
            MODEL_CARD.md and report.md in one folder
  pipeline  pretrain -> evaluate -> distil -> artefact in one command, with report.md"""


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        "python -m vitssl.train.edge_export",
        DESCRIPTION,
        recipes_help("export", "pipeline")
        + "\n"
        + exit_codes_help(EXIT_OK, EXIT_USAGE, EXIT_VERIFY, EXIT_STAGE, EXIT_REQUEUE),
        command={
            "choices": ("artefact", "pipeline"),
            "metavar": "COMMAND",
            "help": "artefact or pipeline",
        },
    )
    parser.add_argument(
        "--accept-failed",
        "--accept-drop",
        dest="accept_drop",
        action="store_true",
        help="exit 0 even when the INT8 verdict fails (too large a drop, a near-chance FP32"
        " model, too slow); the report still says FAILED and why",
    )
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        if args.command == "pipeline":
            from vitssl.train.edge.pipeline import check_recipes, load_pipeline_config, run_pipeline

            pcfg = load_pipeline_config(args.recipe, args.overrides)
            check_recipes(pcfg)
            if args.print_config:
                return print_config(pcfg)
            return run_pipeline(pcfg, accept_drop=args.accept_drop)
        from vitssl.train.edge.config import load_export_config
        from vitssl.train.edge.run import run_export

        ecfg = load_export_config(args.recipe, args.overrides)
        if args.print_config:
            return print_config(ecfg)
        report = run_export(ecfg)
    except ValueError as e:  # ConfigError included
        return user_error(e)
    if not report["passed"]:
        print(
            f"INT8 artefact {report['verdict']}"
            + (" (accepted by --accept-drop)" if args.accept_drop else ""),
            file=sys.stderr,
        )
        return EXIT_OK if args.accept_drop else EXIT_VERIFY
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
