"""The data benchmark's command runs end to end (tiny sizes: a check, not a measurement)."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitssl.data_pipelines import benchmark, decode


def jpeg_tar(path: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            out = io.BytesIO()
            pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(out, format="JPEG", quality=90)
            info = tarfile.TarInfo(f"img_{i:03d}.JPEG")
            info.size = len(out.getvalue())
            tar.addfile(info, io.BytesIO(out.getvalue()))
    return path


@pytest.mark.parametrize("extra", [[], ["--restart-markers"]], ids=["as-is", "restart-markers"])
def test_the_benchmark_prints_a_row_per_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str]
) -> None:
    if extra and not decode.region_decoder_available():
        pytest.skip("the _jpeg_region extension is not built (no C compiler or libjpeg headers)")
    images = jpeg_tar(tmp_path / "images.tar", 24)
    argv = [str(images), "--workers", "1", "--repeat", "2", "--rounds", "1", "--img-size", "32"]
    argv += ["--batch", "4", "--baseline-batch", "4", "--presets", "mae,dino", "--local-crops"]
    assert benchmark.main([*argv, "2", *extra]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| (mae|dino) ", line)]
    assert len(rows) == 4  # printed as measured, then in the table
    for row in rows:
        ratios = re.findall(r"(\d+\.\d+)x \(", row)
        assert len(ratios) == 2 and all(float(r) > 0 for r in ratios)
    assert ("restart markers" in out) == bool(extra)
