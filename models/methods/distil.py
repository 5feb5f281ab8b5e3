"""Distillation of a frozen pretrained encoder (the teacher) into a small timm CNN (the student).

Shape of the method (``method.name = "distil"``):

* ``backbone`` is the student (``model.name``, e.g. ``mobilenetv3_large_100``; ``model.cifar_stem``
  gives it a stride-1 stem for 32 px, see models.students). Being the ``backbone``, it is what
  the trainer's export writes (``backbone.*`` -> ``encoder.safetensors`` + ``encoder.json``);
  the heads below are training-only and never exported.
* ``projector`` maps the pooled student embedding to the teacher's width (a linear layer, or
  ``Linear-BN-ReLU-Linear`` with ``proj_hidden_dim > 0``); ``patch_proj`` (1x1 conv, only with
  ``w_patch > 0``) maps the last feature map to the teacher's token width; ``logit_head`` (only
  with ``w_logit > 0``) gives student logits for a teacher with a classification head.
* The teacher (:class:`FrozenTeacher`) is a plain object, never a submodule: it is absent from
  ``parameters()``, ``state_dict()``, the optimizer, DeepSpeed's bf16 cast and ZeRO-3's
  partitioning, so every rank holds it whole and frozen (models.ema.FrozenModules: float32
  weights, computing in the inputs' precision: bf16 on bf16 runs, float32 on fp32). A SHA-256 of
  its weights is saved with every checkpoint (``extra_state``) and checked on resume.
* Offline mode (``method.cache``): the teacher's embeddings were computed once by
  ``python -m vitssl.train.cache_teacher`` on the deterministic ``eval`` view of every sample and
  stored beside the run as ``teacher.npy`` ``(N, D)``, row = the loader's stable ``sample_id``
  (position in the shard index); the teacher is then not loaded at all.

Loss: ``w_feature * feature + w_relational * relational + w_patch * patch + w_logit * logit``
(models.distill_losses); each part is logged. Teacher views: ``same`` (the student's view,
``views[0]``) or ``weak`` (``views[1]`` of a two-view preset, the student taking ``views[0]``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vitssl.models.backbones import create_backbone, is_vit
from vitssl.models.distill_losses import (
    FEATURE_LOSSES,
    PATCH_LOSSES,
    EmbeddingQueue,
    feature_loss,
    logit_loss,
    patch_loss,
    relational_loss,
)
from vitssl.models.distributed import all_reduce_mean_
from vitssl.models.ema import FrozenModules
from vitssl.models.heads import projection_mlp
from vitssl.models.methods.base import Batch, Method
from vitssl.models.pretrained import PretrainedWeights
from vitssl.models.registry import MethodConfig, register_method
from vitssl.models.students import student_features, student_shape
from vitssl.models.vit import forward_tokens, pool_tokens

POOLS = ("cls", "avg")
TEACHER_VIEWS = ("same", "weak")
CACHE_FEATURES = "teacher.npy"
CACHE_LOGITS = "logits.npy"
CACHE_META = "meta.json"


@dataclass
class DistilConfig(MethodConfig):
    """Teacher, heads and loss mix of distillation; defaults follow SEED (Fang et al. 2021)."""

    name: str = "distil"
    """The method's registry name. The student is ``model.name`` (a timm CNN)."""
    teacher: str = ""
    """Pretrained encoder: run directory, checkpoint directory, or export (encoder.safetensors
    or the directory holding it). May stay empty with ``cache``."""
    weight_fields: ClassVar[dict[str, bool]] = {"teacher": False}
    teacher_pool: str = "cls"
    """Teacher embedding: the class token (cls) or the mean of the patch tokens (avg)."""
    teacher_view: str = "same"
    """same: the teacher sees the student's view; weak: the loader's second view."""
    cache: str = ""
    """Directory of cached teacher embeddings (vitssl.train.cache_teacher); "" = online teacher."""
    proj_hidden_dim: int = 2048
    """Hidden width of the student's projection head; 0 = a single linear layer."""
    feature_loss: str = "cosine"
    """Feature regression: cosine (1 - cos) or smooth_l1."""
    patch_loss: str = "cosine"
    """Patch-token distillation: cosine or mse."""
    w_feature: float = 1.0
    """Weight of the feature regression."""
    w_relational: float = 0.0
    """Weight of SEED's relational (similarity distribution) loss."""
    w_patch: float = 0.0
    """Weight of patch-token distillation (online teacher only)."""
    w_logit: float = 0.0
    """Weight of logit distillation (needs a teacher with a classification head)."""
    queue_size: int = 65536
    """Teacher embeddings kept for the relational loss (SEED: 65536 on ImageNet)."""
    student_temp: float = 0.2
    """Softmax temperature of the student's similarities (relational loss)."""
    teacher_temp: float = 0.01
    """Softmax temperature of the teacher's similarities (sharper than the student's)."""
    logit_temp: float = 4.0
    """Temperature of logit distillation (the loss is scaled by its square)."""
    teacher_center: float = 0.0
    """EMA rate of a running mean of the teacher embeddings (over all ranks), subtracted from
    them before the feature and relational losses; 0: off, 0.9: DINO's centre. The embeddings
    of a self-supervised ViT share a large common direction: a cosine regression can match
    that direction without learning what tells images apart; centred targets cannot."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher and not self.cache:
            raise ValueError("method.teacher (or method.cache) must name the teacher")
        if self.teacher_pool not in POOLS:
            raise ValueError(f"method.teacher_pool must be one of {POOLS}")
        if self.teacher_view not in TEACHER_VIEWS:
            raise ValueError(f"method.teacher_view must be one of {TEACHER_VIEWS}")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"method.feature_loss must be one of {FEATURE_LOSSES}")
        if self.patch_loss not in PATCH_LOSSES:
            raise ValueError(f"method.patch_loss must be one of {PATCH_LOSSES}")
        weights = (self.w_feature, self.w_relational, self.w_patch, self.w_logit)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("method.w_* must be >= 0 with at least one > 0")
        if not 0.0 <= self.teacher_center < 1.0:
            raise ValueError("method.teacher_center must be in [0, 1)")
        if self.proj_hidden_dim < 0 or self.queue_size < 1:
            raise ValueError("method.proj_hidden_dim must be >= 0 and queue_size >= 1")
        if min(self.student_temp, self.teacher_temp, self.logit_temp) <= 0:
            raise ValueError("method.student_temp, teacher_temp and logit_temp must be > 0")
        if self.cache and self.w_patch > 0:
            raise ValueError("method.w_patch needs an online teacher (the cache holds no tokens)")
        if self.cache and self.teacher_view != "same":
            raise ValueError("method.cache was computed on the eval view: teacher_view=same")


# ---------------------------------------------------------------- the teacher


@dataclass
class TeacherOutput:
    embedding: torch.Tensor
    """Pooled teacher embedding ``(B, D)``, float32."""
    tokens: torch.Tensor | None = None
    """Patch tokens ``(B, gh * gw, D_tok)`` row-major, float32 (online teacher only)."""
    grid: tuple[int, int] | None = None
    """Token grid ``(gh, gw)``."""
    logits: torch.Tensor | None = None
    """Class logits ``(B, C)`` of a teacher with a classification head."""


def weights_sha256(modules: list[nn.Module]) -> bytes:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor of the state dicts."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class FrozenTeacher:
    """A frozen encoder (ViT or CNN) with an optional classification head; not an nn.Module."""

    def __init__(
        self,
        model: nn.Module,
        pool: str = "cls",
        head: nn.Linear | None = None,
        head_pool: str = "cls",
        source: str = "",
    ) -> None:
        # Plain objects, not submodules; float32 weights, the inputs' precision (models.ema).
        self.frozen = FrozenModules({"model": model} | ({"head": head} if head is not None else {}))
        self.model: Any = self.frozen["model"]  # timm's attributes, untyped
        self.head: nn.Linear | None = head
        self.pool = pool
        self.head_pool = head_pool
        self.source = source
        self.vit = is_vit(model)

    @property
    def dim(self) -> int:
        """Width of the pooled embedding (a CNN's ``conv_head`` output where it has one)."""
        if self.vit:
            return int(self.model.embed_dim)
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    @property
    def token_dim(self) -> int:
        return int(self.model.embed_dim if self.vit else self.model.num_features)

    @property
    def num_classes(self) -> int:
        return 0 if self.head is None else self.head.out_features

    def to(self, device: torch.device | str) -> None:
        self.frozen.to(device)

    def sha256(self) -> bytes:
        return weights_sha256([self.model] + ([self.head] if self.head is not None else []))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, tokens: bool = False) -> TeacherOutput:
        """Run on ``x: (B, 3, H, W)``; with ``tokens`` also return the patch tokens."""
        if not x.is_floating_point():
            x = x.float()
        self.frozen.follow(x)
        with self.frozen.autocast(x):
            if self.vit:
                seq = forward_tokens(self.model, x)  # type: ignore[arg-type]  # (B, 1 + L, D)
                emb = pool_tokens(seq, self.pool)
                patch = seq[:, 1:]  # (B, L, D)
                grid = tuple(self.model.patch_embed.grid_size)
                logits = self.head(pool_tokens(seq, self.head_pool)) if self.head else None
            else:
                fmap = self.model.forward_features(x)  # (B, C, h, w)
                emb = self.model.forward_head(fmap)
                patch = fmap.flatten(2).transpose(1, 2)  # (B, h * w, C)
                grid = (fmap.shape[2], fmap.shape[3])
                logits = self.head(emb) if self.head else None
        return TeacherOutput(
            emb.float(),
            patch.float() if tokens else None,
            (int(grid[0]), int(grid[1])) if tokens else None,
            logits.float() if logits is not None else None,
        )


