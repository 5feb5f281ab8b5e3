"""Students, teachers and the distil method on a tiny random ViT teacher (CPU, float32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vitssl.models.backbones import create_backbone
from vitssl.models.distill_losses import feature_loss, logit_loss, patch_loss, relational_loss
from vitssl.models.methods.distil import (
    CACHE_FEATURES,
    CACHE_META,
    DistilConfig,
    TeacherCache,
    build_distil,
)
from vitssl.models.students import STUDENTS, apply_cifar_stem, student_shape
from vitssl.models.vit import create_vit
from vitssl.train.config import ConfigError, ModelSection, config_from_dict
from vitssl.train.weights import load_teacher, method_weights

STUDENT = ModelSection(name="mobilenetv3_small_100", img_size=32, patch_size=8, cifar_stem=True)
TEACHER_ARCH = {"img_size": 32, "patch_size": 8, "num_classes": 0}


def write_vit_export(out: Path, seed: int = 0) -> Path:
    """A random ViT-tiny (32 px, patch 8) in train.export_encoder's format."""
    torch.manual_seed(seed)
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    spec = {"timm_name": "vit_tiny_patch16_224", "kwargs": TEACHER_ARCH, "cifar_stem": False}
    (out / "encoder.json").write_text(json.dumps({**spec, "method": "mae", "step": 0}))
    return weights


