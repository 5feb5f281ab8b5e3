"""What every entry point shares: exit codes, one-line user errors, ``--print-config``.

Exit codes mean one thing each, in every command: :data:`EXIT_CODES` (the README's table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from typing import Any

from vitssl.models.distributed import rank
from vitssl.train.config import ConfigError

OUR_PACKAGES = ("vitssl",)
"""Loggers whose progress messages (INFO) :func:`setup_logging` shows."""
EXIT_OK = 0
"""Done."""
EXIT_USAGE = 2
"""Bad configuration or input (the run did not start or stopped before training)."""
EXIT_VERIFY = 3
"""A result failed its verification (INT8 lost more than ``verify.max_drop``)."""
EXIT_STAGE = 4
"""A stage of ``train.edge_export pipeline`` failed; its report names the stage and why."""
EXIT_DIVERGED = 5
"""Training stopped: loss or gradient norm still non-finite after ``train.max_rollbacks``."""
EXIT_REQUEUE = 75
"""Stopped by a signal (or ``train.stop_at``) after a checkpoint: run it again to resume."""

EXIT_CODES = {
    EXIT_OK: "done",
    1: "an unexpected error (a bug: a traceback is printed)",
    EXIT_USAGE: "bad configuration or input, reported on one line",
    EXIT_VERIFY: "a result failed its verification (INT8 accuracy drop > verify.max_drop)",
    EXIT_STAGE: "a stage of the pipeline failed (report.md names it and why)",
    EXIT_DIVERGED: "training diverged: non-finite loss after train.max_rollbacks rollbacks",
    EXIT_REQUEUE: "stopped by a signal after a checkpoint; run again to resume",
}


def exit_codes_help(*codes: int) -> str:
    """An argparse epilog paragraph listing ``codes``."""
    return "exit codes: " + "; ".join(f"{c} {EXIT_CODES[c]}" for c in codes) + ".\n"


def user_error(err: ValueError) -> int:
    """Print ``err`` as ``config error: ...`` or ``error: ...``; returns :data:`EXIT_USAGE`."""
    prefix = "config error" if isinstance(err, ConfigError) else "error"
    print(f"{prefix}: {err}", file=sys.stderr)
    return EXIT_USAGE


def recipe_parser(
    prog: str, description: str, epilog: str, command: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """The parser of a recipe-driven command: [COMMAND] RECIPE, overrides, ``--print-config``.

    ``command``: keyword arguments of a positional that comes before the recipe.
    Parse with ``parse_intermixed_args`` so that options may follow the overrides.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command is not None:
        parser.add_argument("command", **command)
    parser.add_argument("recipe", help="a recipe name (listed below) or a path to a .toml file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (TOML) and exit",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def stdout_for(print_config: bool) -> contextlib.AbstractContextManager[Any]:
    """With ``--print-config``, send what libraries print while the config is checked (DeepSpeed
    logs on stdout) to stderr, so that stdout holds nothing but the TOML."""
    return contextlib.redirect_stdout(sys.stderr) if print_config else contextlib.nullcontext()


def _plain(value: Any) -> Any:
    """TOML has no null: drop ``None`` values (a field left at "unset")."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_toml(cfg: Any) -> str:
    """A config dataclass as TOML, top-level scalars before the tables."""
    import tomli_w

    raw = _plain(dataclasses.asdict(cfg))
    scalars = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    return tomli_w.dumps({**scalars, **tables})


def print_config(cfg: Any) -> int:
    """``--print-config``: the resolved configuration on stdout; returns :data:`EXIT_OK`."""
    sys.stdout.write(config_toml(cfg))
    return EXIT_OK


class _RankZeroInfo(logging.Filter):
    """Progress messages from rank 0 only; warnings and errors from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or rank() == 0


def setup_logging() -> None:
    """Library code logs through ``logging.getLogger(__name__)``; an entry point calls this
    once to show those messages on stdout, one plain line each. A no-op when the root
    logger already has handlers (an application or pytest configured it)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_RankZeroInfo())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors only
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)
