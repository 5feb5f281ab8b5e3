"""The sbatch templates on a real (private, single-node) Slurm cluster.

(a) ``pretrain_single_node.sbatch``, rendered by ``vitssl.slurm.submit`` for 2 CPU tasks, runs to
    completion: two srun tasks that find each other through train.dist_env.
(b) Requeue: SIGUSR1 to the tasks (what ``--signal=USR1@120`` does before the time limit)
    -> checkpoint -> exit 75 -> ``scontrol requeue`` -> the job starts again and resumes,
    and metrics.jsonl holds every step once.

The workload is the real trainer (``python -m vitssl.train.pretrain``, tiny MAE) when the checkout
has it and its synthetic data writer; otherwise a stand-in trainer with the same contract
(signals, exit 75, ``checkpoints/step_*/COMPLETE``, metrics.jsonl), so that the Slurm side
is tested on its own. The daemons need root and the slurm-wlm and munge packages
(``.ci/install_slurm.sh``); without them the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster, missing_binaries
from tests.integration.wheel import install_wheel
from vitssl.slurm.submit import sbatch_options

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = PROJECT / ".ci" / "install_slurm.sh"
JOB_TIMEOUT_S = 150.0

STAND_IN_TRAINER = '''
"""Stand-in for train.pretrain with the trainer's Slurm contract (tests only)."""
import json, os, signal, sys, time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vitssl.train.dist_env import apply_dist_env, resolve_dist_env

EXIT_REQUEUE = 75


