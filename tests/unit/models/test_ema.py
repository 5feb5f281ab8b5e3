"""EMA update formula, momentum schedule, and the unregistered float32 teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitssl.models import ema
from vitssl.models.ema import EMATeacher, cosine_momentum, update_ema


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_update_ema_formula() -> None:
    torch.manual_seed(0)
    student, teacher = _net(), _net()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_ema(student, teacher, 0.9)
    for name, p in teacher.named_parameters():
        s = dict(student.named_parameters())[name]
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * s)
    # buffers are the teacher's own
    torch.testing.assert_close(teacher[1].running_mean, before["1.running_mean"])


def test_zero3_chunks_group_parameters_by_size() -> None:
    pairs = [(torch.zeros(n), torch.zeros(n)) for n in (3, 4, 2, 6)]
    chunks = list(ema._chunks(pairs, max_numel=7))
    assert [[t.numel() for _, t in c] for c in chunks] == [[3, 4], [2], [6]]


def test_update_ema_from_bf16_student_into_float32_teacher() -> None:
    student = _net().bfloat16()
    teacher = EMATeacher({"net": student})
    assert all(p.dtype == torch.float32 for p in teacher["net"].parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
    t0 = [p.clone() for p in teacher["net"].parameters()]
    teacher.update({"net": student}, 0.996)
    for p, p0 in zip(teacher["net"].parameters(), t0, strict=True):
        torch.testing.assert_close(p, 0.996 * p0 + 0.004)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    expected = 1 - (1 - 0.996) * (math.cos(math.pi * 0.3) + 1) / 2
    assert cosine_momentum(0.996, 0.3) == pytest.approx(expected)


class _WithTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.teacher = EMATeacher({"net": self.net})


def test_teacher_is_not_registered_and_state_round_trips() -> None:
    model = _WithTeacher()
    own = {id(p) for p in model.parameters()}
    assert not own & {id(p) for p in model.teacher["net"].parameters()}
    assert not any("teacher" in k for k in model.state_dict())
    model.bfloat16()  # what DeepSpeed's bf16 cast does: the teacher is left alone
    assert next(model.teacher["net"].parameters()).dtype == torch.float32
    assert all(not p.requires_grad for p in model.teacher["net"].parameters())

    with torch.no_grad():
        for p in model.teacher["net"].parameters():
            p.add_(1.0)
    state = model.teacher.state_dict()
    assert all(k.startswith("teacher.net.") for k in state)
    other = _WithTeacher()
    other.teacher.load_state_dict(state)
    restored = other.teacher["net"].state_dict()
    for k, v in model.teacher["net"].state_dict().items():
        torch.testing.assert_close(restored[k], v)


def test_teacher_refuses_zero3_partitioned_students() -> None:
    net = _net()
    net[0].weight.ds_id = 0  # what deepspeed.zero.Init leaves on parameters
    with pytest.raises(ValueError, match=r"zero\.Init"):
        EMATeacher({"net": net})


def _zero3_worker(rank: int, port: int) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    ref, teacher = _net(), _net()
    t0 = [p.clone() for p in teacher.parameters()]
    zero3 = {"zero_optimization": {"stage": 3}, "train_batch_size": 1}
    with deepspeed.zero.Init(config_dict_or_path=zero3):
        student = _net()
    assert all(ema.is_zero3_partitioned(p) and p.numel() == 0 for p in student.parameters())
    params = list(student.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for p, r in zip(params, ref.parameters(), strict=True):
            p.copy_(r)
    update_ema(student, teacher, 0.75)
    for t, a, r in zip(teacher.parameters(), t0, ref.parameters(), strict=True):
        torch.testing.assert_close(t, 0.75 * a + 0.25 * r)


@pytest.mark.slow
def test_update_ema_gathers_zero3_partitioned_students() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero3_worker, args=(port,), nprocs=1)
