"""Two-process DeepSpeed distillation on the CPU (gloo, ZeRO-3, fp32): a random ViT-tiny teacher
into MobileNetV3-Small with a CIFAR stem. The teacher never changes, the export is the student
only, and training from cached teacher embeddings gives the online losses step by step."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.integration.runs import Rank, finish, read_metrics, shard_overrides, start
from vitssl.models.backbones import create_backbone
from vitssl.models.vit import create_vit
from vitssl.train.config import ModelSection
from vitssl.train.weights import load_teacher

pytestmark = pytest.mark.slow

STUDENT = "mobilenetv3_small_100"


def start_distil(nproc: int, args: list[str]) -> list[Rank]:
    """N processes of ``python -m vitssl.train.distil ARGS`` with rank variables."""
    return start(nproc, args, module="vitssl.train.distil")


def finish_distil(procs: list[Rank], timeout: float = 240) -> tuple[int, str]:
    """Rank 0's exit code (-999 when ranks disagree) and the output of all ranks."""
    done = finish(procs, timeout)
    return done.returncode, done.stdout + done.stderr


def _teacher(out: Path) -> Path:
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8)
    out.mkdir(parents=True)
    weights = out / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 0}
    spec = {"timm_name": "vit_tiny_patch16_224", "kwargs": kwargs, "cifar_stem": False}
    (out / "encoder.json").write_text(json.dumps(spec))
    return weights


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_distillation_zero3_teacher_frozen_and_cache_equals_online(
    tiny_shards: Path, tmp_path: Path
) -> None:
    weights = _teacher(tmp_path / "teacher")
    before = _file_sha(weights)
    cache = tmp_path / "cache"
    common = [
        "distil_vit_tiny_to_mnv3_cifar",
        *shard_overrides(tiny_shards),
        f"model.name={STUDENT}",
        "model.patch_size=8",
        f"method.teacher={weights.parent}",
        "method.teacher_pool=cls",
        "method.proj_hidden_dim=32",
        "method.w_patch=0.0",
        "method.queue_size=64",
        "data.augmentation=eval",  # a fixed view: what the cache holds
        "data.num_workers=0",
        "train.micro_batch=8",
        "train.steps=3",
        "train.precision=fp32",
        "train.zero=zero3",
        "optim.warmup_steps=1",
        "checkpoint.every=3",
        "log.every=1",
        "log.progress=false",
    ]
    # offline: cache the teacher on the eval view (in this process, one rank)
    from vitssl.train.cache_teacher import main as cache_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cache_main([*common, f"method.cache={cache}", "--dtype", "float32"]) == 0
    finally:
        torch.set_num_threads(threads)
    expected = load_teacher(str(weights.parent)).sha256()
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_samples"] == 200 and meta["teacher_sha256"] == expected.hex()

    # the online and the cached run, side by side (2 ranks each)
    online, cached = tmp_path / "online", tmp_path / "cached"
    runs = [
        start_distil(2, [*common, f"train.output_dir={online}"]),
        start_distil(2, [*common, f"method.cache={cache}", f"train.output_dir={cached}"]),
    ]
    for code, text in [finish_distil(procs) for procs in runs]:
        assert code == 0, text[-3000:]

    # the teacher file and the teacher in memory at the last checkpoint are unchanged
    assert _file_sha(weights) == before
    extra = load_file(str(online / "checkpoints" / "step_00000003" / "extra_state.safetensors"))
    assert bytes(extra["teacher_sha256"].tolist()) == expected
    assert extra["queue.pos"].tolist() == [48, 48]  # 3 steps x 2 ranks x 8 teacher embeddings

    # the export is the student alone and loads into the timm student
    exported = load_file(str(online / "export" / "encoder.safetensors"))
    student = create_backbone(ModelSection(name=STUDENT, img_size=32, cifar_stem=True), "student")
    assert set(exported) == set(student.state_dict())
    student.load_state_dict(exported, strict=True)
    spec = json.loads((online / "export" / "encoder.json").read_text())
    assert spec["timm_name"] == STUDENT and spec["cifar_stem"] is True

    # cached embeddings give the online losses, step by step
    a, b = read_metrics(online), read_metrics(cached)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "feature", "relational"):
            assert math.isfinite(ra[key])
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert a[0]["relational"] == 0.0  # the queue is empty at step 1
    assert all(r["relational"] > 0 and r["feature"] > 0 for r in a[1:])
