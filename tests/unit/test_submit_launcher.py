"""slurm.submit --launcher submitit: time limits and resources in submitit's terms."""

from __future__ import annotations

import pytest

from vitssl.slurm.submit import main, minutes, parse_args, submitit_options


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("90", 90),
        ("0:05", 1),  # MM:SS: five seconds, rounded up to a minute
        ("01:30:00", 90),
        ("1:30:01", 91),
        ("2-3", 2 * 1440 + 3 * 60),
        ("2-00:10", 2 * 1440 + 10),
        ("1-01:00:30", 1440 + 60 + 1),
    ],
)
def test_slurm_time_limits_in_minutes(limit: str, expected: int) -> None:
    # sbatch(1), --time: "minutes", "minutes:seconds", "hours:minutes:seconds",
    # "days-hours", "days-hours:minutes" and "days-hours:minutes:seconds"
    assert minutes(limit) == expected


def test_a_bad_time_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="--time"):
        minutes("1:2:3:4")


def test_submitit_options_follow_the_command_line() -> None:
    args = parse_args(
        ["--launcher", "submitit", "--template", "pretrain_single_node", "--gpus-per-node", "8",
         "--time", "24:00:00", "--partition", "p", "--", "mae_vit_base"]
    )  # fmt: skip
    opts = submitit_options(args)
    assert opts["tasks_per_node"] == 8 and opts["gpus_per_node"] == 8
    assert opts["timeout_min"] == 1440 and opts["slurm_partition"] == "p"
    assert opts["slurm_signal_delay_s"] == 120


def test_submitit_refuses_array_templates(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("submitit", reason="needs submitit (extra 'submitit')")
    code = main(["--launcher", "submitit", "--template", "eval_array", "--", "sweep.txt"])
    assert code == 2
    assert "submitit runs the templates" in capsys.readouterr().err
