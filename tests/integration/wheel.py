"""The project built as a wheel and installed into a fresh virtualenv (tests only).

The virtualenv reaches the heavy dependencies (torch, DeepSpeed, timm) through a path file
pointing at this interpreter's site-packages, placed after its own: only the wheel's files
are new, and they win over the checkout's.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

from tests.integration.runs import ROOT


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH or VIRTUAL_ENV: nothing points at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def install_wheel(tmp: Path) -> Path:
    """Build the wheel of this checkout under ``tmp`` and install it; the virtualenv's root."""
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(ROOT), "-w", str(tmp / "dist")],
        cwd=tmp,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("vitssl-*.whl")
    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=False)
    own = next((env_dir / "lib").glob("python3.*/site-packages"))
    (own / "shared.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = env_dir / "bin" / "python"
    done = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        cwd=tmp,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return env_dir
