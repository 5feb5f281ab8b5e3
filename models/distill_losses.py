"""Distillation losses (pure functions) and the teacher-embedding queue of SEED.

* :func:`feature_loss`: regression of the projected student embedding on the teacher's
  (``1 - cos``, or smooth-L1 on the raw values).
* :func:`relational_loss`: SEED (Fang et al. 2021): over the teacher embeddings of a queue
  plus the current sample's own, the student's softmax similarity distribution (temperature
  ``student_temp``) is trained towards the teacher's (``teacher_temp``) by cross-entropy.
* :func:`patch_loss`: the student's last feature map (already projected to the teacher's width
  by a 1x1 conv) is bilinearly resized to the teacher's token grid and compared token by
  token (``1 - cos`` or MSE).
* :func:`logit_loss`: Hinton et al. (2015): ``T^2 KL(softmax(t / T) || softmax(s / T))``.

Every loss is computed in float32 and averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitssl.models.distributed import gather_no_grad

FEATURE_LOSSES = ("cosine", "smooth_l1")
PATCH_LOSSES = ("cosine", "mse")


def feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """``student, teacher: (B, D)`` -> scalar; ``teacher`` is treated as a constant."""
    s, t = student.float(), teacher.detach().float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(s, t, beta=1.0)
    raise ValueError(f"feature loss must be one of {FEATURE_LOSSES}, got {kind!r}")


def relational_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """SEED's loss; ``student, teacher: (B, D)``, ``queue: (K, D)`` teacher embeddings.

    The anchors of sample ``i`` are its own teacher embedding ``t_i`` followed by the queue;
    all vectors are l2-normalised, so the first teacher logit is ``1 / teacher_temp``.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    q = F.normalize(queue.detach().float(), dim=-1)
    logits_s = torch.cat([(s * t).sum(-1, keepdim=True), s @ q.T], dim=1) / student_temp
    logits_t = torch.cat([(t * t).sum(-1, keepdim=True), t @ q.T], dim=1) / teacher_temp
    target = F.softmax(logits_t, dim=1)  # (B, 1 + K)
    return -(target * F.log_softmax(logits_s, dim=1)).sum(dim=1).mean()


def patch_loss(
    student_map: torch.Tensor,
    teacher_tokens: torch.Tensor,
    grid: tuple[int, int],
    kind: str = "cosine",
) -> torch.Tensor:
    """``student_map: (B, D, h, w)``, ``teacher_tokens: (B, gh * gw, D)`` in row-major order."""
    gh, gw = grid
    _, n, d = teacher_tokens.shape
    if n != gh * gw or student_map.shape[1] != d:
        raise ValueError(
            f"patch distillation: {n} teacher tokens of width {d} vs grid {gh}x{gw} and "
            f"{student_map.shape[1]} student channels"
        )
    s = F.interpolate(student_map.float(), size=(gh, gw), mode="bilinear", align_corners=False)
    s = s.flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, gh * gw, D)
    t = teacher_tokens.detach().float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"patch loss must be one of {PATCH_LOSSES}, got {kind!r}")


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` averaged over the batch; ``student, teacher: (B, C)`` logits."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


class EmbeddingQueue:
    """A FIFO ring of the last ``size`` teacher embeddings of all ranks (float32, no grad).

    A plain object (not a buffer): it stays float32 under DeepSpeed's bf16 cast and outside
    ZeRO; the method saves it with ``extra_state()``. Only the filled part is ever used, so
    the first steps compare against fewer anchors instead of random vectors.
    """

    def __init__(self, size: int, dim: int) -> None:
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got {size}, {dim}")
        self.data = torch.zeros(size, dim)
        self.ptr = 0
        self.filled = 0

    @property
    def size(self) -> int:
        return self.data.shape[0]

    def anchors(self, like: torch.Tensor) -> torch.Tensor:
        """The filled rows ``(filled, D)`` on ``like``'s device (moves the queue there)."""
        if self.data.device != like.device:
            self.data = self.data.to(like.device)
        return self.data[: self.filled]

    @torch.no_grad()
    def push(self, x: torch.Tensor, gather: bool = True) -> None:
        """Append ``x: (B, D)`` of every rank (rank order), overwriting the oldest rows."""
        x = (gather_no_grad(x.detach().float().contiguous()) if gather else x.detach()).float()
        x = x[-self.size :].to(self.data.device)  # more rows than the queue: keep the newest
        idx = (self.ptr + torch.arange(x.shape[0], device=x.device)) % self.size
        self.data[idx] = x
        self.ptr = (self.ptr + x.shape[0]) % self.size
        self.filled = min(self.size, self.filled + x.shape[0])

    def state_dict(self, prefix: str = "queue.") -> dict[str, torch.Tensor]:
        return {
            prefix + "data": self.data.detach().cpu().clone(),
            prefix + "pos": torch.tensor([self.ptr, self.filled], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "queue.") -> None:
        data = state[prefix + "data"]
        if data.shape != self.data.shape:
            raise ValueError(f"saved queue {tuple(data.shape)} != {tuple(self.data.shape)}")
        self.data = data.to(device=self.data.device, dtype=torch.float32).clone()
        self.ptr, self.filled = (int(v) for v in state[prefix + "pos"].tolist())
