"""Layers point one way: models/ and data_pipelines/ never import train/ (see STYLE.md)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOWER = ("models", "data_pipelines")

# Function-local imports of train/ left in lower layers: only the data benchmark's MAE
# section (an entry point that builds the run config's model section).
KNOWN_LOCAL_IMPORTS = {
    "data_pipelines/benchmark.py",  # a GPU benchmark entry point that builds a ModelSection
}


def test_importing_every_model_and_pipeline_module_loads_no_train_module() -> None:
    """In a fresh interpreter: import every module of models/ (all methods registered) and
    data_pipelines/, then look for train or train.* in sys.modules."""
    code = """
import importlib, json, pkgutil, sys
import vitssl.models as models, vitssl.models.methods, vitssl.data_pipelines as data_pipelines
from vitssl.models.registry import create_method, method_config_class
names = []
for pkg in (models, data_pipelines):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
method_config_class("mae")  # fills the registry
loaded = sorted(n for n in sys.modules if n.startswith(("train", "vitssl.train")))
print(json.dumps({"imported": names, "train": loaded}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    methods = {n for n in out["imported"] if n.startswith("vitssl.models.methods.")}
    assert {
        "vitssl.models.methods.mae",
        "vitssl.models.methods.dino",
        "vitssl.models.methods.qat",
    } <= methods
    assert out["train"] == []


def _absolute_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _train_imports(path: Path) -> list[int]:
    """Line numbers of every ``import train...`` / ``from train... import`` in the file."""
    return sorted(
        {
            line
            for line, n in _absolute_imports(path)
            if n in ("train", "vitssl.train") or n.startswith(("train.", "vitssl.train."))
        }
    )


def test_no_new_imports_of_train_in_lower_layers() -> None:
    """Also function-local imports, which the import test above cannot see."""
    found = {
        str(p.relative_to(ROOT)): lines
        for layer in LOWER
        for p in sorted((ROOT / layer).rglob("*.py"))
        if (lines := _train_imports(p))
    }
    assert set(found) <= KNOWN_LOCAL_IMPORTS, {
        k: v for k, v in found.items() if k not in KNOWN_LOCAL_IMPORTS
    }


def test_the_scan_sees_function_local_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from train.config import X\n    import train\n")
    assert _train_imports(src) == [4, 5]


def _long_functions(root: Path, limit: int) -> list[str]:
    """Functions (methods included) of the production packages longer than ``limit`` lines."""
    found = []
    for package in ("train", "models", "data_pipelines", "slurm"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    assert node.end_lineno is not None
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return found


def test_no_production_function_exceeds_100_lines() -> None:
    """Issue 19's rule: a function a reader cannot hold in view is split (entry points ~100)."""
    assert _long_functions(ROOT, 100) == []


def test_the_length_scan_counts_lines(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "long.py").write_text(
        f"def long():\n{body}\n\n\ndef short():\n    pass\n"
    )
    assert _long_functions(tmp_path, 100) == ["train/long.py:1 long"]


BARE = ("train", "models", "data_pipelines", "slurm")


def _bare_imports(path: Path) -> list[int]:
    """Line numbers of absolute imports of a folder by its bare name (``train.x``, ...)."""
    return sorted({line for line, n in _absolute_imports(path) if n.split(".")[0] in BARE})


def test_everything_imports_through_the_vitssl_name() -> None:
    """A bare ``import train`` beside ``vitssl.train`` would load every module twice (two
    registries, two config classes) and is what a user's own train.py shadows."""
    found = {
        str(p.relative_to(ROOT)): lines
        for folder in (*BARE, "tests")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (lines := _bare_imports(p))
    }
    assert found == {}
    src = ROOT / "vitssl"
    assert {p.name for p in src.iterdir() if p.is_symlink()} == {*BARE, "ds_configs"}
    assert all((src / name).resolve() == ROOT / name for name in (*BARE, "ds_configs"))
