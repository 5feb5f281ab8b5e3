"""Where shards are read from: local files, ``pipe:`` commands, ``http(s)://``, ``s3://``.

Local paths (and ``file://``) open as seekable files, so the tar reader jumps over the members
it does not want. Everything else is a forward-only stream: the tar reader reads and discards
the bytes of unwanted members (``tar_samples.iter_members``), which is what resume needs.

- ``pipe:CMD`` runs ``CMD`` through the shell and reads its standard output, as webdataset's
  ``gopen`` does. Only shard specs the user wrote may be pipes: an index fetched from a server
  is refused if it names one (data must not run commands).
- ``http(s)://`` uses the standard library (``urllib``): a sequential GET needs no more, and
  fsspec's HTTP backend would add aiohttp.
- ``s3://bucket/key`` uses boto3 (optional extra ``s3``), which reads the endpoint and
  credentials from the usual AWS settings (``AWS_ENDPOINT_URL`` for MinIO, Ceph or moto).
- Any other ``scheme://`` goes to fsspec when it has a backend for it (``gs://``, ``hf://``).
"""

from __future__ import annotations

import io
import os
import posixpath
import subprocess
import urllib.error
import urllib.request
from typing import IO
from urllib.parse import urlparse

LOCAL_READ_SIZE = 1 << 20
HTTP_TIMEOUT_S = 60.0


def scheme(url: str) -> str:
    """``""`` for a local path, else ``pipe``, ``http``, ``https``, ``s3``, ``file``..."""
    if url.startswith("pipe:"):
        return "pipe"
    parsed = urlparse(url)
    return parsed.scheme if "://" in url and len(parsed.scheme) > 1 else ""


def is_local(url: str) -> bool:
    return scheme(url) in ("", "file")


def local_path(url: str) -> str:
    return urlparse(url).path if scheme(url) == "file" else url


def parent(url: str) -> str | None:
    """The folder holding ``url`` (where its index lives). For a pipe, the folder of the
    location its command ends with (``pipe:curl -s https://host/d/x.tar``), if it ends with one.
    """
    kind = scheme(url)
    if kind == "pipe":
        words = url[len("pipe:") :].split()
        last = words[-1] if words else ""
        return parent(last) if scheme(last) or os.path.isfile(last) else None
    if kind in ("", "file"):
        return os.path.dirname(local_path(url))
    parsed = urlparse(url)
    return parsed._replace(path=posixpath.dirname(parsed.path), query="", fragment="").geturl()


def join(folder: str, name: str) -> str:
    """``name`` (a file name from an index, or an absolute URL) inside ``folder``."""
    if scheme(name):
        return name
    if is_local(folder):
        return os.path.join(local_path(folder), name)
    return folder.rstrip("/") + "/" + name


def check_name_from_index(name: str, index: str) -> None:
    """Names listed in an index may be relative paths or http(s)/s3 URLs, never commands."""
    if scheme(name) == "pipe" or (scheme(name) and not is_local(index) and is_local(name)):
        raise ValueError(f"{index} lists {name!r}: an index may not name commands or local files")


class _PipeReader(io.RawIOBase):
    """Standard output of a shell command; a failed command is an ``OSError`` at its end."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        assert self.proc.stdout is not None
        n = self.proc.stdout.readinto(buffer)  # type: ignore[attr-defined]
        if not n:
            status = self.proc.wait()
            if status != 0:
                raise OSError(f"pipe:{self.command} exited with status {status}")
        return n or 0

    def close(self) -> None:
        if self.proc.poll() is None:  # stopped early (the slot ends inside the shard)
            self.proc.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc.wait()
        super().close()


def _s3_body(url: str) -> IO[bytes]:
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise ValueError(f"{url}: s3:// shards need boto3 (pip install 'vitssl[s3]')") from None
    parsed = urlparse(url)
    try:
        response = boto3.client("s3").get_object(Bucket=parsed.netloc, Key=parsed.path[1:])
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise FileNotFoundError(f"{url}: not found") from None
        raise OSError(f"{url}: {exc}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise OSError(f"{url}: {exc}") from None
    return response["Body"]


def open_stream(url: str) -> IO[bytes]:
    """A binary file object for ``url``: seekable for local files, forward-only otherwise.

    Raises ``FileNotFoundError`` when the object does not exist, ``OSError`` when it cannot be
    reached, ``ValueError`` for a scheme nothing here can read.
    """
    kind = scheme(url)
    if kind in ("", "file"):
        return open(local_path(url), "rb", buffering=LOCAL_READ_SIZE)
    if kind == "pipe":
        return io.BufferedReader(_PipeReader(url[len("pipe:") :]), LOCAL_READ_SIZE)
    if kind in ("http", "https"):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{url}: HTTP 404") from None
            raise OSError(f"{url}: HTTP {exc.code}") from None
    if kind == "s3":
        return _s3_body(url)
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot read {url}: no reader for {kind}:// ({exc})") from None


def read_small(url: str) -> bytes | None:
    """The whole content of a small object (an index), or None when it does not exist."""
    try:
        with open_stream(url) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {url}: {exc}") from None
