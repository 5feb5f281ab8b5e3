"""Fill an sbatch template's ``#SBATCH`` lines from flags, then submit it (or print it).

    python -m vitssl.slurm.submit --template pretrain_single_node --nodes 1 --gpus-per-node 8 \\
        --time 24:00:00 --partition p --account a [--dry-run] -- RECIPE [overrides ...]

Only the options given on the command line change; the template's other lines stay as
they are. ``--gpus-per-node 0`` removes the GPU request (CPU-only runs; give
``--tasks-per-node`` then). The rendered script is written beside the logs (so that the
exact script of every job is kept) and submitted with ``sbatch``; the arguments after
``--`` go to the script. The job runs in ``--chdir``: by default the checkout this file is
in, or, for an installed package, the directory you submit from. The script's
``--export`` adds ``SSL_HOME`` (the folder holding ``slurm/``), from which the templates
source ``slurm/common.sh``, so a pip-installed package needs no checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parent
SSL_HOME = SLURM_DIR.parent  # holds slurm/: the checkout, or the installed vitssl/ package
IN_CHECKOUT = (SSL_HOME / "pyproject.toml").is_file()
TEMPLATES = sorted(p.stem for p in SLURM_DIR.glob("*.sbatch"))
_SBATCH_LINE = re.compile(r"^#SBATCH\s+--([A-Za-z0-9-]+)(?:[=\s]\s*(\S.*?))?\s*$")


@dataclass(frozen=True)
class Rendered:
    """A filled-in template and the ``sbatch`` arguments that submit it."""

    script: str
    script_args: list[str]


def template_path(name: str) -> Path:
    """A template by name (``pretrain_single_node``) or by path."""
    path = Path(name)
    if path.suffix == ".sbatch" and path.is_file():
        return path
    named = SLURM_DIR / f"{name}.sbatch"
    if named.is_file():
        return named
    raise ValueError(f"template {name!r} not found; choose one of {', '.join(TEMPLATES)}")


def sbatch_options(script: str) -> dict[str, str | None]:
    """The ``#SBATCH --option[=value]`` lines of a script, in order (flags map to None)."""
    options: dict[str, str | None] = {}
    for line in script.splitlines():
        m = _SBATCH_LINE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
    return options


def set_sbatch_options(script: str, options: dict[str, str | bool | None]) -> str:
    """Replace, add (after the last ``#SBATCH`` line) or remove (value False) options.

    A value of None writes a flag without a value (``#SBATCH --exclusive``).
    """
    lines = script.splitlines()
    pending = dict(options)
    out: list[str] = []
    last_sbatch = -1
    for line in lines:
        m = _SBATCH_LINE.match(line)
        if m and m.group(1) in pending:
            value = pending.pop(m.group(1))
            if value is False:
                continue
            line = _format_option(m.group(1), value)
        if line.startswith("#SBATCH"):
            last_sbatch = len(out)
        out.append(line)
    added = [_format_option(k, v) for k, v in pending.items() if v is not False]
    if last_sbatch < 0:  # no #SBATCH block: put it right after the shebang
        last_sbatch = 0 if out and out[0].startswith("#!") else -1
    out[last_sbatch + 1 : last_sbatch + 1] = added
    return "\n".join(out) + "\n"


def _format_option(name: str, value: str | bool | None) -> str:
    if value is None or value is True:
        return f"#SBATCH --{name}"
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"#SBATCH --{name}={text!r}: values must be non-empty, without spaces")
    return f"#SBATCH --{name}={text}"


