"""slurm/ templates, slurm.submit, the Dockerfile, and train.memory (no Slurm needed).

The batch-shell logic of slurm/common.sh (exit 75 -> ``scontrol requeue``, signals to the
batch shell forwarded to the step) runs here against stand-in ``srun``/``scontrol``
commands; tests/integration/test_slurm.py runs the same templates on a real Slurm.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from vitssl.slurm import submit

PROJECT = Path(__file__).resolve().parents[2]
SLURM_DIR = PROJECT / "slurm"
TEMPLATES = sorted(SLURM_DIR.glob("*.sbatch"))
SHELL_FILES = [*TEMPLATES, SLURM_DIR / "common.sh"]
ENTRY_POINTS = {
    "pretrain_single_node": "vitssl.train.pretrain",
    "pretrain_multi_node": "vitssl.train.pretrain",
    "eval_array": '"${SSL_ENTRY:-vitssl.train.evaluate}"',
    "distil": "vitssl.train.distil",
    "export": "vitssl.train.edge_export",
}


def test_every_expected_template_exists() -> None:
    assert sorted(t.stem for t in TEMPLATES) == sorted(ENTRY_POINTS)


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax(path: Path) -> None:
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shellcheck(path: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/install_slurm.sh installs it)")
    res = subprocess.run(
        ["shellcheck", "-x", str(path.relative_to(PROJECT))],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_requeue_contract(path: Path) -> None:
    text = path.read_text()
    options = submit.sbatch_options(text)
    assert re.fullmatch(r"USR1@\d+", options.get("signal") or ""), "needs --signal=USR1@T"
    assert "requeue" in options and options["requeue"] is None
    assert options.get("open-mode") == "append"
    assert 'source "${SSL_HOME:-.}/slurm/common.sh"' in text
    assert f"ssl_main {ENTRY_POINTS[path.stem]} " in text
    # Every #SBATCH line comes before the first command, or sbatch ignores it.
    lines = text.splitlines()
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    first_command = min(
        i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")
    )
    assert last_sbatch < first_command


# ---------------------------------------------------------------------- slurm.submit


def dry_run(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert submit.main(["--dry-run", *argv]) == 0
    return out.getvalue()


def test_dry_run_fills_sbatch_lines(tmp_path: Path) -> None:
    script = dry_run(
        [
            "--template",
            "pretrain_single_node",
            "--nodes",
            "1",
            "--gpus-per-node",
            "4",
            "--time",
            "12:00:00",
            "--partition",
            "gpu",
            "--account",
            "proj42",
            "--sbatch",
            "constraint=a100",
            "--log-dir",
            str(tmp_path / "logs"),
            "--",
            "mae_vit_tiny_demo",
            "train.steps=10",
        ]
    )
    options = submit.sbatch_options(script)
    assert options["nodes"] == "1"
    assert options["gpus-per-node"] == "4"
    assert options["ntasks-per-node"] == "4"  # one task per GPU
    assert options["time"] == "12:00:00"
    assert options["partition"] == "gpu"
    assert options["account"] == "proj42"
    assert options["constraint"] == "a100"
    assert options["output"] == f"{tmp_path / 'logs'}/%x-%j.out"
    assert options["chdir"] == str(PROJECT)  # a checkout: the job runs in it
    assert options["export"] == f"ALL,SSL_HOME={PROJECT}"  # where common.sh is sourced from
    assert options["chdir"] == str(PROJECT)
    assert options["signal"] == "USR1@120"
    # Options are changed in place, not duplicated; the body is untouched.
    assert script.count("#SBATCH --time=") == 1
    template = (SLURM_DIR / "pretrain_single_node.sbatch").read_text()
    assert script.split("set -euo pipefail")[1] == template.split("set -euo pipefail")[1]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_dry_run_without_gpus_drops_the_gpu_request() -> None:
    script = dry_run(
        [
            "--template",
            "pretrain_single_node",
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
        ]
    )
    options = submit.sbatch_options(script)
    assert "gpus-per-node" not in options
    assert options["ntasks-per-node"] == "2"
    assert options["cpus-per-task"] == "1"


def test_dry_run_sizes_the_array_from_the_sweep_file(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(
        "# linear probe lrs\noptim.base_lr=0.1\n\noptim.base_lr=0.3\noptim.base_lr=1\n"
    )
    script = dry_run(["--template", "eval_array", "--", str(sweep), "recipe"])
    options = submit.sbatch_options(script)
    assert options["array"] == "0-2"
    assert options["output"].endswith("%x-%A_%a.out")
    explicit = dry_run(["--template", "eval_array", "--array", "0-2%1", "--", str(sweep), "r"])
    assert submit.sbatch_options(explicit)["array"] == "0-2%1"


def test_unknown_template_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert submit.main(["--template", "nope", "--dry-run"]) == 2
    assert "pretrain_single_node" in capsys.readouterr().err


def test_set_sbatch_options_adds_after_the_block() -> None:
    script = "#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --exclusive\necho hi\n"
    out = submit.set_sbatch_options(script, {"nodes": "2", "exclusive": False, "qos": "high"})
    assert out == "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --qos=high\necho hi\n"


# ---------------------------------------------------------------------- common.sh logic


def fake_cluster_bin(tmp_path: Path) -> Path:
    """``srun`` that runs its command in place, ``scontrol`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.calls\n')
    # The "trainer": `-m MODULE ARGS` exits with $FAKE_EXIT, or waits for SIGUSR1 when
    # FAKE_EXIT=signal and then exits 75 like the real one.
    (bin_dir / "fakepython").write_text(
        "#!/bin/bash\n"
        'echo "trainer: $*" >> "$FAKE_LOG"\n'
        'if [ "$FAKE_EXIT" = signal ]; then\n'
        "  trap 'echo trainer got USR1 >> \"$FAKE_LOG\"; exit 75' USR1\n"
        "  trap 'echo trainer got TERM >> \"$FAKE_LOG\"; exit 75' TERM\n"
        '  touch "$FAKE_LOG.ready"\n'
        "  while true; do sleep 0.05; done\n"
        "fi\n"
        'exit "$FAKE_EXIT"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_template(
    tmp_path: Path, template: str, args: list[str], fake_exit: str, **extra_env: str
) -> tuple:
    bin_dir = fake_cluster_bin(tmp_path)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SSL_PYTHON": str(bin_dir / "fakepython"),
        "SLURM_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "1",
        "FAKE_EXIT": fake_exit,
        "FAKE_LOG": str(tmp_path / "trainer.log"),
        **extra_env,
    }
    proc = subprocess.Popen(
        ["bash", str(SLURM_DIR / f"{template}.sbatch"), *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, tmp_path / "scontrol.calls", tmp_path / "trainer.log"


def test_exit_75_requeues_the_job(tmp_path: Path) -> None:
    proc, calls, log = run_template(tmp_path, "pretrain_single_node", ["r", "a=1"], "75")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert calls.read_text().split() == ["requeue", "4242"]
    assert log.read_text().strip() == "trainer: -m vitssl.train.pretrain r a=1"
    assert "requeueing job 4242" in out


@pytest.mark.parametrize("code", ["0", "1"])
def test_other_exit_codes_pass_through_without_requeue(tmp_path: Path, code: str) -> None:
    proc, calls, _ = run_template(tmp_path, "pretrain_multi_node", ["r"], code)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == int(code), out
    assert not calls.exists()


def signal_batch_shell(tmp_path: Path, sig: int) -> tuple[str, int, Path, Path]:
    """Start a template whose trainer waits for a signal, send ``sig`` to the batch shell."""
    proc, calls, log = run_template(tmp_path, "pretrain_single_node", ["r"], "signal")
    ready = Path(f"{log}.ready")
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return out, proc.returncode, calls, log


def test_usr1_to_the_batch_shell_reaches_the_trainer_and_requeues(tmp_path: Path) -> None:
    out, code, calls, log = signal_batch_shell(tmp_path, signal.SIGUSR1)
    assert code == 0, out
    assert "batch shell got SIGUSR1" in out
    assert "trainer got USR1" in log.read_text()
    assert calls.read_text().split() == ["requeue", "4242"]


def test_sigterm_to_the_batch_shell_checkpoints_but_never_requeues(tmp_path: Path) -> None:
    # scancel, preemption and the time limit end the job with SIGTERM to the batch shell;
    # `scontrol requeue` would still succeed then, and a cancelled job would come back.
    out, code, calls, log = signal_batch_shell(tmp_path, signal.SIGTERM)
    assert code == 75, out
    assert "trainer got TERM" in log.read_text()
    assert "not requeueing" in out
    assert not calls.exists()


def test_eval_array_runs_its_line_of_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# comment\nlr=0.1 out=a\n\nlr=0.3 out=b\n")
    args = [str(sweep), "rec", "shared=1"]
    proc, _, log = run_template(
        tmp_path, "eval_array", args, "0", SSL_ENTRY="vitssl.train.pretrain"
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert log.read_text().strip() == "trainer: -m vitssl.train.pretrain rec shared=1 lr=0.3 out=b"


def test_eval_array_index_out_of_range_fails(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("lr=0.1\n")
    args = [str(sweep), "rec"]
    proc, _, log = run_template(
        tmp_path, "eval_array", args, "0", SSL_ENTRY="vitssl.train.pretrain"
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "has no line 1" in out
    assert not log.exists()


def test_dockerfile_lint() -> None:
    text = (PROJECT / "Dockerfile").read_text()
    instructions = [
        line.split()[0]
        for line in text.splitlines()
        if line.strip() and not line.startswith(("#", " ")) and line.split()[0].isupper()
    ]
    assert instructions[0] in ("ARG", "FROM")
    assert "FROM" in instructions
    assert re.search(r"^FROM \S*(cuda|pytorch)\S*", text.replace("${CUDA_IMAGE}", "cuda"), re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r"pip install (-e )?\"?\.(\[[a-z,]+\])?\"?", text), "installs the project"
    for op in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert op in text
    for package in ("train", "models", "data_pipelines", "ds_configs", "slurm"):
        assert re.search(rf"^COPY {package} ", text, re.M), f"{package}/ is not copied"
    assert "COPY . " not in text, "copy sources only (not .venv, runs, data)"


# ---------------------------------------------------------------------- train.memory


def test_memory_follows_deepspeed_estimators() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    from vitssl.train.memory import ModelSize, zero_estimates

    size = ModelSize(trainable_params=1_300_000_000, largest_layer_params=60_000_000)
    est = {e.setup: e for e in zero_estimates(size, gpus_per_node=8, nodes=1)}
    assert est["zero3"].gpu_bytes < est["zero2"].gpu_bytes < est["zero1"].gpu_bytes
    assert est["zero3_offload"].gpu_bytes < est["zero3"].gpu_bytes
    assert est["zero3_offload"].cpu_bytes > est["zero3"].cpu_bytes

    def printed(fn, *args: int) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
        out = io.StringIO()
        with redirect_stdout(out):
            fn(*args, num_gpus_per_node=8, num_nodes=1)
        # "  12.34GB |  5.67GB | offload_optimizer=none"
        text = re.sub(r"OffloadDeviceEnum\.(\w+) *", r"\1", out.getvalue())
        return re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB \| (.+)", text)

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f}"

    z2 = {
        opts: (cpu, gpu)
        for cpu, gpu, opts in printed(
            estimate_zero2_model_states_mem_needs_all_cold, size.trainable_params
        )
    }
    assert z2["offload_optimizer=none"] == (
        gib(est["zero2"].cpu_bytes),
        gib(est["zero2"].gpu_bytes),
    )
    z3 = {
        opts: (cpu, gpu)
        for cpu, gpu, opts in printed(
            estimate_zero3_model_states_mem_needs_all_cold,
            size.trainable_params,
            size.largest_layer_params,
        )
    }
    none = "offload_param=none, offload_optimizer=none, zero_init=1"
    full = "offload_param=cpu, offload_optimizer=cpu, zero_init=1"
    assert z3[none] == (gib(est["zero3"].cpu_bytes), gib(est["zero3"].gpu_bytes))
    assert z3[full] == (gib(est["zero3_offload"].cpu_bytes), gib(est["zero3_offload"].gpu_bytes))
    # ZeRO-1: DeepSpeed's 2-byte params and grads replicated, 16 bytes/param partitioned.
    p = size.trainable_params
    assert est["zero1"].gpu_bytes == 4 * p + 16 * p // 8


def test_memory_counts_the_mae_model_and_its_activations() -> None:
    from vitssl.train.memory import build_mae_on_meta, mae_activation_bytes, model_size

    mae, shape = build_mae_on_meta("vit_base_patch16_224", 224, 16, 0.75, 512, 8)
    size = model_size(mae)
    # MAE ViT-B/16 with the paper's 512x8 decoder has about 112M trainable parameters.
    assert 105e6 < size.trainable_params < 115e6
    assert (shape.num_patches, shape.enc_width, shape.enc_depth) == (196, 768, 12)
    kwargs = dict(
        num_patches=196,
        mask_ratio=0.75,
        micro_batch=64,
        enc_width=768,
        enc_depth=12,
        dec_width=512,
        dec_depth=8,
        bytes_per_value=2,
    )
    full = mae_activation_bytes(**kwargs, grad_checkpointing=False)  # type: ignore[arg-type]
    assert full == 34 * 64 * (12 * 50 * 768 + 8 * 197 * 512)
    ckpt = mae_activation_bytes(**kwargs, grad_checkpointing=True)  # type: ignore[arg-type]
    assert ckpt < full


def test_memory_command_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    from vitssl.train.memory import main

    argv = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8"]
    assert main([*argv, "--gpus", "8", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    for setup in ("zero1", "zero2", "zero3", "zero3_offload", "activations:"):
        assert setup in out
    assert "2 node(s) x 8 GPU(s)" in out
