"""The training processes of a Slurm job, as they record themselves under the run directory, and a
signal sent to exactly those processes.

Why not a process-name match (``pkill``): on a node shared with other jobs of the same user it
signals their training too. Why not ``scancel --signal`` to the job's steps: that reaches every
process of the step, torchrun's agent (which dies of SIGUSR1) and helpers the training processes
start (inductor's compile workers die of it, and the next compilation fails). So each training
process writes ``RUN_DIR/.ranks/<job id>/<host>-<pid>.json`` once its signal handler is installed,
and the batch script runs ``python -m qa_dist.runtime.ranks SIGNAL RUN_DIR`` on every node, which
signals a recorded process only when the record is this user's own (in a folder only this user
writes), the process is alive on this host, started when its record says, runs ``qa_dist train``
itself (not a launcher that names it, not a process forked from one) and belongs to this job (its
``SLURM_JOB_ID``): a stale or planted record signals nothing. A notice sent before a process
recorded itself (while the run was being built) is left in the folder, and acted on at the record.
The batch script clears the folder when the job (or its requeued incarnation) starts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from qa_dist.runtime.jsonfile import finite

RANKS_DIR = ".ranks"


def _job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _started(pid: int) -> float | None:
    import psutil  # a dependency of accelerate

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def _job_dir(run_dir: str | Path, job: str) -> Path:
    return Path(run_dir) / RANKS_DIR / job


def record(run_dir: str | Path) -> Path | None:
    """Record this process as one of its Slurm job's training processes (None outside Slurm, or
    where the run directory cannot take the record: then no notice to the batch shell reaches it,
    which it says). A notice that came before (while the run was being built) is acted on now:
    ``send`` leaves one for the processes it could not reach yet."""
    from qa_dist.runtime.fsutil import atomic_write

    job = _job()
    if not _valid_job(job):
        return None
    folder = _job_dir(run_dir, job)
    path = folder / f"{socket.gethostname()}-{os.getpid()}.json"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(
            path, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid())})
        )
    except OSError as e:
        print(f"qa-dist: cannot record this training process in {folder} ({e.strerror})", file=sys.stderr)
        return None
    # After the record exists: a notice sent from now on finds the record, one sent before left this.
    for name in NOTICES:
        if (folder / f"notice-{name}").exists():
            signal.raise_signal(getattr(signal, f"SIG{name}"))
            break
    return path


def forget(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _valid_job(job: str | None) -> bool:
    return bool(job) and job.isascii() and job.isdigit()


def _runs_train(cmdline: list[str]) -> bool:
    """``python [options] -m qa_dist train ...`` (the first ``-m``, not torchrun's or accelerate's
    own, whose arguments name ``-m qa_dist train`` too) or the ``qa-dist train`` script."""
    if len(cmdline) >= 3 and Path(cmdline[1]).name == "qa-dist" and cmdline[2] == "train":
        return True
    if "-m" not in cmdline:
        return False
    at = cmdline.index("-m")
    return cmdline[at + 1 : at + 3] == ["qa_dist", "train"]


def _is_this_jobs_trainer(pid: int, started, job: str) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        created = process.create_time()
        cmdline = process.cmdline()
        environ = process.environ()
        parent = process.parent()
        parent_cmdline = parent.cmdline() if parent is not None else []
    except (psutil.Error, ValueError, OverflowError):
        return False
    same = (recorded := finite(started)) is not None and abs(created - recorded) < 1.0
    # A process forked from a training process (a data loader worker) has its command line too.
    return same and _runs_train(cmdline) and not _runs_train(parent_cmdline) and environ.get("SLURM_JOB_ID") == job


def _owned_by_me(path: Path) -> bool:
    """A record of this user's, which nobody else could have written: anyone who can write the run
    directory can plant a file, but not one owned by this user in a folder only this user writes."""
    try:
        folder, st = os.lstat(path.parent), os.lstat(path)
    except OSError:
        return False
    private = not (folder.st_mode | st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH)
    return stat.S_ISREG(st.st_mode) and st.st_uid == folder.st_uid == os.getuid() and private


def send(signum: int, run_dir: str | Path) -> list[int]:
    """Send ``signum`` to this job's recorded training processes on this host; their pids. Leaves a
    notice first, for the processes that record themselves after this (see ``record``)."""
    from qa_dist.runtime.fsutil import atomic_write
    from qa_dist.runtime.jsonfile import Damaged, read_json

    job, host = _job(), socket.gethostname()
    if not _valid_job(job):
        return []
    folder = _job_dir(run_dir, job)
    with contextlib.suppress(OSError):  # (no folder: no process has recorded itself yet)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(folder / f"notice-{signal.Signals(signum).name.removeprefix('SIG')}", "")
    sent = []
    for path in sorted(folder.glob(f"{host}-*.json")):
        try:
            entry = read_json(path, limit=4096) if _owned_by_me(path) else None
        except (OSError, Damaged):
            continue
        if not isinstance(entry, dict) or entry.get("host") != host:
            continue
        pid = entry.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and _is_this_jobs_trainer(pid, entry.get("started"), job):
            with contextlib.suppress(ProcessLookupError, PermissionError):  # (it ended meanwhile)
                os.kill(pid, signum)
                sent.append(pid)
    return sent


NOTICES = ("USR1", "TERM")


def main(argv: list[str]) -> int:
    """``python -m qa_dist.runtime.ranks USR1|TERM RUN_DIR`` (the batch script's, on every node)."""
    if len(argv) != 2 or argv[0] not in NOTICES:
        print("usage: python -m qa_dist.runtime.ranks USR1|TERM RUN_DIR", file=sys.stderr)
        return 2
    sent = send(getattr(signal, f"SIG{argv[0]}"), argv[1])
    print(f"qa-dist: SIG{argv[0]} to {len(sent)} training process(es) on {socket.gethostname()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
