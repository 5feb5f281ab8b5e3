from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitssl.data_pipelines.make_shards import assign_shards, main, parse_bytes, verify_shards
from vitssl.data_pipelines.tar_samples import read_samples


def save_image(path: Path, seed: int, size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(
        path, format=fmt
    )


def make_image_folder(root: Path, per_class: dict[str, int]) -> None:
    seed = 0
    for name, count in per_class.items():
        for i in range(count):
            save_image(root / name / f"{i:03d}.jpg", seed)
            seed += 1


def shard_samples(out: Path) -> list[tuple[str, str, int | None, bytes]]:
    """(shard, key, label, image) of every sample, read back independently with tarfile."""
    index = json.loads((out / "index.json").read_text())
    rows = []
    for entry in index["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(out / entry["name"]) as tar:
            for info in tar.getmembers():
                key, ext = info.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        assert len(members) == entry["samples"]
        for key, m in members.items():
            rows.append((entry["name"], key, int(m["cls"]) if "cls" in m else None, m["jpg"]))
    return rows


def test_image_folder_labels_and_counts(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "in", {"cat": 5, "ant": 3, "dog": 4})
    assert (
        main(
            [
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "out"),
                "--max-samples",
                "5",
                "--workers",
                "2",
                "--verify",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["classes"] == ["ant", "cat", "dog"]
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2] and index["num_samples"] == 12
    rows = shard_samples(tmp_path / "out")
    by_key = {key: (label, data) for _, key, label, data in rows}
    assert by_key["cat_003"][0] == 1 and by_key["ant_000"][0] == 0
    assert (
        by_key["dog_002"][1] == (tmp_path / "in" / "dog" / "002.jpg").read_bytes()
    )  # original bytes


def test_shards_do_not_depend_on_worker_count(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "in", {"a": 6, "b": 6})
    for workers in ("1", "2"):
        main(
            [
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / workers),
                "--max-samples",
                "4",
                "--workers",
                workers,
                "--shuffle-seed",
                "5",
            ]
        )
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "2").iterdir())
    for name in names:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_flat_folder_with_png_and_corrupt_input(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for i in range(4):
        save_image(tmp_path / "in" / f"img{i}.jpg", i)
    save_image(tmp_path / "in" / "pic.png", 9, fmt="PNG")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert "broken" in capsys.readouterr().out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert (
        index["classes"] is None and index["num_samples"] == 5 and index["unreadable"] == ["broken"]
    )
    rows = shard_samples(tmp_path / "out")
    assert all(label is None for _, _, label, _ in rows)
    png = next(data for _, key, _, data in rows if key == "pic")
    assert Image.open(io.BytesIO(png)).format == "JPEG"  # converted


def test_csv_with_class_names_and_tar_gz_input(tmp_path: Path) -> None:
    for i in range(6):
        save_image(tmp_path / "imgs" / f"{i}.jpg", i)
    rows = ["path,label"] + [f"imgs/{i}.jpg,{'zebra' if i % 2 else 'apple'}" for i in range(6)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert main([str(tmp_path / "list.csv"), "--out", str(tmp_path / "csv_out")]) == 0
    index = json.loads((tmp_path / "csv_out" / "index.json").read_text())
    assert index["classes"] == ["apple", "zebra"] and index["num_samples"] == 6
    labels = {key: label for _, key, label, _ in shard_samples(tmp_path / "csv_out")}
    assert labels == {f"imgs_{i}": i % 2 for i in range(6)}

    make_image_folder(tmp_path / "folder" / "train", {"x": 2, "y": 3})
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "folder" / "train", arcname="train")
    assert (
        main([str(tmp_path / "data.tar.gz"), "--out", str(tmp_path / "tar_out"), "--prefix", "val"])
        == 0
    )
    index = json.loads((tmp_path / "tar_out" / "index.json").read_text())
    assert index["classes"] == ["x", "y"] and index["shards"][0]["name"] == "val-000000.tar"
    assert sorted(label for _, _, label, _ in shard_samples(tmp_path / "tar_out")) == [
        0,
        0,
        1,
        1,
        1,
    ]


def test_bounded_by_bytes_and_resize(tmp_path: Path) -> None:
    for i in range(10):
        save_image(tmp_path / "in" / "c" / f"{i}.jpg", i, size=(120, 80))
    assert (
        main(
            [
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "out"),
                "--max-bytes",
                "40KB",
                "--max-samples",
                "100",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_samples"] == 10 and len(index["shards"]) > 1
    for entry in index["shards"]:
        with tarfile.open(tmp_path / "out" / entry["name"]) as tar:
            members = sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers())
        assert members <= 40_000  # members; the file adds tar's end blocks (10 KiB records)
        assert entry["bytes"] == (tmp_path / "out" / entry["name"]).stat().st_size
    assert (
        main(
            [
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "small"),
                "--resize-shorter",
                "40",
                "--jpeg-quality",
                "80",
                "--max-bytes",
                "20KB",
            ]
        )
        == 0
    )
    for _, _, _, data in shard_samples(tmp_path / "small"):
        assert Image.open(io.BytesIO(data)).size == (60, 40)


def test_assign_shards_bounds() -> None:
    assert assign_shards([10] * 7, 3, None) == [range(0, 3), range(3, 6), range(6, 7)]
    assert assign_shards([10, 10, 25, 5, 50], None, 30) == [range(0, 2), range(2, 4), range(4, 5)]
    assert parse_bytes("500MB") == 500_000_000 and parse_bytes("2KiB") == 2048


def test_verify_finds_a_corrupt_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_image_folder(tmp_path / "in", {"a": 4})
    main([str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    shard = tmp_path / "out" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        info = [m for m in tar.getmembers() if m.name.endswith(".jpg")][1]
    raw = bytearray(shard.read_bytes())
    raw[info.offset_data : info.offset_data + info.size] = b"\x00" * info.size  # destroy one image
    shard.write_bytes(bytes(raw))
    assert main(["--verify-only", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "unreadable train-000000.tar/" + info.name.split(".")[0] in out and "FAILED" in out
    report = verify_shards(tmp_path / "out")
    assert report.found == report.expected == 4 and len(report.unreadable) == 1
    found = [i for i, s in read_samples(str(shard), 0, None, lambda _: True, False)]
    assert found == [0, 1, 2, 3]


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: input not found: {tmp_path / 'nope'}"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no images found" in capsys.readouterr().err


def test_all_paths_missing_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A list whose every image is missing wrote 0 samples and exited 0; now it is an error."""
    listing = tmp_path / "list.csv"
    listing.write_text("".join(f"{tmp_path / f'gone{i}.jpg'},cat\n" for i in range(3)))
    out = tmp_path / "out"
    assert main([str(listing), "--out", str(out), "--workers", "1"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "wrote 0 samples" in err[0] and "3 inputs" in err[0], err
    assert "gone" in err[0]
    assert not list(out.glob("*.tar")) and not (out / "index.json").exists()
    assert "wrote 0 samples" not in captured.out


def test_restart_markers_rewrite_losslessly(tmp_path: Path) -> None:
    """--restart-markers (opt-in): every JPEG rewritten with a restart marker per MCU, the
    same pixels as the original; the PNG converted as always; the option in the index."""
    from vitssl.data_pipelines import decode

    if not decode.region_decoder_available():
        pytest.skip("the _jpeg_region extension is not built (no C compiler or libjpeg headers)")
    make_image_folder(tmp_path / "in", {"a": 3, "b": 2})
    save_image(tmp_path / "in" / "b" / "png.png", 9, fmt="PNG")
    args = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--restart-markers"]
    assert main([*args, "--workers", "1", "--verify"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["options"]["restart_markers"] is True and index["num_samples"] == 6
    for _, key, _, data in shard_samples(tmp_path / "out"):
        assert b"\xff\xdd\x00\x04\x00\x01" in data  # DRI: a restart interval of one MCU
        name = key.split("_", 1)[1]
        source = tmp_path / "in" / key.split("_")[0] / f"{name}.{'png' if name == 'png' else 'jpg'}"
        original = np.asarray(Image.open(source).convert("RGB"))
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        if name != "png":  # JPEG in, the same DCT coefficients out
            assert source.read_bytes() != data and np.array_equal(pixels, original)
