"""Supervised fine-tuning of a pretrained encoder, as a method of the one trainer.

MAE's fine-tuning recipe (He et al., 2022, appendix A.1): a linear head on the pooled
encoder output (with ``global_pool = "avg"``, MAE's and timm's ``global_pool='avg'``: the
final norm is dropped and a new ``fc_norm`` normalises the mean of the patch tokens), the
position embedding trained (loaded from pretraining, layer 0 of the decay, no weight
decay), layer-wise learning-rate decay (``lr_scale = layer_decay ** (L + 1 - i)``
for layer ``i``: 0 = patch/position/class embeddings, 1..L = blocks, L + 1 = final norm and
head), drop path (``model.drop_path_rate``), Mixup 0.8 / CutMix 1.0 with soft-target cross
entropy, label smoothing 0.1. Warm-up and cosine come from the trainer's schedule.

Optionally the encoder is frozen for the first ``freeze_epochs`` (head only: the encoder's
groups get learning-rate scale 0), after which only the last ``unfreeze_blocks`` blocks
(0 = all) train, at ``unfreeze_lr_scale`` times their layer-decay scale. Frozen parameters
still receive gradients (ZeRO partitions expect them), they only do not move.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from vitssl.models.backbones import create_backbone, embed, embed_dim, is_vit
from vitssl.models.methods.base import Batch, Method, StepContext
from vitssl.models.pretrained import PretrainedWeights
from vitssl.models.registry import MethodConfig, register_method

POOLS = ("cls", "avg")


@dataclass
class FinetuneConfig(MethodConfig):
    """Fine-tuning hyper-parameters; defaults are MAE's ViT recipe."""

    name: str = "finetune"
    init: str = ""
    """Run directory, checkpoint or encoder.safetensors to start from; "" = random init."""
    weight_fields: ClassVar[dict[str, bool]] = {"init": True}
    num_classes: int = 10
    """Classes of the head; a label >= num_classes is an error."""
    layer_decay: float = 0.75
    """Layer-wise learning-rate decay (1.0 = off)."""
    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)."""
    label_smoothing: float = 0.1
    """Label smoothing (with Mixup/CutMix it smooths the mixed targets)."""
    freeze_epochs: float = 0.0
    """Train only the head for this many epochs first (0 = off)."""
    unfreeze_blocks: int = 0
    """After the frozen phase, train only the last N blocks (0 = all blocks)."""
    unfreeze_lr_scale: float = 1.0
    """Extra learning-rate scale of the encoder after the frozen phase."""
    global_pool: str = "avg"
    """Pooled feature fed to the head: avg (mean of patch tokens, MAE) or cls."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2:
            raise ValueError("method.num_classes must be >= 2")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError("method.layer_decay must be in (0, 1]")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("method.mixup and method.cutmix must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("method.label_smoothing must be in [0, 1)")
        if self.freeze_epochs < 0 or self.unfreeze_blocks < 0 or self.unfreeze_lr_scale < 0:
            raise ValueError(
                "method.freeze_epochs, unfreeze_blocks and unfreeze_lr_scale must be >= 0"
            )
        if self.global_pool not in POOLS:
            raise ValueError(f"method.global_pool must be one of {POOLS}")


def layer_id(name: str, num_blocks: int) -> int:
    """MAE's ``get_layer_id_for_vit`` on our names (``backbone.blocks.3.attn...``)."""
    if name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")):
        return 0
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    return num_blocks + 1


class Finetune(Method):
    """``backbone`` (exported) + linear ``head``; logits from :meth:`logits`."""

    uses_labels = True

    def __init__(self, cfg: FinetuneConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        dim = embed_dim(backbone)
        if is_vit(backbone):
            vit: Any = backbone
            vit.pos_embed.requires_grad_(True)  # fixed sin-cos in pretraining, trained here
            if cfg.global_pool == "avg":
                # timm's use_fc_norm, on the backbone itself (timm's names: ``fc_norm.*``, no
                # ``norm.*``), so that the exported encoder is timm's global_pool='avg' model
                vit.norm = nn.Identity()
                vit.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init
        nn.init.zeros_(self.head.bias)
        self.num_blocks = len(backbone.blocks) if hasattr(backbone, "blocks") else 0  # type: ignore[arg-type]
        self.mixup: Mixup | None = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=cfg.num_classes,
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    @property
    def fc_norm(self) -> nn.Module | None:
        """The norm of the pooled tokens (avg pooling of a ViT), part of the backbone."""
        norm = getattr(self.backbone, "fc_norm", None)
        return norm if isinstance(norm, nn.LayerNorm) else None

    def logits(self, imgs: torch.Tensor) -> torch.Tensor:
        pool = self.cfg.global_pool if is_vit(self.backbone) else "cls"
        return self.head(embed(self.backbone, imgs, pool))  # (B, C); embed applies fc_norm

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        imgs, labels = batch["views"][0], batch["label"]
        top = int(labels.max())
        if top >= self.cfg.num_classes or int(labels.min()) < 0:
            raise ValueError(
                f"label {top} does not fit the head: method.num_classes={self.cfg.num_classes}"
            )
        target: torch.Tensor = labels
        if self.mixup is not None and self.training and imgs.shape[0] % 2 == 0:
            imgs, target = self.mixup(imgs, labels)  # target: (B, C) soft
        elif isinstance(self.criterion, SoftTargetCrossEntropy):
            target = F.one_hot(labels, self.cfg.num_classes).float()
        logits = self.logits(imgs)
        loss = self.criterion(logits.float(), target)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "train_top1_mixed": acc.detach()}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """One group per (layer, decay / no decay, head), tagged for the freeze schedule."""
        skip = self.no_weight_decay()
        top = self.num_blocks + 1
        groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if self.num_blocks:
                lid = layer_id(name, self.num_blocks)
            else:  # CNN: no per-block decay, encoder below the head
                lid = 0 if name.startswith("backbone.") else top
            decay = not (p.ndim <= 1 or name in skip or name.endswith(".bias"))
            head = name.startswith("head.")
            g = groups.setdefault(
                (lid, decay, head),
                {
                    "params": [],
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr_scale": self.cfg.layer_decay ** (top - lid) if self.num_blocks else 1.0,
                    "layer_id": lid,
                    "is_head": head,
                },
            )
            g["params"].append(p)
        return [groups[k] for k in sorted(groups)]

    def lr_scale(self, group: dict[str, Any], ctx: StepContext) -> float:
        scale = float(group.get("lr_scale", 1.0))
        if group.get("is_head") or self.cfg.freeze_epochs <= 0:
            return scale
        if ctx.epoch < self.cfg.freeze_epochs:
            return 0.0
        first_trained = self.num_blocks - self.cfg.unfreeze_blocks + 1  # layer ids of blocks
        if self.cfg.unfreeze_blocks and int(group.get("layer_id", 0)) < first_trained:
            return 0.0
        return scale * self.cfg.unfreeze_lr_scale


@register_method("finetune", FinetuneConfig)
def build_finetune(
    cfg: FinetuneConfig, model_cfg: Any, weights: Mapping[str, PretrainedWeights] | None = None
) -> Finetune:
    """``weights["init"]`` (resolved from ``method.init`` to fit ``model``) or a random init."""
    backbone = create_backbone(model_cfg)
    if weights and "init" in weights:
        weights["init"].load_into(backbone)
    return Finetune(cfg, backbone)
