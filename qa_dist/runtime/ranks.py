"""The training processes of a Slurm job, as they record themselves under the run directory, and a
signal sent to exactly those processes.

Why not a process-name match (``pkill``): on a node shared with other jobs of the same user it
signals their training too. Why not ``scancel --signal`` to the job's steps: that reaches every
process of the step, torchrun's agent (which dies of SIGUSR1) and helpers the training processes
start (inductor's compile workers die of it, and the next compilation fails). So each training
process writes ``RUN_DIR/.ranks/<job id>/<host>-<pid>.json`` once its signal handler is installed,
and the batch script runs ``python -m qa_dist.runtime.ranks SIGNAL RUN_DIR`` on every node, which
signals a recorded process only when it is alive on this host, started when its record says, runs
``qa_dist train`` and belongs to this job (its ``SLURM_JOB_ID``): a stale or planted record signals
nothing."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import sys
from pathlib import Path

RANKS_DIR = ".ranks"


def _job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _started(pid: int) -> float | None:
    import psutil  # a dependency of accelerate

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def record(run_dir: str | Path) -> Path | None:
    """Record this process as one of its Slurm job's training processes (None outside Slurm, or
    where the run directory cannot take the record: then no notice to the batch shell reaches it,
    which it says)."""
    from qa_dist.runtime.fsutil import atomic_write

    job = _job()
    if not job or not job.isascii() or not job.isdigit():
        return None
    path = Path(run_dir) / RANKS_DIR / job / f"{socket.gethostname()}-{os.getpid()}.json"
    try:
        atomic_write(
            path, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid())})
        )
    except OSError as e:
        print(f"qa-dist: cannot record this training process in {path.parent} ({e.strerror})", file=sys.stderr)
        return None
    return path


def forget(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _is_this_jobs_trainer(pid: int, started, job: str) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        created = process.create_time()
        cmdline = process.cmdline()
        environ = process.environ()
    except (psutil.Error, ValueError, OverflowError):
        return False
    same = isinstance(started, (int, float)) and not isinstance(started, bool) and abs(created - started) < 1.0
    runs_train = any(
        (a == "qa_dist" or Path(a).name == "qa-dist") and b == "train" for a, b in itertools.pairwise(cmdline)
    )
    return same and runs_train and environ.get("SLURM_JOB_ID") == job and pid != os.getpid()


def send(signum: int, run_dir: str | Path) -> list[int]:
    """Send ``signum`` to this job's recorded training processes on this host; their pids."""
    from qa_dist.runtime.jsonfile import Damaged, read_json

    job, host = _job(), socket.gethostname()
    if not job or not job.isascii() or not job.isdigit():
        return []
    sent = []
    for path in sorted((Path(run_dir) / RANKS_DIR / job).glob(f"{host}-*.json")):
        try:
            entry = read_json(path)
        except (OSError, Damaged):
            continue
        if not isinstance(entry, dict) or entry.get("host") != host:
            continue
        pid = entry.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and _is_this_jobs_trainer(pid, entry.get("started"), job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
                sent.append(pid)
    return sent


def main(argv: list[str]) -> int:
    """``python -m qa_dist.runtime.ranks USR1|TERM RUN_DIR`` (the batch script's, on every node)."""
    if len(argv) != 2 or argv[0] not in ("USR1", "TERM"):
        print("usage: python -m qa_dist.runtime.ranks USR1|TERM RUN_DIR", file=sys.stderr)
        return 2
    sent = send(getattr(signal, f"SIG{argv[0]}"), argv[1])
    print(f"qa-dist: SIG{argv[0]} to {len(sent)} training process(es) on {socket.gethostname()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