def frozen_teacher(weights: PretrainedWeights, pool: str = "cls") -> FrozenTeacher:
    """The teacher of resolved ``weights`` (``vitssl.train.weights``; this module reads no files).

    Weights of a fine-tuning run bring its classification head, applied to the pooling it
    was trained with (``method.global_pool``).
    """
    model = weights.build()
    head: nn.Linear | None = None
    head_pool = weights.head_pool if is_vit(model) else "cls"  # a CNN's head reads its pool
    if weights.head is not None:
        w, b = weights.head["weight"].float(), weights.head["bias"].float()
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict({"weight": w, "bias": b})
    return FrozenTeacher(model, pool, head, head_pool, weights.source)


# ---------------------------------------------------------------- cached teacher embeddings


class TeacherCache:
    """Cached teacher outputs of ``train/cache_teacher.py``, read by sample id (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / CACHE_META
        if not meta_file.is_file():
            raise ValueError(f"method.cache={path}: no {CACHE_META} (run train.cache_teacher)")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        self.features = np.load(self.path / CACHE_FEATURES, mmap_mode="r")  # (N, D)
        logits = self.path / CACHE_LOGITS
        self.logits = np.load(logits, mmap_mode="r") if logits.is_file() else None

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        return 0 if self.logits is None else int(self.logits.shape[1])

    def sha256(self) -> bytes:
        return bytes.fromhex(self.meta["teacher_sha256"])

    def lookup(self, sample_id: torch.Tensor, device: torch.device) -> TeacherOutput:
        ids = sample_id.cpu().numpy()
        if ids.min() < 0 or ids.max() >= self.features.shape[0]:
            raise ValueError(
                f"sample id {int(ids.max())} outside the cache of {self.features.shape[0]} rows: "
                "was it written for these shards?"
            )
        emb = torch.from_numpy(np.asarray(self.features[ids], dtype=np.float32)).to(device)
        logits = None
        if self.logits is not None:
            logits = torch.from_numpy(np.asarray(self.logits[ids], dtype=np.float32)).to(device)
        return TeacherOutput(emb, logits=logits)


def check_cache(cache: str, shards: list[str], counts: list[int], img_size: int, pool: str) -> None:
    """Refuse a cache written for other shards, another resolution or another pooling."""
    meta = TeacherCache(cache).meta
    names = [Path(s).name for s in shards]
    if meta["shards"] != names or meta["counts"] != list(counts):
        raise ValueError(
            f"method.cache={cache} was written for other shards than data.train_shards"
        )
    if meta["img_size"] != img_size or meta["pool"] != pool:
        raise ValueError(
            f"method.cache={cache} holds img_size={meta['img_size']}, pool={meta['pool']}; "
            f"the run has model.img_size={img_size}, method.teacher_pool={pool}"
        )


# ---------------------------------------------------------------- the method


class Distil(Method):
    def __init__(
        self,
        cfg: DistilConfig,
        student: nn.Module,
        img_size: int,
        teacher: FrozenTeacher | None = None,
        cache: TeacherCache | None = None,
    ) -> None:
        super().__init__()
        if (teacher is None) == (cache is None):
            raise ValueError("give exactly one of an online teacher and a cache")
        self.cfg = cfg
        self.backbone = student
        shape = student_shape(student, img_size)
        source = teacher if teacher is not None else cache
        assert source is not None
        dim = source.dim
        if cfg.proj_hidden_dim:
            self.projector: nn.Module = projection_mlp(
                shape.embed_dim, cfg.proj_hidden_dim, dim, num_layers=2, last_bn=False
            )
        else:
            self.projector = nn.Linear(shape.embed_dim, dim)
        if cfg.w_patch > 0:
            assert teacher is not None  # the config refuses patch loss with a cache
            self.patch_proj = nn.Conv2d(shape.feature_dim, teacher.token_dim, kernel_size=1)
        if cfg.w_logit > 0:
            if source.num_classes == 0:
                raise ValueError(
                    "method.w_logit > 0 needs a teacher with a classification head "
                    "(a fine-tuning run); this teacher has none"
                )
            self.logit_head = nn.Linear(shape.embed_dim, source.num_classes)
        self.queue = EmbeddingQueue(cfg.queue_size, dim) if cfg.w_relational > 0 else None
        # float32 (1, D), a plain attribute like DINO's centre (checkpointed in extra_state)
        self.center = torch.zeros(1, dim) if cfg.teacher_center > 0 else None
        # Plain objects, not submodules: see the module docstring.
        self.teacher = teacher
        self.cache = cache

    @property
    def student(self) -> nn.Module:
        return self.backbone

    def teacher_to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Move the frozen teacher to ``device``; its weights keep their dtype (autocast)."""
        if self.teacher is not None:
            self.teacher.to(device)

    def teacher_sha256(self) -> bytes:
        source = self.teacher if self.teacher is not None else self.cache
        assert source is not None
        return source.sha256()

    def teacher_outputs(self, batch: Batch, tokens: bool) -> TeacherOutput:
        views = batch["views"]
        if self.cache is not None:
            if "sample_id" not in batch:
                raise ValueError("cached teacher features need the loader's batch['sample_id']")
            return self.cache.lookup(batch["sample_id"], views[0].device)
        assert self.teacher is not None
        if self.cfg.teacher_view == "weak":
            if len(views) < 2:
                raise ValueError("method.teacher_view=weak needs a two-view augmentation preset")
            return self.teacher(views[1], tokens)
        return self.teacher(views[0], tokens)

    def forward(self, batch: Batch) -> dict[str, Any]:
        cfg = self.cfg
        x = batch["views"][0]  # (B, 3, H, W)
        t = self.teacher_outputs(batch, tokens=cfg.w_patch > 0)
        fmap, pooled = student_features(self.backbone, x)  # (B, C, h, w), (B, E)
        z = self.projector(pooled)  # (B, D)
        target = self.centred(t.embedding)  # (B, D)
        parts: dict[str, torch.Tensor] = {}
        if cfg.w_feature > 0:
            parts["feature"] = feature_loss(z, target, cfg.feature_loss)
        if self.queue is not None:
            anchors = self.queue.anchors(target)
            parts["relational"] = relational_loss(
                z, target, anchors, cfg.student_temp, cfg.teacher_temp
            )
            if self.training:
                self.queue.push(target)
        if cfg.w_patch > 0:
            assert t.tokens is not None and t.grid is not None
            parts["patch"] = patch_loss(self.patch_proj(fmap), t.tokens, t.grid, cfg.patch_loss)
        if cfg.w_logit > 0:
            if t.logits is None:
                raise ValueError("method.w_logit > 0 but the teacher gave no logits")
            parts["logit"] = logit_loss(self.logit_head(pooled), t.logits, cfg.logit_temp)
        weights = {
            "feature": cfg.w_feature,
            "relational": cfg.w_relational,
            "patch": cfg.w_patch,
            "logit": cfg.w_logit,
        }
        loss = sum((weights[k] * v for k, v in parts.items()), torch.zeros((), device=x.device))
        out: dict[str, Any] = {"loss": loss, **{k: v.detach() for k, v in parts.items()}}
        out["embeddings"] = (z.detach().float(), target.detach())
        return out

    @torch.no_grad()
    def centred(self, embedding: torch.Tensor) -> torch.Tensor:
        """``embedding`` minus the running mean of the teacher embeddings (updated first, in
        training), or ``embedding`` itself when ``teacher_center`` is off."""
        if self.center is None:
            return embedding
        if self.center.device != embedding.device:
            self.center = self.center.to(embedding.device)
        if self.training:
            batch = all_reduce_mean_(embedding.float().mean(dim=0, keepdim=True))  # (1, D)
            m = self.cfg.teacher_center
            self.center = self.center * m + batch * (1 - m)
        return embedding.float() - self.center

    def extra_state(self) -> dict[str, torch.Tensor]:
        digest = torch.tensor(list(self.teacher_sha256()), dtype=torch.uint8)
        state = {"teacher_sha256": digest}
        if self.queue is not None:
            state.update(self.queue.state_dict())
        if self.center is not None:
            state["teacher_center"] = self.center.detach().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        saved = bytes(state["teacher_sha256"].tolist())
        if saved != self.teacher_sha256():
            raise ValueError(
                "the teacher's weights differ from those the checkpoint was trained with "
                f"(sha256 {saved.hex()[:12]} there, {self.teacher_sha256().hex()[:12]} now)"
            )
        if self.queue is not None:
            self.queue.load_state_dict(state)
        if self.center is not None:
            self.center = state["teacher_center"].to(self.center.device, torch.float32).clone()


@register_method("distil", DistilConfig)
def build_distil(
    cfg: DistilConfig, model_cfg: Any, weights: Mapping[str, PretrainedWeights]
) -> Distil:
    """The student is ``model.name`` with ``model.cifar_stem``; the teacher
    ``weights["teacher"]`` (``method.teacher``, resolved by the entry point)."""
    student = create_backbone(model_cfg, "student")
    if cfg.cache:
        return Distil(cfg, student, model_cfg.img_size, cache=TeacherCache(cfg.cache))
    with torch.random.fork_rng(devices=[]):  # the heads' init must not depend on the teacher
        teacher = frozen_teacher(weights["teacher"], cfg.teacher_pool)
    if teacher.vit:
        size = tuple(teacher.model.patch_embed.img_size)
        if size != (model_cfg.img_size, model_cfg.img_size):
            raise ValueError(
                f"method.teacher takes {size[0]} px images, model.img_size={model_cfg.img_size}"
            )
    return Distil(cfg, student, model_cfg.img_size, teacher=teacher)
