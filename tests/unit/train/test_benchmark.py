"""vitssl.train.benchmark: the reference side trains, and the table reports per-round ratios."""

from __future__ import annotations

import statistics

import torch

from vitssl.models.pos_embed import sincos_2d
from vitssl.train.benchmark import MAESetup, report
from vitssl.train.mae_reference import ReferenceMAE, sincos_2d_reference


def test_reference_sincos_is_ours() -> None:
    ours = sincos_2d(64, 4, cls_token=True).numpy()
    torch.testing.assert_close(
        torch.from_numpy(sincos_2d_reference(64, 4, True)).float(), torch.from_numpy(ours)
    )


def test_reference_step_updates_the_reference_model() -> None:
    setup = MAESetup(
        img_size=16, patch_size=4, decoder_dim=32, decoder_depth=1, decoder_heads=2, batch=2
    )
    step = setup.reference_step()
    cells = step.__closure__ or ()
    ref = next(c.cell_contents for c in cells if isinstance(c.cell_contents, ReferenceMAE))
    before = ref.decoder_pred.weight.detach().clone()
    step()
    assert not torch.equal(before, ref.decoder_pred.weight)


def test_report_gives_each_round_and_the_median_ratio() -> None:
    runs = {
        "reference": [(100.0, 0.01), (80.0, 0.01), (120.0, 0.01)],
        "project": [(130.0, 0.008), (120.0, 0.008), (120.0, 0.008)],
        "fwd": [10**9],
    }
    text = report(MAESetup(), runs, peak=1.0)
    ratios = [1.3, 1.5, 1.0]
    for r in ratios:
        assert f"{r:.2f}x" in text
    assert f"**{statistics.median(ratios):.2f}x**" in text
    assert "| median | 100.0 | 120.0 |" in text
