from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vitssl.data_pipelines.synthetic import CLASSES, STYLE, main, write_default_dataset


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_default_dataset(
        tmp_path / "a", train_per_class=6, val_per_class=2, img_size=16, shard_size=25, workers=2
    )
    write_default_dataset(
        tmp_path / "b", train_per_class=6, val_per_class=2, img_size=16, shard_size=25
    )
    write_default_dataset(
        tmp_path / "c", train_per_class=6, val_per_class=2, img_size=16, shard_size=25, seed=1
    )
    assert a["train"]["num_samples"] == 60 and a["val"]["num_samples"] == 20
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert [str(f) for f in files] == [
        "train/index.json",
        "train/train-000000.tar",
        "train/train-000001.tar",
        "train/train-000002.tar",
        "train/wids-index.json",
        "val/index.json",
        "val/val-000000.tar",
        "val/wids-index.json",
    ]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a/train/train-000000.tar").read_bytes() != (
        tmp_path / "c/train/train-000000.tar"
    ).read_bytes()


def test_labels_balanced_images_vary(tmp_path: Path) -> None:
    index = write_default_dataset(tmp_path, train_per_class=5, val_per_class=1, img_size=32)
    assert index["train"]["classes"] == list(CLASSES)
    labels, images = Counter(), []
    with tarfile.open(tmp_path / "train" / "train-000000.tar") as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name.endswith(".cls"):
                labels[int(data)] += 1
            else:
                images.append(
                    np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
                )
    assert labels == {c: 5 for c in range(10)}
    assert images[0].shape == (32, 32, 3)
    assert min(np.abs(images[0] - im).mean() for im in images[1:]) > 5  # no duplicates


def test_cli_skips_when_up_to_date(tmp_path: Path, capsys) -> None:
    args = [
        "--out",
        str(tmp_path),
        "--train-per-class",
        "2",
        "--val-per-class",
        "1",
        "--img-size",
        "16",
    ]
    assert main(args) == 0
    stamp = (tmp_path / "train" / "index.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "train" / "index.json").stat().st_mtime_ns == stamp
    assert main([*args[:-1], "24"]) == 0  # other parameters: rewritten
    assert json.loads((tmp_path / "train" / "index.json").read_text())["options"]["img_size"] == 24


def test_cli_rewrites_a_folder_of_another_style(tmp_path: Path, capsys) -> None:
    args = ["--out", str(tmp_path), "--train-per-class", "2", "--val-per-class", "1"]
    assert main(args) == 0
    index_path = tmp_path / "train" / "index.json"
    index = json.loads(index_path.read_text())
    assert index["options"]["style"] == STYLE
    del index["options"]["style"]  # a folder drawn before the style was recorded (style 1)
    index_path.write_text(json.dumps(index))
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" not in capsys.readouterr().out
    assert json.loads(index_path.read_text())["options"]["style"] == STYLE