def timm_teacher(weights: Path) -> torch.nn.Module:
    """The exported teacher rebuilt with plain timm, independently of models.methods.distil."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TEACHER_ARCH)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """One intra-op thread: on a shared CPU, more threads spin and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vit_export(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("name", STUDENTS)
def test_students_build_for_export_with_a_cifar_stem(name: str) -> None:
    torch.manual_seed(0)
    student = create_student(name, img_size=32, cifar_stem=True)
    shape = student_shape(student, 32)
    assert min(shape.feature_hw) >= 2 and shape.embed_dim > 0
    reference = timm.create_model(name, pretrained=False, num_classes=0)
    apply_cifar_stem(reference)
    reference.load_state_dict(student.state_dict(), strict=True)  # what an export loads into


def test_mobilenetv3_cifar_stem_keeps_a_2x2_map_and_the_plain_stem_is_refused() -> None:
    student = create_student("mobilenetv3_large_100", img_size=32, cifar_stem=True)
    shape = student_shape(student, 32)
    assert shape.feature_hw == (2, 2) and shape.feature_dim == 960 and shape.embed_dim == 1280
    assert student.conv_stem.stride == (1, 1)
    with pytest.raises(ValueError, match=r"1x1 feature map.*cifar_stem=true"):
        create_student("mobilenetv3_large_100", img_size=32)
    with pytest.raises(ValueError, match="must be a CNN"):
        create_student("vit_tiny_patch16_224", img_size=32)
    with pytest.raises(ValueError, match="must be a CNN"):
        create_student("deit_tiny_patch16_224", img_size=32)  # a ViT by timm's registry


def create_student(name: str, img_size: int, cifar_stem: bool = False) -> torch.nn.Module:
    spec = ModelSection(name=name, img_size=img_size, cifar_stem=cifar_stem)
    return create_backbone(spec, "student")


def _method(teacher: Path, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = DistilConfig(teacher=str(teacher), proj_hidden_dim=32, queue_size=16, **kw)  # type: ignore[arg-type]
    return build_distil(cfg, STUDENT, method_weights(cfg, STUDENT))


def test_forward_is_the_weighted_sum_of_independently_computed_losses(
    teacher_export: Path,
) -> None:
    method = _method(teacher_export, w_feature=1.0, w_relational=0.5, w_patch=2.0)
    method.train()
    ref = timm_teacher(teacher_export)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    method.queue.push(torch.randn(4, 192))  # type: ignore[union-attr]
    anchors = method.queue.anchors(x).clone()  # type: ignore[union-attr]
    out = method({"views": [x]})
    with torch.no_grad():
        tokens = ref.forward_features(x)  # (B, 1 + 16, 192), final norm applied
        fmap = method.backbone.forward_features(x)
        z = method.projector(method.backbone.forward_head(fmap))
        feature = feature_loss(z, tokens[:, 0])
        relational = relational_loss(z, tokens[:, 0], anchors, 0.2, 0.01)
        patch = patch_loss(method.patch_proj(fmap), tokens[:, 1:], (4, 4))
    assert float(out["feature"]) == pytest.approx(float(feature), rel=1e-5)
    assert float(out["relational"]) == pytest.approx(float(relational), rel=1e-5)
    assert float(out["patch"]) == pytest.approx(float(patch), rel=1e-5)
    expected = float(feature + 0.5 * relational + 2 * patch)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    # the current teacher embeddings were queued after the loss
    assert method.queue.filled == 7  # type: ignore[union-attr]
    assert torch.allclose(method.queue.data[4:7], tokens[:, 0], atol=1e-5)  # type: ignore[union-attr]


def test_teacher_stays_out_of_the_module_tree_and_never_moves(teacher_export: Path) -> None:
    method = _method(teacher_export, w_relational=1.0, w_patch=1.0)
    names = [n for n, _ in method.named_parameters()] + list(method.state_dict())
    assert names and all(n.startswith(("backbone.", "projector.", "patch_proj.")) for n in names)
    teacher_params = list(method.teacher.model.parameters())
    assert not any(p.requires_grad for p in teacher_params)
    assert {id(p) for p in teacher_params}.isdisjoint(id(p) for p in method.parameters())
    before = method.teacher.sha256()
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    for _ in range(2):
        out = method({"views": [torch.randn(2, 3, 32, 32)]})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in teacher_params)
    assert method.teacher.sha256() == before
    file_teacher = timm_teacher(teacher_export)
    for (n, p), (_, q) in zip(
        method.teacher.model.state_dict().items(), file_teacher.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n
    # the checkpointed hash is checked on resume; another teacher is refused
    state = method.extra_state()
    assert bytes(state["teacher_sha256"].tolist()) == before
    method.load_extra_state(state)
    with pytest.raises(ValueError, match="teacher's weights differ"):
        method.load_extra_state(dict(state, teacher_sha256=torch.zeros(32, dtype=torch.uint8)))


def _fake_finetune_run(run: Path) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A stage-0 DeepSpeed checkpoint of a fine-tuning run: backbone + 10-class head."""
    torch.manual_seed(3)
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8)
    head = torch.nn.Linear(192, 10)
    module = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    module.update({"head.weight": head.weight.detach(), "head.bias": head.bias.detach()})
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    torch.save({"module": module}, ckpt / "mp_rank_00_model_states.pt")
    model = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8}
    config = {"model": model, "method": {"name": "finetune", "global_pool": "avg"}}
    (ckpt / "meta.json").write_text(json.dumps({"config": config, "step": 1, "world_size": 1}))
    (ckpt / "COMPLETE").write_text("1\n")
    return module, vit.eval()


def test_logit_distillation_from_a_finetuned_checkpoint(
    tmp_path: Path, teacher_export: Path
) -> None:
    module, vit = _fake_finetune_run(tmp_path / "ft")
    teacher = load_teacher(str(tmp_path / "ft"))
    assert teacher.num_classes == 10 and teacher.head_pool == "avg"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        logits = F.linear(tokens[:, 1:].mean(1), module["head.weight"], module["head.bias"])
    assert torch.allclose(teacher(x).logits, logits, atol=1e-5)  # type: ignore[arg-type]
    method = _method(tmp_path / "ft", w_feature=0.0, w_logit=1.0, logit_temp=2.0)
    method.eval()
    out = method({"views": [x]})
    with torch.no_grad():
        pooled = method.backbone(x)
        expected = logit_loss(method.logit_head(pooled), logits, 2.0)
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="classification head"):
        _method(teacher_export, w_logit=1.0)


@pytest.mark.parametrize("center", [0.0, 0.9])
def test_cached_teacher_gives_the_online_losses(
    tmp_path: Path, teacher_export: Path, center: float
) -> None:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = timm_teacher(teacher_export)
    with torch.no_grad():
        cls = ref.forward_features(x)[:, 0]  # (3, 192)
    feats = np.zeros((10, 192), dtype=np.float32)
    ids = torch.tensor([7, 2, 9])
    feats[ids.numpy()] = cls.numpy()
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / CACHE_FEATURES, feats)
    (cache / CACHE_META).write_text(json.dumps({"teacher_sha256": "ab" * 32}))
    online = _method(teacher_export, w_relational=1.0, teacher_center=center)
    cached = _method(teacher_export, w_relational=1.0, cache=str(cache), teacher_center=center)
    assert cached.teacher is None and isinstance(cached.cache, TeacherCache)
    for _ in range(2):  # the second step uses the queue filled by the first
        a = online({"views": [x]})
        b = cached({"views": [x], "sample_id": ids})
        for key in ("loss", "feature", "relational"):
            assert float(a[key].detach()) == pytest.approx(float(b[key].detach()), rel=1e-5), key
    assert bytes(cached.extra_state()["teacher_sha256"].tolist()) == bytes.fromhex("ab" * 32)
    with pytest.raises(ValueError, match="sample_id"):
        cached({"views": [x]})


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"teacher": ""}, "method.teacher"),
        ({"teacher_pool": "max"}, "teacher_pool"),
        ({"w_feature": 0.0}, "at least one"),
        ({"cache": "c", "w_patch": 1.0}, "online teacher"),
        ({"feature_loss": "l2"}, "feature_loss"),
        ({"teacher_view": "strong"}, "teacher_view"),
    ],
)
def test_config_mistakes_are_one_line_errors(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistilConfig(**{"teacher": "t", **kw})
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"method": {"name": "distil", "teacher": "t", **kw}})


def test_loader_sample_id_is_the_position_in_the_shard_index(tmp_path: Path) -> None:
    """Cached features are keyed by batch["sample_id"]: the row the evaluation reader numbers."""
    from vitssl.data_pipelines.labelled import LabelledReader
    from vitssl.data_pipelines.loader import build_loader
    from vitssl.data_pipelines.synthetic import write_default_dataset
    from vitssl.data_pipelines.transforms import build_transform

    write_default_dataset(tmp_path, train_per_class=3, val_per_class=1, img_size=32, shard_size=8)
    shards = ",".join(sorted(str(p) for p in (tmp_path / "train").glob("*.tar")))
    loader = build_loader(
        shards,
        transform=build_transform("eval", 32),
        micro_batch=4,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
    )
    reader = LabelledReader(shards, 32)
    seen: list[int] = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for batch in loader:
            ids = batch["sample_id"].tolist()
            assert torch.equal(batch["views"][0], reader.read(ids)["image"])
            seen += ids
    assert set(seen) <= set(range(30)) and len(set(seen)) > 20


def test_teacher_center_subtracts_a_running_mean_of_the_teacher_embeddings(
    teacher_export: Path,
) -> None:
    """method.teacher_center=m: the losses see t - c with c <- m c + (1 - m) mean(t), updated
    before use in training and frozen in eval; the centre is checkpointed."""
    method = _method(teacher_export, w_feature=1.0, w_relational=1.0, teacher_center=0.9)
    method.train()
    ref = timm_teacher(teacher_export)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]
    center = torch.zeros(1, 192)
    for x in batches:
        anchors = method.queue.anchors(x).clone()  # type: ignore[union-attr]
        out = method({"views": [x]})
        with torch.no_grad():
            t = ref.forward_features(x)[:, 0]
            center = 0.9 * center + 0.1 * t.mean(dim=0, keepdim=True)
            z = method.projector(method.backbone.forward_head(method.backbone.forward_features(x)))
        # the student/projector moved nothing (no optimizer step): z is the forward's
        assert float(out["feature"]) == pytest.approx(float(feature_loss(z, t - center)), rel=1e-5)
        expected = relational_loss(z, t - center, anchors, 0.2, 0.01)
        assert float(out["relational"]) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(method.center, center, rtol=1e-5, atol=1e-6)
    # eval: the centre is used but not updated
    method.eval()
    method({"views": [batches[0]]})
    torch.testing.assert_close(method.center, center, rtol=1e-5, atol=1e-6)
    # checkpointed and restored
    state = method.extra_state()
    fresh = _method(teacher_export, w_feature=1.0, w_relational=1.0, teacher_center=0.9)
    fresh.load_extra_state(state)
    torch.testing.assert_close(fresh.center, center, rtol=1e-5, atol=1e-6)
    # off by default: the raw embeddings are the targets (test above)
    assert _method(teacher_export).center is None
