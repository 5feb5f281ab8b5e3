"""Pictures of an encoder, as PNG files and TensorBoard images.

* :func:`embedding_plot`: t-SNE (scikit-learn) of features coloured by label; UMAP too when
  ``umap`` is importable.
* :func:`mae_reconstructions`: the MAE method rebuilt from a run's config and consolidated
  weights; rows of (original, masked input, reconstruction) from ``MAE.visualize``.
* :func:`neighbour_grid`: query images and their top-k retrieved bank images, each titled
  with its class (green: same class as the query, red: another).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitssl.models.methods.mae import denormalize


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(points: np.ndarray, labels: np.ndarray, classes: list[str] | None, title: str) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for c in np.unique(labels):
        sel = labels == c
        name = classes[c] if classes is not None and c < len(classes) else str(c)
        ax.scatter(points[sel, 0], points[sel, 1], s=6, color=cmap(int(c) % cmap.N), label=name)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(np.unique(labels)) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def embedding_plot(
    feats: torch.Tensor, labels: torch.Tensor, classes: list[str] | None, seed: int = 0
) -> dict[str, Any]:
    """{"tsne": figure[, "umap": figure]} of l2-normalised features."""
    from sklearn.manifold import TSNE

    x = torch.nn.functional.normalize(feats.float(), dim=1).numpy()
    y = labels.numpy()
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    figs = {"tsne": _scatter(points, y, classes, f"t-SNE of {len(x)} embeddings")}
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        return figs
    points = umap.UMAP(random_state=seed).fit_transform(x)
    figs["umap"] = _scatter(points, y, classes, f"UMAP of {len(x)} embeddings")
    return figs


def neighbour_grid(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    neighbours: torch.Tensor,
    neighbour_labels: torch.Tensor,
    classes: list[str] | None,
) -> Any:
    """``queries (Q, 3, H, W)`` and ``neighbours (Q, K, 3, H, W)`` (normalised) -> figure."""
    plt = _pyplot()
    q, k = neighbours.shape[:2]
    fig, axes = plt.subplots(q, k + 1, figsize=(1.3 * (k + 1), 1.4 * q), dpi=100, squeeze=False)

    def name(c: int) -> str:
        return classes[c] if classes is not None and c < len(classes) else str(c)

    for i in range(q):
        row = [(queries[i], int(query_labels[i]))] + [
            (neighbours[i, j], int(neighbour_labels[i, j])) for j in range(k)
        ]
        for j, (img, lab) in enumerate(row):
            ax = axes[i, j]
            ax.imshow(denormalize(img.unsqueeze(0).float())[0].permute(1, 2, 0).numpy())
            colour = "black" if j == 0 else ("green" if lab == row[0][1] else "red")
            ax.set_title(("query: " if j == 0 else "") + name(lab), fontsize=6, color=colour)
            ax.axis("off")
    fig.tight_layout()
    return fig


def mae_reconstructions(run_or_ckpt: str, imgs: torch.Tensor) -> torch.Tensor | None:
    """MAE's (original, masked, reconstruction) grid ``(3, H, W)``; None for other methods."""
    from vitssl.models.pretrained import load_strict
    from vitssl.models.registry import create_method
    from vitssl.train.checkpoint import read_meta
    from vitssl.train.config import config_from_dict
    from vitssl.train.weights import consolidated_state_dict, resolve_checkpoint

    path = Path(run_or_ckpt)
    if not path.is_dir():
        return None
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta["config"]["method"]["name"] != "mae":
        return None
    cfg = config_from_dict(meta["config"])
    cfg.model.drop_path_rate = 0.0
    method = create_method(cfg.method, cfg.model)
    load_strict(method, consolidated_state_dict(ckpt), str(ckpt), "mae")
    method.eval()
    return method.visualize({"views": [imgs]})


def save_figure(fig: Any, path: Path, writer: Any = None, tag: str | None = None) -> None:
    fig.savefig(path)
    if writer is not None:
        writer.add_figure(tag or path.stem, fig, close=False)
    _pyplot().close(fig)
