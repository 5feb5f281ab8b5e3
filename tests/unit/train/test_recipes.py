"""Recipes that extend others (``base = "..."``): deep merge, cycles, unknown bases, and the
recipes rewritten on a shared base resolve exactly as they did before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitssl.train.config import RECIPES_DIR, ConfigError, load_config, load_raw

SNAPSHOTS = Path(__file__).with_name("recipe_snapshots.json")


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def test_base_is_deep_merged_beneath_the_recipe(tmp_path: Path) -> None:
    _write(tmp_path, "a", 'x = 1\n[t]\nk = 1\nkeep = "a"\nlst = [1, 2]\n[only_a]\nv = 0\n')
    _write(tmp_path, "b", 'base = "a.toml"\n[t]\nk = 2\nlst = [3]\n')
    c = _write(tmp_path, "c", 'base = "b.toml"\ny = 5\n[t]\nnew = true\n')
    raw = load_raw(str(c), ["t.keep=over"])
    assert raw == {
        "x": 1,
        "y": 5,
        "t": {"k": 2, "keep": "over", "lst": [3], "new": True},
        "only_a": {"v": 0},
    }


def test_base_cycle_is_refused_with_one_line(tmp_path: Path) -> None:
    _write(tmp_path, "a", 'base = "b.toml"\n')
    _write(tmp_path, "b", 'base = "a.toml"\n')
    with pytest.raises(ConfigError) as e:
        load_raw(str(tmp_path / "a.toml"), [])
    assert "cycle: a -> b -> a" in str(e.value) and "\n" not in str(e.value)
    _write(tmp_path, "self", 'base = "self.toml"\n')
    with pytest.raises(ConfigError, match="cycle: self -> self"):
        load_raw(str(tmp_path / "self.toml"), [])


def test_unknown_or_bad_base_is_refused_with_one_line(tmp_path: Path) -> None:
    r = _write(tmp_path, "r", 'base = "no_such_recipe"\n')
    with pytest.raises(ConfigError) as e:
        load_raw(str(r), [])
    assert str(e.value) == "recipe r: base 'no_such_recipe' not found"
    r = _write(tmp_path, "r", "base = 3\n")
    with pytest.raises(ConfigError, match="base must be a recipe name or path"):
        load_raw(str(r), [])


def test_a_recipe_may_extend_a_shipped_recipe_by_name(tmp_path: Path) -> None:
    mine = _write(tmp_path, "mine", 'base = "mae_vit_tiny_demo"\n[train]\nsteps = 3\n')
    cfg, shipped = load_config(str(mine)), load_config("mae_vit_tiny_demo")
    assert cfg.train.steps == 3
    cfg.train.steps = shipped.train.steps
    assert cfg == shipped


@pytest.mark.parametrize("name", sorted(json.loads(SNAPSHOTS.read_text())))
def test_rewritten_recipes_resolve_as_before(name: str) -> None:
    """The resolved configs were saved before these recipes moved onto ``_vit_tiny_cifar``."""
    before = json.loads(SNAPSHOTS.read_text())[name]
    now = json.loads(json.dumps(load_config(name).to_dict()))
    # every value of the snapshot is unchanged (fields added since keep their defaults)
    assert {sec: {k: now[sec][k] for k in keys} for sec, keys in before.items()} == before
    assert "base" in (RECIPES_DIR / f"{name}.toml").read_text()
