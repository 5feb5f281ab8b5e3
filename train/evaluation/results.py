"""``<out>/<protocol>.json`` and ``<protocol>.md``: metrics, config, checkpoint and data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def _cell(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub table of dict rows (columns in first-seen order)."""
    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out_dir: Path,
    protocol: str,
    rows: list[dict[str, Any]],
    config: dict[str, Any],
    checkpoint: Any,
    data: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write both files (rank 0 only); ``rows`` are the table's lines (one per encoder/setting)."""
    from vitssl.train.checkpoint import code_version

    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "protocol": protocol,
        "results": rows,
        "checkpoint": checkpoint,
        "data": data,
        "config": config,
        "code_version": code_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        **(extra or {}),
    }
    path = out_dir / f"{protocol}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    md = [
        f"# {protocol}",
        "",
        markdown_table(rows),
        "",
        f"- checkpoint: `{json.dumps(checkpoint, default=str)}`",
        f"- data: `{json.dumps(data, default=str)}`",
        f"- code version: `{record['code_version']}`",
        "",
        "## config",
        "",
        "```json",
        json.dumps(config, indent=2, default=str),
        "```",
        "",
    ]
    (out_dir / f"{protocol}.md").write_text("\n".join(md))
    return path
