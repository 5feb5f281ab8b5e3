"""Library messages go through logging; entry points show them on stdout, rank 0 only."""

from __future__ import annotations

import logging

import pytest

from vitssl.train import cli


def _record(level: int) -> logging.LogRecord:
    return logging.LogRecord("train.x", level, __file__, 1, "msg", None, None)


@pytest.mark.parametrize("rank", [0, 1])
def test_progress_from_rank_zero_warnings_from_all(rank: int, monkeypatch) -> None:
    monkeypatch.setattr(cli, "rank", lambda: rank)
    keep = cli._RankZeroInfo()
    assert keep.filter(_record(logging.INFO)) == (rank == 0)
    assert keep.filter(_record(logging.WARNING))


def test_setup_logging_prints_plain_lines_on_stdout(monkeypatch, capsys) -> None:
    root = logging.getLogger()
    names = ["", *cli.OUR_PACKAGES]
    levels = {n: logging.getLogger(n).level for n in names}
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process
    try:
        cli.setup_logging()
        logging.getLogger("vitssl.train.evaluation.protocols").info("extracting val features")
        logging.getLogger("timm.models").info("a third-party progress line")
        logging.getLogger("timm.models").warning("a third-party warning")
        out = capsys.readouterr().out
        assert out == "extracting val features\na third-party warning\n"
        cli.setup_logging()  # idempotent: still one handler
        assert len(root.handlers) == 1
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)  # setLevel also clears logging's level cache
