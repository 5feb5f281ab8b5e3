"""The raw-pixel baseline (``encoder.checkpoint=pixels``) against a k-NN written out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.evaluation.conftest import train_spec, val_spec
from vitssl.data_pipelines.labelled import LabelledReader
from vitssl.train.evaluation.config import load_eval_config
from vitssl.train.evaluation.encoders import load_encoder
from vitssl.train.evaluation.protocols import run_knn


def _images(spec: str) -> tuple[np.ndarray, np.ndarray]:
    reader = LabelledReader(spec, 32)
    batch = reader.read(list(range(reader.num_samples)))
    return batch["image"].double().flatten(1).numpy(), batch["label"].numpy()


def _knn_by_hand(bank: np.ndarray, bank_y: np.ndarray, q: np.ndarray, k: int, t: float) -> list:
    """DINO's weighted vote, one query at a time: cosine similarity, top k, exp(sim / T)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    preds = []
    for row in q / np.linalg.norm(q, axis=1, keepdims=True):
        sims = bank @ row
        top = np.argsort(-sims)[:k]
        votes: dict[int, float] = {}
        for i in top:
            votes[int(bank_y[i])] = votes.get(int(bank_y[i]), 0.0) + float(np.exp(sims[i] / t))
        preds.append(max(votes, key=lambda c: votes[c]))
    return preds


def test_pixel_encoder_is_the_flattened_image() -> None:
    enc = load_encoder("pixels", img_size=8)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = enc.model(torch.from_numpy(x))
    assert enc.kind == "pixels" and out.shape == (2, 192)
    assert np.array_equal(out.numpy(), x.reshape(2, -1))


@pytest.mark.parametrize("spec", ["pixels", "compare"])
def test_pixel_knn_matches_a_hand_written_knn(shapes: Path, tmp_path: Path, spec: str) -> None:
    over = [
        f"data.train={train_spec(shapes)}",
        f"data.val={val_spec(shapes)}",
        f"output_dir={tmp_path}",
        "knn.k=5",
        "data.num_workers=0",
    ]
    if spec == "pixels":
        over += ["encoder.checkpoint=pixels"]
    else:
        over += ["encoder.checkpoint=random:vit_tiny_patch16_224", "encoder.compare_pixels=true"]
    rows = {r["encoder"]: r for r in run_knn(load_eval_config("eval_default", over))}
    name = "pretrained" if spec == "pixels" else "pixels"
    bank, bank_y = _images(train_spec(shapes))
    q, q_y = _images(val_spec(shapes))
    preds = _knn_by_hand(bank, bank_y, q, k=5, t=0.07)
    expected = 100.0 * float(np.mean(np.array(preds) == q_y))
    assert 0.0 < expected < 100.0  # informative data: neither trivial nor hopeless
    # the evaluation averages in float32 (13/20 -> 64.9999976); one sample is 5 points here
    assert rows[name]["distance/top1"] == pytest.approx(expected, abs=1e-4)
    if spec == "compare":
        assert set(rows) == {"pretrained", "pixels"}
