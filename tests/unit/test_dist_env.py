"""vitssl.train.dist_env: torchrun, srun (one task per GPU, several nodes) and nothing set."""

from __future__ import annotations

import pytest

from vitssl.train.dist_env import (
    DEFAULT_ADDR,
    DEFAULT_PORT,
    DistEnv,
    apply_dist_env,
    parse_nodelist,
    parse_tasks_per_node,
    port_from_job_id,
    resolve_dist_env,
)


def srun_env(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """What srun sets for task ``procid`` of a 2-node x 4-GPU step (plus the batch's vars)."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
    }
    env.update(extra)
    return env


def test_nothing_set_is_a_single_process() -> None:
    env = resolve_dist_env({})
    assert env == DistEnv(0, 1, 0, 1, 0, DEFAULT_ADDR, DEFAULT_PORT, "default")


def test_torchrun_variables() -> None:
    env = resolve_dist_env(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "node01",
            "MASTER_PORT": "29400",
        }
    )
    assert env == DistEnv(5, 8, 1, 4, 1, "node01", 29400, "torchrun")


def test_torchrun_takes_precedence_over_slurm() -> None:
    environ = srun_env(6, 2, 1) | {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": "29500",
    }
    env = resolve_dist_env(environ)
    assert env.source == "torchrun"
    assert (env.rank, env.world_size, env.master_addr) == (0, 2, "localhost")


def test_srun_one_task_per_gpu_multi_node() -> None:
    envs = [resolve_dist_env(srun_env(p, p % 4, p // 4)) for p in range(8)]
    assert [e.rank for e in envs] == list(range(8))
    assert {e.world_size for e in envs} == {8}
    assert [e.local_rank for e in envs] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [e.node_rank for e in envs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {e.local_world_size for e in envs} == {4}
    assert {e.master_addr for e in envs} == {"gpu07"}
    assert {e.master_port for e in envs} == {port_from_job_id(123456)}
    assert {e.source for e in envs} == {"slurm"}


def test_srun_explicit_master_wins() -> None:
    env = resolve_dist_env(srun_env(0, 0, 0, MASTER_ADDR="10.0.0.1", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 31000)


def test_srun_uneven_tasks_per_node() -> None:
    environ = srun_env(4, 0, 1, SLURM_NTASKS="5", SLURM_STEP_TASKS_PER_NODE="4,1")
    env = resolve_dist_env(environ)
    assert (env.local_world_size, env.node_rank, env.world_size) == (1, 1, 5)


def test_batch_shell_without_srun_is_single_process() -> None:
    batch = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "vm",
    }
    with pytest.warns(UserWarning, match="not started by srun"):
        env = resolve_dist_env(batch)
    assert (env.world_size, env.source) == (1, "default")


def test_ports_differ_between_jobs_and_avoid_ephemeral_range() -> None:
    ports = {port_from_job_id(j) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(1024 < p < 32768 for p in ports)


def test_apply_dist_env_writes_torchrun_names() -> None:
    target: dict[str, str] = {}
    apply_dist_env(resolve_dist_env(srun_env(5, 1, 1)), target)
    assert target["RANK"] == "5"
    assert target["WORLD_SIZE"] == "8"
    assert target["LOCAL_RANK"] == "1"
    assert target["LOCAL_WORLD_SIZE"] == "4"
    assert target["MASTER_ADDR"] == "gpu07"
    assert target["MASTER_PORT"] == str(port_from_job_id(123456))
    # The result round-trips through the torchrun path unchanged but for its source.
    again = resolve_dist_env(target)
    assert again.rank == 5 and again.node_rank == 1 and again.source == "torchrun"


def test_bad_values_raise_value_error() -> None:
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        resolve_dist_env(srun_env(0, 0, 0, SLURM_PROCID="x"))
    with pytest.raises(ValueError, match="not in a world"):
        resolve_dist_env({"RANK": "3", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("vm", ["vm"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a-1.cluster,b[3]", ["a-1.cluster", "b3"]),
    ],
)
def test_parse_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "node[a-b]", "node[3-1]"])
def test_parse_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_nodelist(bad)


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(3)")