def sweep_size(path: Path) -> int:
    """Number of runs in a sweep file: lines that are not blank and not # comments."""
    lines = path.read_text().splitlines()
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def options_from_args(args: argparse.Namespace) -> dict[str, str | bool | None]:
    """The ``#SBATCH`` changes asked for on the command line."""
    opts: dict[str, str | bool | None] = {}
    if args.job_name:
        opts["job-name"] = args.job_name
    if args.nodes is not None:
        if args.nodes < 1:
            raise ValueError("--nodes must be >= 1")
        opts["nodes"] = str(args.nodes)
    if args.gpus_per_node is not None:
        if args.gpus_per_node < 0:
            raise ValueError("--gpus-per-node must be >= 0")
        opts["gpus-per-node"] = str(args.gpus_per_node) if args.gpus_per_node else False
    tasks = args.tasks_per_node
    if tasks is None and args.gpus_per_node:
        tasks = args.gpus_per_node  # one task (training process) per GPU
    if tasks is not None:
        if tasks < 1:
            raise ValueError("--tasks-per-node must be >= 1")
        opts["ntasks-per-node"] = str(tasks)
    if args.cpus_per_task is not None:
        if args.cpus_per_task < 1:
            raise ValueError("--cpus-per-task must be >= 1")
        opts["cpus-per-task"] = str(args.cpus_per_task)
    for flag in ("time", "partition", "account", "qos", "mem", "array"):
        value = getattr(args, flag)
        if value:
            opts[flag] = value
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        key = key.lstrip("-")
        if not key:
            raise ValueError(f"--sbatch {item!r}: expected OPTION or OPTION=VALUE")
        opts[key] = value if sep else None
    return opts


def render(args: argparse.Namespace, log_dir: Path) -> Rendered:
    """Fill the template from ``args``; logs go to ``log_dir``, the job runs in --chdir."""
    path = template_path(args.template)
    script = path.read_text()
    opts = options_from_args(args)
    if "array" in sbatch_options(script) and "array" not in opts:
        if not args.script_args:
            raise ValueError(f"{path.name} needs a sweep file as its first argument")
        n = sweep_size(Path(args.script_args[0]))
        if n < 1:
            raise ValueError(f"sweep file {args.script_args[0]} has no runs")
        opts["array"] = f"0-{n - 1}"
    pattern = "%x-%A_%a.out" if "array" in sbatch_options(script) else "%x-%j.out"
    opts["output"] = str(log_dir / pattern)
    opts["chdir"] = str(Path(args.chdir).resolve())
    given = opts.get("export") or sbatch_options(script).get("export")
    opts["export"] = f"{given if isinstance(given, str) else 'ALL'},SSL_HOME={SSL_HOME}"
    return Rendered(set_sbatch_options(script, opts), list(args.script_args))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m vitssl.slurm.submit",
        description="Fill a slurm/ template's #SBATCH lines and submit it with sbatch.",
        epilog="Arguments after -- (a recipe and overrides) are passed to the script: list the"
        " recipes with python -m vitssl.train.recipes.",
    )
    p.add_argument("--template", required=True, help=f"one of {', '.join(TEMPLATES)}, or a path")
    p.add_argument("--job-name", help="--job-name (names the log file)")
    p.add_argument("--nodes", type=int, help="--nodes")
    p.add_argument("--gpus-per-node", type=int, help="--gpus-per-node (0: no GPUs)")
    p.add_argument("--tasks-per-node", type=int, help="--ntasks-per-node (default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int, help="--cpus-per-task (data loader workers)")
    p.add_argument("--time", help="--time limit, e.g. 24:00:00")
    p.add_argument("--partition", help="--partition")
    p.add_argument("--account", help="--account")
    p.add_argument("--qos", help="--qos")
    p.add_argument("--mem", help="--mem per node, e.g. 0 (all) or 500G")
    p.add_argument("--array", help="--array, e.g. 0-9%%2 (eval_array: default from sweep file)")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION[=VALUE]",
        help="any other #SBATCH option, e.g. --sbatch constraint=a100 (repeatable)",
    )
    p.add_argument("--log-dir", default="logs", help="where the job logs go (default: logs)")
    p.add_argument(
        "--chdir",
        default=str(SSL_HOME) if IN_CHECKOUT else os.getcwd(),
        help="the job's working directory (default: this checkout; for an installed package,"
        " the current directory)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    p.add_argument(
        "--launcher",
        choices=("sbatch", "submitit"),
        default="sbatch",
        help="sbatch: the filled-in template; submitit: a submitit job running the template's"
        " stage, with the same checkpoint-and-requeue on signals (extra 'submitit')",
    )
    args = p.parse_args(argv)
    args.script_args = script_args
    return args


