"""Every method through the real trainer on 2 gloo processes, and EMA teachers under ZeRO-3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.runs import TINY, read_metrics, shard_overrides, spawn
from vitssl.train.checkpoint import latest_complete
from vitssl.train.weights import consolidated_state_dict

pytestmark = pytest.mark.slow

# Small heads so that a CPU step takes well under a second.
SMALL = {
    "simclr": ["method.proj_hidden_dim=64", "method.proj_out_dim=32"],
    "mocov3": ["method.proj_hidden_dim=64", "method.proj_out_dim=32", "method.queue_size=32"],
    # a faster predictor: its own optimizer groups, also under ZeRO-3 below
    "byol": ["method.proj_hidden_dim=64", "method.proj_out_dim=32", "method.predictor_lr_scale=10"],
    "simsiam": ["method.proj_dim=64", "method.pred_hidden_dim=16"],
    "dino": [
        "method.out_dim=64",
        "method.hidden_dim=64",
        "method.bottleneck_dim=16",
        "data.local_crops=2",
        "method.freeze_last_layer=0.5",
        "method.centering=sinkhorn_knopp",  # all-reduced over the 2 ranks
    ],
}
RECIPES = {
    "simclr": "simclr_vit_tiny_cifar",
    "mocov3": "mocov3_vit_tiny_cifar",
    "byol": "byol_vit_tiny_cifar",
    "simsiam": "simsiam_resnet18_cifar",
    "dino": "dino_vit_tiny_cifar",
}


def _common(shards: Path) -> list[str]:
    tiny = [t for t in TINY if not t.startswith("method.")]
    return [
        *tiny,
        *shard_overrides(shards),
        "train.steps=3",
        "checkpoint.every=100",
        "log.monitor_every=1",
    ]


def test_every_method_trains_on_two_processes_and_zero3_teacher_matches_zero0(
    tiny_shards: Path, tmp_path: Path
) -> None:
    runs = []
    for name, recipe in RECIPES.items():
        runs.append(
            {
                "recipe": recipe,
                "overrides": [
                    *_common(tiny_shards),
                    *SMALL[name],
                    "train.zero=zero2",
                    "train.precision=bf16",
                    f"train.output_dir={tmp_path / name}",
                ],
            }
        )
    # The same BYOL run under ZeRO-0 and ZeRO-3 (fp32, so the only difference is sharding).
    for zero in ("zero0", "zero3"):
        runs.append(
            {
                "recipe": "byol_vit_tiny_cifar",
                "overrides": [
                    *_common(tiny_shards),
                    *SMALL["byol"],
                    f"train.zero={zero}",
                    "train.precision=fp32",
                    "train.steps=4",
                    f"train.output_dir={tmp_path / ('byol_' + zero)}",
                ],
            }
        )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(runs))
    proc = spawn(2, [str(spec)], timeout=900, module="tests.integration.methods_probe")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    for name in RECIPES:
        rows = read_metrics(tmp_path / name)
        assert [r["step"] for r in rows] == [1, 2, 3], name
        assert all(math.isfinite(r["loss"]) for r in rows), name
        collapse = [
            json.loads(line)
            for line in (tmp_path / name / "metrics.jsonl").open()
            if "collapse/rankme" in line
        ]
        assert len(collapse) == 3 and collapse[0]["collapse/rankme"] > 1.0, name
        assert (tmp_path / name / "export" / "encoder.safetensors").is_file(), name

    # DINO exports its EMA teacher (method.export_teacher), the others their trained backbone.
    for name, source in (("dino", "teacher"), ("simclr", "backbone")):
        ckpt = latest_complete(tmp_path / name / "checkpoints")
        assert ckpt is not None
        exported = load_file(str(tmp_path / name / "export" / "encoder.safetensors"))
        student = consolidated_state_dict(ckpt)
        if source == "teacher":
            teacher = load_file(str(ckpt / "extra_state.safetensors"))
            for key, value in exported.items():
                torch.testing.assert_close(value, teacher["teacher.backbone." + key].float())
            assert any(
                not torch.equal(value, student["backbone." + key].float())
                for key, value in exported.items()
            ), "the teacher export should differ from the student after 3 steps"
        else:
            for key, value in exported.items():
                torch.testing.assert_close(value, student["backbone." + key].float())

    teachers = {}
    for zero in ("zero0", "zero3"):
        ckpt = latest_complete(tmp_path / f"byol_{zero}" / "checkpoints")
        assert ckpt is not None and ckpt.name == "step_00000004"
        teachers[zero] = load_file(str(ckpt / "extra_state.safetensors"))
    assert teachers["zero0"].keys() == teachers["zero3"].keys()
    assert any(k.startswith("teacher.backbone.") for k in teachers["zero0"])
    for key, value in teachers["zero0"].items():
        torch.testing.assert_close(teachers["zero3"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the teacher moved away from the initial weights (the EMA really ran)
    from vitssl.models.registry import create_method
    from vitssl.train.config import load_config

    torch.manual_seed(0)  # the trainer's seed: the same initial weights
    cfg = load_config("byol_vit_tiny_cifar", [*SMALL["byol"], "model.patch_size=8"])
    fresh = create_method(cfg.method, cfg.model).state_dict()
    teacher = {k.removeprefix("teacher."): v for k, v in teachers["zero0"].items()}
    assert teacher.keys() <= fresh.keys()
    moved = max(float((v.float() - fresh[k].float()).abs().max()) for k, v in teacher.items())
    assert moved > 1e-6


def test_a_cnn_trains_in_bf16_at_zero0_on_one_process(tiny_shards: Path, tmp_path: Path) -> None:
    """One process, ZeRO-0, bf16: DeepSpeed casts the parameters but not the batch-norm
    running statistics, which the CPU batch norm refused ("expected scalar type BFloat16 but
    found Float"); build_engine gives them the weights' dtype."""
    run = {
        "recipe": "simsiam_resnet18_cifar",
        "overrides": [
            *_common(tiny_shards),
            *SMALL["simsiam"],
            "train.zero=zero0",
            "train.precision=bf16",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    }
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([run]))
    proc = spawn(1, [str(spec)], timeout=600, module="tests.integration.methods_probe")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
