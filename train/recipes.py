"""``python -m vitssl.train.recipes [STAGE]``: every recipe in ``train/recipes/``, by stage.

A recipe's one-line description is the first comment line of its file. Its stage follows
from its name's prefix (``eval_`` -> evaluate, ``finetune_`` -> evaluate finetune,
``distil_`` -> distil, ``export_pipeline_`` -> export pipeline, ``export_`` -> export
artefact, anything else -> pretrain), the convention every recipe here follows. Names
starting with ``_`` are partial recipes that others extend (``base = "_name"``); they are
not listed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from vitssl.train.config import RECIPES_DIR

STAGES = {
    "pretrain": "python -m vitssl.train.pretrain RECIPE",
    "evaluate": "python -m vitssl.train.evaluate {knn,linear,label-efficiency,pictures} RECIPE",
    "finetune": "python -m vitssl.train.evaluate finetune RECIPE",
    "distil": "python -m vitssl.train.distil RECIPE",
    "export": "python -m vitssl.train.edge_export artefact RECIPE",
    "pipeline": "python -m vitssl.train.edge_export pipeline RECIPE",
}
"""Each stage and the command that runs its recipes."""

_PREFIXES = (
    ("eval_", "evaluate"),
    ("finetune_", "finetune"),
    ("distil_", "distil"),
    ("export_pipeline_", "pipeline"),
    ("export_", "export"),
)


@dataclass(frozen=True)
class Recipe:
    name: str
    stage: str
    description: str
    path: Path


def stage_of(name: str) -> str:
    for prefix, stage in _PREFIXES:
        if name.startswith(prefix):
            return stage
    return "pretrain"


def describe(path: Path) -> str:
    """The first comment line of a recipe file (``""`` when it has none)."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            return ""
    return ""


def list_recipes(stage: str | None = None, recipes_dir: Path = RECIPES_DIR) -> list[Recipe]:
    found = [
        Recipe(p.stem, stage_of(p.stem), describe(p), p) for p in sorted(recipes_dir.glob("*.toml"))
    ]
    return [r for r in found if stage is None or r.stage == stage]


def recipes_help(*stages: str) -> str:
    """An argparse epilog: the recipes of ``stages``, one line each."""
    lines = []
    for stage in stages:
        lines.append(f"recipes ({STAGES[stage]}):")
        for r in list_recipes(stage):
            lines.append(f"  {r.name:34s} {r.description}")
        lines.append("")
    lines.append('A recipe is a name above or a path to a .toml file; `base = "NAME"` extends one.')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitssl.train.recipes",
        description="List every recipe in train/recipes/ by stage, with its one-line description.",
    )
    parser.add_argument("stage", nargs="?", choices=tuple(STAGES), help="only this stage")
    args = parser.parse_args(argv)
    for stage in [args.stage] if args.stage else list(STAGES):
        print(f"{stage}: {STAGES[stage]}")
        for r in list_recipes(stage):
            print(f"  {r.name:34s} {r.description}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