def minutes(limit: str) -> int:
    """A Slurm time limit in whole minutes (seconds round up). Slurm's forms: ``MM``,
    ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    days, dash, clock = limit.partition("-") if "-" in limit else ("0", "", limit)
    try:
        parts = [int(p) for p in clock.split(":")]
        day_count = int(days)
    except ValueError:
        raise ValueError(f"--time {limit!r}: expected MM, HH:MM:SS or D-HH:MM:SS") from None
    if len(parts) > 3 or min([*parts, day_count]) < 0:
        raise ValueError(f"--time {limit!r}: expected MM, HH:MM:SS or D-HH:MM:SS")
    if dash:  # D-HH[:MM[:SS]]
        hours, mins, secs = ([*parts, 0, 0])[:3]
    else:  # MM, MM:SS, HH:MM:SS
        hours, mins, secs = [(0, parts[0], 0), (0, *parts), tuple(parts)][len(parts) - 1]
    return day_count * 1440 + hours * 60 + mins + (secs > 0)


def submitit_options(args: argparse.Namespace) -> dict[str, object]:
    """The command line's resources in submitit's parameter names."""
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    opts: dict[str, object] = {
        "nodes": args.nodes or 1,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task or 1,
        "timeout_min": minutes(args.time) if args.time else 24 * 60,
        "slurm_signal_delay_s": 120,  # as the templates' --signal=USR1@120
        "name": args.job_name or Path(args.template).stem,
    }
    if args.gpus_per_node:
        opts["gpus_per_node"] = args.gpus_per_node
    for flag in ("partition", "account", "qos", "mem"):
        if getattr(args, flag):
            opts[f"slurm_{flag}"] = getattr(args, flag)
    if args.sbatch or args.array:
        raise ValueError("--sbatch and --array are for --launcher sbatch")
    return opts


def submit_with_submitit(args: argparse.Namespace, log_dir: Path) -> int:
    try:
        from vitssl.slurm.submitit_launcher import submit
    except ImportError:
        raise ValueError(
            "--launcher submitit needs submitit: pip install 'vitssl[submitit]'"
        ) from None
    options = submitit_options(args)
    if args.dry_run:
        print(f"# submitit job: {options} running {args.template} {shlex.join(args.script_args)}")
        return 0
    job_id = submit(args.template, args.script_args, options, log_dir, Path(args.chdir).resolve())
    print(f"submitted job {job_id} (submitit); logs in {log_dir / 'submitit' / job_id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log_dir = Path(args.log_dir).resolve()
    if args.launcher == "submitit":
        try:
            return submit_with_submitit(args, log_dir)
        except (ValueError, OSError) as e:
            print(f"submit: {e}", file=sys.stderr)
            return 2
    try:
        rendered = render(args, log_dir)
    except (ValueError, OSError) as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(rendered.script)
        tail = shlex.join(rendered.script_args)
        print(f"# would run: sbatch <this script> {tail}".rstrip(), file=sys.stderr)
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    name = sbatch_options(rendered.script).get("job-name") or Path(args.template).stem
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fd, path = tempfile.mkstemp(prefix=f"{name}-{stamp}-", suffix=".sbatch", dir=log_dir)
    with os.fdopen(fd, "w") as f:
        f.write(rendered.script)
    script_path = Path(path)
    cmd = ["sbatch", "--parsable", str(script_path), *rendered.script_args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        print("submit: sbatch not found (is Slurm installed here?)", file=sys.stderr)
        return 2
    if res.returncode:
        print(f"submit: sbatch failed: {res.stderr.strip()}", file=sys.stderr)
        return res.returncode
    job_id = res.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; logs in {log_dir}; script {script_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