def main() -> int:
    overrides = dict(a.split("=", 1) for a in sys.argv[2:])
    out = Path(overrides["train.output_dir"])
    steps = int(overrides.get("train.steps", 10))
    every = int(overrides.get("checkpoint.every", 5))
    signalled = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda n, f: signalled.append(n))
    env = resolve_dist_env(os.environ)
    apply_dist_env(env)
    dist.init_process_group("gloo", timeout=timedelta(minutes=2))
    rank = dist.get_rank()
    ckpts = out / "checkpoints"
    done = sorted(p for p in ckpts.glob("step_*") if (p / "COMPLETE").exists())
    step = int(done[-1].name[len("step_"):]) if done else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"stand-in: {env.source} world={env.world_size} "
              f"master={env.master_addr}:{env.master_port} start_step={step}", flush=True)
    while step < steps:
        time.sleep(0.15)
        step += 1
        loss = torch.tensor([1.0 / step])
        dist.all_reduce(loss)
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item()}) + "\\n")
        stop = torch.tensor([1 if signalled else 0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if step % every == 0 or step == steps or stop.item():
            path = ckpts / f"step_{step:08d}"
            if rank == 0:
                path.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            if rank == 0:
                (path / "COMPLETE").write_text("")
            dist.barrier()
        if stop.item():
            if rank == 0:
                print(f"stand-in: stopped at step {step} with a checkpoint", flush=True)
            dist.destroy_process_group()
            return EXIT_REQUEUE
    dist.barrier()
    dist.destroy_process_group()
    return 0


sys.exit(main())
'''


@dataclass
class Workload:
    """What the jobs run: a project directory (``--chdir``), a recipe and overrides."""

    name: str
    chdir: Path
    recipe: str
    overrides: list[str]


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root (SlurmUser=root)")
    if missing_binaries() and INSTALL_SCRIPT.is_file():
        subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, timeout=600)
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing) and "
            ".ci/install_slurm.sh could not install it"
        )
    # A short root: the munge socket path must fit in a UNIX socket address (108 bytes).
    root = tmp_path_factory.mktemp("slurm")
    with SlurmCluster(root) as c:
        yield c


def real_trainer_available() -> bool:
    return (PROJECT / "train" / "pretrain.py").is_file() and (
        PROJECT / "data_pipelines" / "synthetic.py"
    ).is_file()


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    """A checkout with the real slurm/ and train/dist_env.py and a stand-in train.pretrain."""
    root = tmp_path_factory.mktemp("standin_project")
    (root / "train").mkdir()
    (root / "train" / "__init__.py").write_text("")
    shutil.copy(PROJECT / "train" / "dist_env.py", root / "train" / "dist_env.py")
    (root / "train" / "pretrain.py").write_text(STAND_IN_TRAINER)
    (root / "slurm").symlink_to(PROJECT / "slurm")
    (root / "vitssl").mkdir()  # the checkout's one import name, as in the project
    (root / "vitssl" / "__init__.py").write_text("")
    for name in ("train", "slurm"):
        (root / "vitssl" / name).symlink_to(Path("..") / name)
    return Workload("stand-in", root, "standin_recipe", [])


@pytest.fixture(scope="session")
def workload(stand_in: Workload, request: pytest.FixtureRequest) -> Workload:
    """The real trainer on tiny MAE when the checkout has it, else the stand-in."""
    if not real_trainer_available():
        return stand_in
    data: Path = request.getfixturevalue("tiny_shards")  # tests/integration/conftest.py
    shards = sorted(str(p) for p in data.rglob("train-*.tar"))
    assert shards, f"no train-*.tar under {data}"
    # bf16 on a CPU without native bf16 is emulated and several times slower.
    precision = "bf16" if _cpu_has_native_bf16() else "fp32"
    overrides = [
        "model.name=vit_tiny_patch16_224",
        "model.img_size=32",
        "model.patch_size=8",
        "train.micro_batch=8",
        "data.num_workers=0",
        f"data.train_shards={','.join(shards)}",
        "data.val_shards=",
        "train.zero=zero2",
        f"train.precision={precision}",
        "log.image_every=0",
        "log.monitor_every=0",
        "log.progress=false",
    ]
    return Workload("real", PROJECT, "mae_vit_tiny_demo", overrides)


# ---------------------------------------------------------------------- helpers


def submit(cluster: SlurmCluster, work: Workload, log_dir: Path, script_args: list[str]) -> int:
    """Render pretrain_single_node for 2 CPU tasks with slurm.submit and submit it."""
    argv = [
        sys.executable,
        "-m",
        "vitssl.slurm.submit",
        "--template",
        "pretrain_single_node",
        "--job-name",
        "ssltest",
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "00:10:00",
        "--partition",
        cluster.partition,
        "--log-dir",
        str(log_dir),
        "--chdir",
        str(work.chdir),
        "--",
        work.recipe,
        *work.overrides,
        *script_args,
    ]
    env = cluster.env | {"SSL_PYTHON": sys.executable}
    res = subprocess.run(
        argv, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"submitted job (\d+)", res.stdout)
    assert m, res.stdout
    return int(m.group(1))


def read_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "loss" in record:
            steps.append(int(record["step"]))
    return steps


def job_log(log_dir: Path, job_id: int) -> str:
    logs = list(log_dir.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no log)"


def complete_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(
        int(p.name.removeprefix("step_")) for p in ckpts.glob("step_*") if (p / "COMPLETE").exists()
    )


# ---------------------------------------------------------------------- tests


def test_single_node_template_runs_to_completion(
    cluster: SlurmCluster, stand_in: Workload, tmp_path: Path
) -> None:
    workload = stand_in  # the real trainer runs in the requeue test below
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "logs"
    steps = 4
    job = submit(
        cluster,
        workload,
        log_dir,
        [
            f"train.output_dir={run_dir}",
            f"train.steps={steps}",
            "checkpoint.every=2",
            "log.every=1",
        ],
    )
    info = cluster.wait_for_job(job, JOB_TIMEOUT_S)
    log = job_log(log_dir, job)
    context = f"[{workload.name}]\n{log}\n{cluster.log_tail()}"
    assert info["JobState"] == "COMPLETED", context
    assert info["ExitCode"] == "0:0", context
    assert info.get("NumTasks") == "2", context
    assert read_steps(run_dir / "metrics.jsonl") == list(range(1, steps + 1)), context
    assert steps in complete_steps(run_dir), context
    assert log.count(" start: restart ") == 1, context
    assert f"slurm world=2 master={cluster.node}:" in log, context


def test_scancel_checkpoints_and_does_not_requeue(
    cluster: SlurmCluster, stand_in: Workload, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "logs"
    metrics = run_dir / "metrics.jsonl"
    job = submit(
        cluster,
        stand_in,
        log_dir,
        [f"train.output_dir={run_dir}", "train.steps=200", "checkpoint.every=50"],
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not read_steps(metrics) or max(read_steps(metrics)) < 3:
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        assert time.monotonic() < deadline, job_log(log_dir, job)
        time.sleep(0.2)
    cluster.run(["scancel", str(job)])
    # The job reads CANCELLED at once; wait for the batch script to decide, then settle.
    while "requeueing" not in job_log(log_dir, job) or cluster.job(job)["JobState"] in (
        "COMPLETING",
        "RUNNING",
    ):
        assert time.monotonic() < deadline, f"{job_log(log_dir, job)}\n{cluster.log_tail()}"
        time.sleep(0.2)
    time.sleep(2)  # a requeue, had the script asked for one, would show by now
    info = cluster.job(job)
    log = job_log(log_dir, job)
    context = f"{log}\n{cluster.log_tail()}"
    assert info["JobState"] == "CANCELLED", context
    assert info["Restarts"] == "0", context
    assert "not requeueing" in log, context
    # The trainer still saved a checkpoint at the step where SIGTERM arrived.
    assert complete_steps(run_dir)[-1] == read_steps(metrics)[-1], context


def test_usr1_checkpoints_requeues_and_resumes(
    cluster: SlurmCluster, workload: Workload, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "logs"
    steps, signal_after = 30, 10
    metrics = run_dir / "metrics.jsonl"
    t0 = time.monotonic()
    job = submit(
        cluster,
        workload,
        log_dir,
        [
            f"train.output_dir={run_dir}",
            f"train.steps={steps}",
            "checkpoint.every=5",
            "log.every=1",
        ],
    )

    # 1. Wait for training to pass `signal_after` steps, then signal the tasks the way
    # --signal=USR1@T does at the time limit (every step's tasks, not the batch shell).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not read_steps(metrics) or max(read_steps(metrics)) < signal_after:
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {state} before step {signal_after}\n{job_log(log_dir, job)}"
        )
        assert time.monotonic() < deadline, f"no step {signal_after}\n{job_log(log_dir, job)}"
        time.sleep(0.2)
    t_signal = time.monotonic()
    cluster.run(["scancel", "--signal=USR1", str(job)])

    # 2. The job leaves RUNNING through a requeue (never COMPLETED on this first run).
    while True:
        info = cluster.job(job)
        if info.get("JobState") in ("PENDING", "REQUEUED") or int(info.get("Restarts", 0)):
            break
        assert info.get("JobState") in ("RUNNING", "COMPLETING"), (
            f"{info.get('JobState')} instead of a requeue\n{job_log(log_dir, job)}"
        )
        assert time.monotonic() < deadline, f"no requeue\n{job_log(log_dir, job)}"
        time.sleep(0.2)
    t_requeued = time.monotonic()
    first_run = read_steps(metrics)
    signal_step = first_run[-1]
    assert complete_steps(run_dir)[-1] == signal_step, "no checkpoint taken at the signal"

    # 3. The requeued job resumes and finishes.
    info = cluster.wait_for_job(job, JOB_TIMEOUT_S)
    t_done = time.monotonic()
    log = job_log(log_dir, job)
    context = f"[{workload.name}]\n{log}\n{cluster.log_tail()}"
    assert info["JobState"] == "COMPLETED", context
    assert info["ExitCode"] == "0:0", context
    assert int(info["Restarts"]) == 1, context
    assert log.count(" start: restart 0,") == 1 and log.count(" start: restart 1,") == 1, context
    assert "(exit 75); requeueing job" in log, context

    all_steps = read_steps(metrics)
    resumed = all_steps[len(first_run) :]
    assert signal_step >= signal_after, context
    assert signal_step < steps, f"the run ended before the signal arrived\n{context}"
    # Save-on-signal: no step lost, none repeated; the resumed run starts right after the
    # checkpoint that was written at the signal.
    assert resumed[0] == signal_step + 1, context
    assert all_steps == list(range(1, steps + 1)), context
    print(
        f"\n[{workload.name}] signal at step {signal_step}: "
        f"{t_signal - t0:.1f}s to signal, {t_requeued - t_signal:.1f}s to requeue, "
        f"{t_done - t_requeued:.1f}s to finish after the requeue"
    )


def test_submitit_launcher_checkpoints_requeues_and_resumes(
    cluster: SlurmCluster, stand_in: Workload, tmp_path: Path
) -> None:
    """``slurm.submit --launcher submitit``: submitit's time-limit signal (USR2) -> the stage
    checkpoints and exits 75 -> submitit requeues the job -> it resumes and finishes."""
    pytest.importorskip("submitit", reason="needs submitit (extra 'submitit')")
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    steps, signal_after = 30, 10
    metrics = run_dir / "metrics.jsonl"
    argv = [
        sys.executable, "-m", "vitssl.slurm.submit", "--launcher", "submitit",
        "--template", "pretrain_single_node", "--job-name", "ssltest-submitit",
        "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:10:00",
        "--partition", cluster.partition, "--log-dir", str(log_dir), "--chdir", str(stand_in.chdir),
        "--", stand_in.recipe, *stand_in.overrides,
        f"train.output_dir={run_dir}", f"train.steps={steps}", "checkpoint.every=5",
    ]  # fmt: skip
    res = subprocess.run(
        argv, cwd=PROJECT, env=cluster.env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"submitted job (\d+)", res.stdout)
    assert m, res.stdout
    job = int(m.group(1))

    def logs() -> str:
        files = sorted((log_dir / "submitit").rglob("*.out")) + sorted(
            (log_dir / "submitit").rglob("*.err")
        )
        return "\n".join(f"== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in files)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not read_steps(metrics) or max(read_steps(metrics)) < signal_after:
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n{logs()}"
        assert time.monotonic() < deadline, f"no step {signal_after}\n{logs()}"
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR2", str(job)])  # what --signal=USR2@120 sends
    info = cluster.wait_for_job(job, JOB_TIMEOUT_S)
    first_stop = [int(m) for m in re.findall(r"stopped at step (\d+)", logs())]
    context = f"{logs()}\n{cluster.log_tail()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", context
    assert int(info["Restarts"]) == 1, context
    assert first_stop and first_stop[0] >= signal_after, context
    assert first_stop[0] in complete_steps(run_dir), context  # checkpoint at the signal
    assert read_steps(metrics) == list(range(1, steps + 1)), context  # none lost or repeated


def test_installed_package_runs_a_template_from_a_users_folder(
    cluster: SlurmCluster,
    workload: Workload,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    """pip-installed, no checkout: ``vitssl-submit`` run in a user's folder (holding their own
    ``train.py``) submits the wheel's template; the job sources the wheel's common.sh through
    SSL_HOME, runs the wheel's trainer in that folder and writes its run there."""
    if workload.name != "real":
        pytest.skip("the checkout has no real trainer to install as a wheel")
    env_dir = install_wheel(tmp_path_factory.mktemp("wheel"))
    user = tmp_path / "user"
    user.mkdir()
    (user / "train.py").write_text("raise SystemExit('user train.py was imported')\n")
    argv = [
        str(env_dir / "bin" / "vitssl-submit"), "--template", "pretrain_single_node",
        "--job-name", "sslwheel", "--nodes", "1", "--gpus-per-node", "0",
        "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "00:10:00",
        "--partition", cluster.partition,
        "--", workload.recipe, *workload.overrides,
        "train.output_dir=run", "train.steps=2", "checkpoint.every=2", "log.every=1",
    ]  # fmt: skip
    env = {k: v for k, v in cluster.env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SSL_PYTHON"] = str(env_dir / "bin" / "python")
    res = subprocess.run(argv, cwd=user, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"submitted job (\d+)", res.stdout)
    assert m, res.stdout
    job = int(m.group(1))
    info = cluster.wait_for_job(job, JOB_TIMEOUT_S)
    log = job_log(user / "logs", job)
    context = f"{log}\n{cluster.log_tail()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", context
    assert "user train.py was imported" not in log, context
    assert read_steps(user / "run" / "metrics.jsonl") == [1, 2], context
    assert complete_steps(user / "run") == [2], context
    # the rendered script: the job ran in the user's folder, with the wheel's slurm/
    (script,) = (user / "logs").glob("sslwheel-*.sbatch")
    options = sbatch_options(script.read_text())
    site_packages = next((env_dir / "lib").glob("python3.*/site-packages")).resolve()
    assert options["chdir"] == str(user.resolve())
    assert options["export"] == f"ALL,SSL_HOME={site_packages / 'vitssl'}"
