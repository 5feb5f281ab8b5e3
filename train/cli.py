"""What every entry point does with a user's mistake (one line on stderr, exit code 2) and
where library messages go (:func:`setup_logging`)."""

from __future__ import annotations

import logging
import sys

from models.distributed import rank
from train.config import ConfigError

OUR_PACKAGES = ("train", "models", "data_pipelines")
"""Loggers whose progress messages (INFO) :func:`setup_logging` shows."""
EXIT_USAGE = 2
"""Bad configuration or input (the run did not start or stopped before training)."""


def user_error(err: ValueError) -> int:
    """Print ``err`` as ``config error: ...`` or ``error: ...``; returns :data:`EXIT_USAGE`."""
    prefix = "config error" if isinstance(err, ConfigError) else "error"
    print(f"{prefix}: {err}", file=sys.stderr)
    return EXIT_USAGE


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
