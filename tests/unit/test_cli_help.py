"""Every entry point answers ``--help`` with what it does and its recipes, without side effects."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch.distributed as dist

from vitssl.train.config import RECIPES_DIR, config_from_dict, load_config
from vitssl.train.recipes import describe, list_recipes

# module -> (words its help must contain, recipe stages it must list)
ENTRY_POINTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vitssl.train.pretrain": (("pretraining", "DeepSpeed", "exit codes"), ("pretrain",)),
    "vitssl.train.evaluate": (
        ("k-NN", "linear", "finetune", "exit codes"),
        ("evaluate", "finetune"),
    ),
    "vitssl.train.distil": (("teacher", "student", "exit codes"), ("distil",)),
    "vitssl.train.edge_export": (
        ("INT8", "pipeline", "artefact", "exit codes"),
        ("export", "pipeline"),
    ),
    "vitssl.train.cache_teacher": (("teacher", "cache"), ("distil",)),
    "vitssl.train.export_encoder": (("safetensors",), ()),
    "vitssl.train.demo": (("mae_vit_tiny_demo", "data/default", "exit codes"), ()),
    "vitssl.train.memory": (("memory", "ZeRO"), ()),
    "vitssl.train.benchmark": (("MFU", "images/s"), ()),
    "vitssl.train.distil_report": (("k-NN", "latency"), ()),
    "vitssl.train.recipes": (("recipe", "stage"), ()),
    "vitssl.data_pipelines.make_shards": (("shards", "--verify-only"), ()),
    "vitssl.data_pipelines.synthetic": (("shapes", "--out"), ()),
    "vitssl.data_pipelines.benchmark": (("images", "baseline"), ()),
    "vitssl.slurm.submit": (("sbatch", "--dry-run", "vitssl.train.recipes"), ()),
}


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_describes_and_lists_recipes_without_side_effects(
    module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory lands here
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    words, stages = ENTRY_POINTS[module]
    for word in words:
        assert word in out, f"{module} --help does not mention {word!r}"
    for stage in stages:
        recipes = list_recipes(stage)
        assert recipes, stage
        for r in recipes:
            assert f"{r.name} " in out and r.description in out, (module, r.name)
    assert list(tmp_path.iterdir()) == [], f"{module} --help wrote files"
    assert not dist.is_initialized(), f"{module} --help started a process group"


def test_every_recipe_has_a_one_line_description() -> None:
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    listed = list_recipes()
    assert [r.name for r in listed] == names
    for r in listed:
        first = r.path.read_text().splitlines()[0]
        assert first.startswith("# ") and describe(r.path) == first[2:].strip(), r.name
        assert r.description.endswith("."), f"{r.name}: {r.description!r} is not a sentence"


def test_recipes_command_lists_every_recipe_under_its_stage(capsys: pytest.CaptureFixture) -> None:
    from vitssl.train.recipes import main

    assert main([]) == 0
    out = capsys.readouterr().out
    stage = ""
    seen: dict[str, str] = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            stage = line.split(":")[0]
        elif line.strip():
            seen[line.split()[0]] = stage
    expected = {p.stem: p.stem.split("_")[0] for p in RECIPES_DIR.glob("*.toml")}
    prefix_stage = {"eval": "evaluate", "finetune": "finetune", "distil": "distil"}
    for name in expected:
        want = prefix_stage.get(expected[name], "pretrain")
        if name.startswith("export_pipeline_"):
            want = "pipeline"
        elif name.startswith("export_"):
            want = "export"
        assert seen.get(name) == want, (name, seen.get(name), want)


def test_print_config_prints_the_resolved_config_and_exits(tmp_path: Path) -> None:
    """As a user runs it: stdout is the TOML alone (DeepSpeed's log lines go to stderr)."""
    overrides = ["train.steps=7", "optim.betas=[0.8, 0.9]", "data.train_shards=somewhere"]
    cmd = [sys.executable, "-m", "vitssl.train.pretrain", "mae_vit_tiny_demo", "--print-config"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [*cmd, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    printed = tomllib.loads(proc.stdout)
    assert config_from_dict(printed) == load_config("mae_vit_tiny_demo", overrides)
    assert printed["train"]["steps"] == 7 and printed["optim"]["betas"] == [0.8, 0.9]
    assert list(tmp_path.iterdir()) == []  # no run directory made


@pytest.mark.parametrize(
    ("module", "args", "key"),
    [
        ("vitssl.train.evaluate", ["knn", "eval_default", "knn.k=7"], ("knn", "k")),
        ("vitssl.train.evaluate", ["finetune", "finetune_vit_tiny_default", "train.steps=3"], None),
        ("vitssl.train.edge_export", ["artefact", "export_default", "opset=17"], ("opset",)),
        (
            "vitssl.train.edge_export",
            ["pipeline", "export_pipeline_demo", "distil.enabled=false"],
            None,
        ),
    ],
)
def test_print_config_of_other_commands(
    module: str,
    args: list[str],
    key: tuple[str, ...] | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    assert main([*args, "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    value = args[-1].split("=")[1]
    node: object = printed
    for part in key or args[-1].split("=")[0].split("."):
        node = node[part]  # type: ignore[index]
    assert str(node).lower() == value
    assert list(tmp_path.iterdir()) == []


def test_print_config_refuses_a_bad_override_with_one_line(capsys: pytest.CaptureFixture) -> None:
    from vitssl.train.pretrain import main

    assert main(["mae_vit_tiny_demo", "--print-config", "optim.lr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: unknown key optim.lr")
