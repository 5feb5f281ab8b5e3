"""The hand-written tar header parser against Python's tarfile, and its damage reports."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from vitssl.data_pipelines.tar_samples import BLOCK, iter_members, read_samples


def make_tar(fmt: int, seed: int = 0) -> bytes:
    """Directories, a symlink, long names (GNU 'L' or pax records) and empty members."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
        for i in range(40):
            depth = rng.randint(1, 150) if fmt != tarfile.USTAR_FORMAT else rng.randint(1, 90)
            name = "d" * depth + f"/sample{i:03d}.{'jpg' if i % 3 else 'cls'}"
            data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 2000]))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfile(fmt: int) -> None:
    raw = make_tar(fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [
            (m.name, tar.extractfile(m).read())  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isreg()
        ]
    got = [(m.name, read()) for m, read in iter_members(io.BytesIO(raw))]
    assert len(expected) == 40
    assert got == expected


def test_unread_members_are_skipped_and_reads_can_come_in_any_order() -> None:
    raw = make_tar(tarfile.GNU_FORMAT, seed=1)
    members = list(iter_members(io.BytesIO(raw)))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        last = tar.extractfile(tar.getmembers()[-1]).read()  # type: ignore[union-attr]
    assert members[-1][1]() == last  # read after the iteration went past it


def test_damaged_header_is_an_error_not_an_early_end() -> None:
    raw = bytearray(make_tar(tarfile.USTAR_FORMAT))
    members = list(iter_members(io.BytesIO(bytes(raw))))
    second = BLOCK * 2  # header of the first regular member after the dir and the link
    raw[second + 10] ^= 0xFF
    with pytest.raises(tarfile.TarError, match="bad checksum"):
        list(iter_members(io.BytesIO(bytes(raw))))
    assert len(members) == 40


def test_truncated_archive_raises_eof_and_read_samples_reports_positions() -> None:
    raw = make_tar(tarfile.USTAR_FORMAT)
    cut = raw[: len(raw) // 2 + 100]
    with pytest.raises(EOFError):
        for _, read in iter_members(io.BytesIO(cut)):
            read()


def test_read_samples_on_a_truncated_shard(tmp_path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(10):
            info = tarfile.TarInfo(f"k{i:02d}.jpg")
            info.size = 3000
            tar.addfile(info, io.BytesIO(bytes([i]) * 3000))
    path = tmp_path / "t.tar"
    path.write_bytes(buf.getvalue()[: (3000 // BLOCK + 2) * BLOCK * 4 + 700])
    out = list(read_samples(str(path), 0, 10, lambda _: True, with_labels=False))
    assert [i for i, _ in out] == list(range(10))
    good = [s for _, s in out if s is not None and s.error is None]
    assert [s.image for s in good] == [bytes([i]) * 3000 for i in range(4)]
    errors = [s.error or "" for _, s in out[4:] if s is not None]
    assert len(errors) == 6 and all("unreadable tar" in e or "fewer" in e for e in errors)
