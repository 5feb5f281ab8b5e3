"""``python -m tests.integration.methods_probe SPEC.json``: several trainer runs, one start-up.

Each rank reads a list of ``{"recipe": ..., "overrides": [...]}`` and calls
``vitssl.train.trainer.run`` for each in turn inside one process group, so that the smoke runs of
every method pay for DeepSpeed's start-up once. Prints ``RUN <i> EXIT <code>`` per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vitssl.train.config import load_config
from vitssl.train.trainer import run


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    worst = 0
    for i, item in enumerate(spec):
        code = run(load_config(item["recipe"], item["overrides"]))
        print(f"RUN {i} EXIT {code}", flush=True)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main())
