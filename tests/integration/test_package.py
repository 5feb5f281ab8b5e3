"""The wheel installs like a package: console scripts, presets and Slurm templates found from
outside the checkout, and a user's own ``train.py`` or ``models.py`` in the working directory
neither shadows nor is shadowed: everything is imported as ``vitssl.*``. (The wheel's Slurm
templates run a real job from a user's folder in tests/integration/test_slurm.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.wheel import install_wheel
from tests.integration.wheel import run as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_wheel(tmp_path_factory.mktemp("pkg"))


def test_console_scripts_and_resources_from_outside_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    # a user's project folder with its own train.py and models.py next to the data
    (tmp_path / "train.py").write_text("raise SystemExit('user train.py was imported')\n")
    (tmp_path / "models.py").write_text("raise SystemExit('user models.py was imported')\n")
    bin_dir = installed / "bin"
    for script in ("vitssl-pretrain", "vitssl-make-shards", "vitssl-submit", "vitssl-export"):
        proc = _run([str(bin_dir / script), "--help"], cwd=tmp_path)
        assert proc.returncode == 0, (script, proc.stdout[-1000:], proc.stderr[-2000:])
        assert "usage:" in proc.stdout.lower(), script
    python = str(bin_dir / "python")
    probe = (
        "import vitssl.train.ds_config as d, vitssl.slurm.submit as s, vitssl;"
        "print(vitssl.__file__);"
        "print(d.load_preset('zero3')['zero_optimization']['stage']);"
        "print(sorted(s.TEMPLATES));"
        "print((s.SLURM_DIR / 'common.sh').is_file())"
    )
    # run beside the user's train.py and models.py, with the working directory first on
    # sys.path (as `python -m` and `python -c` put it): nothing of theirs is imported
    proc = _run([python, "-c", probe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, stage, templates, common = proc.stdout.splitlines()
    assert Path(where).is_relative_to(installed)  # the wheel's copy, not the checkout's
    assert stage == "3" and common == "True"
    assert "pretrain_single_node" in templates and "distil" in templates
    proc = _run([python, "-m", "vitssl.train.pretrain", "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout.lower(), proc.stderr[-2000:]
    # the user's own `import train` still finds their file, and the wheel installs no bare
    # top-level package that could clash with theirs or another distribution's `models`
    shadowed = _run([python, "-c", "import train"], cwd=tmp_path)
    assert "user train.py was imported" in shadowed.stderr
    (tmp_path / "elsewhere").mkdir()
    names = ["train", "models", "data_pipelines", "slurm", "ds_configs"]
    bare = f"import importlib.util as u;print([n for n in {names!r} if u.find_spec(n)])"
    proc = _run([python, "-c", bare], cwd=tmp_path / "elsewhere")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
