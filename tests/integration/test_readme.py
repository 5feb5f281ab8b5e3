"""The README's commands are the user's path: every line of every ```bash block runs.

Each block runs as one bash script (``set -euo pipefail``, so variables carry from line to
line as in a terminal), in README order, in a copy of the repository whose ``.venv`` is this
one and whose ``PATH`` starts with ``.venv/bin``. What a user brings is given by the
variables the README names (``CIFAR10_TAR``, ``IMAGES``, ``JPEG_TAR``, ``PHOTO``), pointed
at small generated images. A line that cannot run here as written carries a tag at its end,
``# readme-test: MODE [ARGS]``, and runs in that mode instead, never skipped silently:

* ``add ARGS``: run with ``ARGS`` appended (tiny overrides such as ``train.steps=2``,
  ``--print-config`` or ``--dry-run``; later arguments win), before a `` -- `` that starts
  the arguments the command passes on.
* ``launcher ARGS``: parse the launcher's own arguments with its own parser (``torchrun``,
  ``deepspeed``), then run the module it launches in one process with ``ARGS`` appended.
* ``hours``: an evidence script of hours: ``bash -n`` checks it, and every ``VAR=`` given
  on the line must be a variable the script reads.
* ``ci``: ``make`` targets that build the virtual environment; CI runs them (``.ci/run``
  must contain the line).

``python tests/integration/test_readme.py launch LAUNCHER ARGS...`` is the launcher mode.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TAG = re.compile(r"\s+#\s*readme-test:\s*(\w[\w-]*)\s*(.*)$")
MODES = ("add", "launcher", "hours", "ci")


def bash_blocks(readme: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M)


def logical_lines(block: str) -> list[str]:
    """Lines with their backslash continuations joined (a tag ends the joined line)."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def transform(line: str) -> str:
    """The line as it runs here (see the module docstring for the modes)."""
    m = TAG.search(line)
    if not m:
        return line
    mode, args = m.group(1), m.group(2).strip()
    command = re.sub(r"\s+#[^'\"]*$", "", line[: m.start()])  # a plain comment before the tag
    assert mode in MODES, f"unknown readme-test mode {mode!r} in: {line}"
    if mode == "add":  # before a " -- " that starts the arguments the command passes on
        head, sep, tail = command.partition(" -- ")
        return f"{head} {args}{sep}{tail}" if sep else f"{command} {args}"
    if mode == "launcher":
        return f'"$README_PY" "$README_TEST" launch {command.strip()} {args}'
    if mode == "hours":
        words = shlex.split(command, comments=True)
        env = [w for w in words[: len(words)] if re.match(r"^[A-Z_]+=", w)]
        script = words[len(env)]
        text = (REPO / script).read_text()
        for word in env:
            var = word.split("=")[0]
            assert re.search(rf"\${{?{var}\b", text), f"{script} does not read {var}"
        return f"bash -n {script}"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command.strip() in [c.strip() for c in ci], f"{command.strip()!r} not in .ci/run"
    return ": ci runs it"


def script_of(block: str) -> str:
    lines = [transform(line) for line in logical_lines(block)]
    return "set -euo pipefail\nset -x\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- what the user brings


def _jpeg(rng: np.random.Generator, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def user_files(root: Path) -> dict[str, str]:
    """Small stand-ins for the user's images, in the layouts the README asks for."""
    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird", "cat"]
    cifar = {f"train/{classes[i % 4]}/{i}.jpg": _jpeg(rng) for i in range(100)}
    images = root / "images"
    for i in range(24):
        f = images / classes[i % 4] / f"{i}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(_jpeg(rng, 64))
    photos = {f"photo{i}.jpg": _jpeg(rng, 96) for i in range(8)}
    (root / "photo.jpg").write_bytes(photos["photo0.jpg"])
    return {
        "CIFAR10_TAR": str(_tar(root / "cifar10-train.tar.gz", cifar)),
        "IMAGES": str(images),
        "JPEG_TAR": str(_tar(root / "photos.tar", photos)),
        "PHOTO": str(root / "photo.jpg"),
    }


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("readme")
    copy = root / "repo"
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "runs", "data", "logs", "*_cache", "__pycache__"
    )
    shutil.copytree(REPO, copy, ignore=ignore, symlinks=True)
    (copy / ".venv").symlink_to((REPO / ".venv").resolve())
    env = {
        **os.environ,
        **user_files(root),
        "PATH": f"{copy / '.venv' / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": str(copy),
        "README_PY": sys.executable,
        "README_TEST": str(Path(__file__).resolve()),
        "OMP_NUM_THREADS": "2",
        # any op DeepSpeed JIT-compiles for this copy's venv path is built here, without
        # waiting on other processes' builds in the shared cache
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
    }
    return copy, env


BLOCKS = bash_blocks((REPO / "README.md").read_text())


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number: int, repo_copy: tuple[Path, dict[str, str]]) -> None:
    copy, env = repo_copy
    script = script_of(BLOCKS[number])
    proc = subprocess.run(
        ["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, (
        f"README bash block {number} failed (exit {proc.returncode}):\n{BLOCKS[number]}\n"
        f"--- stderr (last 3000 chars) ---\n{proc.stderr[-3000:]}"
    )


def test_a_broken_command_fails_its_block(tmp_path: Path) -> None:
    """The harness can fail: a wrong module or a bad override ends the block non-zero."""
    for line in (
        "python -m vitssl.train.no_such_module",
        "python -m vitssl.train.pretrain nope --print-config",
    ):
        proc = subprocess.run(
            ["bash", "-c", script_of(f"{line}\necho reached\n")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={
                **os.environ,
                "PYTHONPATH": str(REPO),
                "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
            },
        )
        assert proc.returncode != 0 and "reached" not in proc.stdout, line


def test_tags_are_known_and_transform() -> None:
    assert transform("a b  # readme-test: add c=1") == "a b c=1"
    assert transform("make demo-full  # readme-test: ci") == ": ci runs it"
    with pytest.raises(AssertionError, match="unknown readme-test mode"):
        transform("x  # readme-test: skip")
    assert logical_lines("a \\\n  b\nc") == ["a    b", "c"]


# ---------------------------------------------------------------- launcher mode


def launch(argv: list[str]) -> int:
    """Parse ``torchrun``/``deepspeed`` arguments with the launcher's parser, then run the
    launched module once, in this process's Python, with the remaining arguments."""
    launcher, rest = Path(argv[0]).name, argv[1:]
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(rest)
        assert args.module, "the README launches modules (-m)"
        module, script_args = args.training_script, args.training_script_args
    elif launcher == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        args = parse_args(rest)
        assert args.module, "deepspeed needs --module to run a module"
        module, script_args = args.user_script, args.user_args
    else:
        raise SystemExit(f"unknown launcher {launcher}")
    return subprocess.call([sys.executable, "-m", module, *script_args])


if __name__ == "__main__" and sys.argv[1:2] == ["launch"]:
    sys.exit(launch(sys.argv[2:]))
