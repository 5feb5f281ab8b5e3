"""What every entry point does with a user's mistake: one line on stderr, exit code 2."""

from __future__ import annotations

import sys

from train.config import ConfigError

EXIT_USAGE = 2
"""Bad configuration or input (the run did not start or stopped before training)."""


def user_error(err: ValueError) -> int:
    """Print ``err`` as ``config error: ...`` or ``error: ...``; returns :data:`EXIT_USAGE`."""
    prefix = "config error" if isinstance(err, ConfigError) else "error"
    print(f"{prefix}: {err}", file=sys.stderr)
    return EXIT_USAGE
