"""One run per run directory: a lock file that names its holder, checked across nodes.

Two runs writing one run directory corrupt each other's checkpoints and exports without a word,
and a shared filesystem is where that happens (a second ``sbatch`` of the same script, a
colleague's job). ``flock`` does not reach across nodes on every shared filesystem, so the lock is
a file created with ``O_EXCL`` holding the holder's host, pid, Slurm job and a heartbeat that a
thread refreshes. A holder is alive when its pid runs (same host) or its heartbeat is recent
(another host); a dead holder's lock is taken over with a warning. A Slurm job requeued after a
crash takes over its own earlier incarnation's lock at once (same job id), wherever it runs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from qa_dist.errors import ConfigError
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.jsonfile import Damaged, read_json

log = logging.getLogger(__name__)

LOCK_FILE = ".qa-dist.lock"
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 120.0
"""A lock from another host whose heartbeat is older than this belongs to a dead run."""


def _this_host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int, started: float | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that took the lock (not a later one
    given the same pid: it started after the lock was written)."""
    import psutil  # a dependency of accelerate

    try:
        created = psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return False
    return started is None or created <= started + 2.0


def read_holder(path: Path) -> dict | None:
    """The lock's holder, or None when there is no lock; a damaged lock reads as an empty holder
    (dead, unless it is new enough to be being written)."""
    try:
        holder = read_json(path)
    except FileNotFoundError:
        return None
    except Damaged:
        return {}
    return holder if isinstance(holder, dict) else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def holder_alive(holder: dict, path: Path, now: float | None = None) -> bool:
    if path.is_symlink():  # planted: a lock is created with O_EXCL, never as a link
        return False
    now = time.time() if now is None else now
    pid, started = holder.get("pid"), _number(holder.get("started"))
    if holder.get("host") == _this_host() and isinstance(pid, int) and not isinstance(pid, bool):
        return _pid_alive(pid, started)
    heartbeat = _number(holder.get("heartbeat"))
    if heartbeat is None:  # damaged or half-written: alive only while it is fresh
        with contextlib.suppress(OSError):
            heartbeat = path.stat().st_mtime
    return heartbeat is not None and now - heartbeat < STALE_SECONDS


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}"


def _restarts(value) -> int:
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else 0


def _own_earlier_job(holder: dict) -> bool:
    """The holder is this Slurm job before a requeue (a node failure leaves its lock behind): the
    same job id, and fewer restarts than this incarnation has. Two steps of one allocation share
    the job id and the restart count: neither takes the other's lock."""
    job = os.environ.get("SLURM_JOB_ID")
    earlier = _restarts(holder.get("slurm_restart")) < _restarts(os.environ.get("SLURM_RESTART_COUNT"))
    return bool(job) and holder.get("slurm_job") == job and earlier


def check_free(run_dir: str | Path) -> None:
    """A ConfigError naming the holder when a live run holds ``run_dir`` (``qa-dist launch`` checks
    before it starts anything; training takes the lock)."""
    path = Path(run_dir) / LOCK_FILE
    holder = read_holder(path)
    if holder is not None:
        _refuse_if_held(run_dir, holder, path)


def _refuse_if_held(run_dir, holder: dict, path: Path) -> None:
    """A ConfigError naming ``holder`` when it is a live run other than this job's earlier self."""
    if holder_alive(holder, path) and not _own_earlier_job(holder):
        raise ConfigError(held_message(run_dir, holder))


def held_message(run_dir, holder: dict) -> str:
    return (
        f"run_dir {run_dir}: another run is using it ({describe(holder)}); wait for it to end, stop it, "
        "or give this run another run_dir"
    )


class RunDirLock:
    """The lock of one run directory, held by one process (global rank zero) for the whole run."""

    def __init__(self, run_dir: str | Path, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.heartbeat = heartbeat
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a heartbeat write and the release never overlap
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        now = time.time()
        record = {"host": _this_host(), "pid": os.getpid(), "started": self._started, "heartbeat": now}
        record |= {"token": self.token, "slurm_job": os.environ.get("SLURM_JOB_ID")}
        record["slurm_restart"] = os.environ.get("SLURM_RESTART_COUNT", "0")
        return json.dumps(record) + "\n"

    def acquire(self) -> RunDirLock:
        """Take the lock, or a ConfigError naming the live holder; a dead holder's lock is taken
        over with a warning naming it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_dead()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._record())
            self._thread = threading.Thread(target=self._beat, name="qa-dist-rundir-lock", daemon=True)
            self._thread.start()
            return self
        raise ConfigError(f"run_dir {self.run_dir}: cannot take {self.path} (other runs keep taking it)")

    def _take_over_if_dead(self) -> None:
        holder = read_holder(self.path)
        if holder is None:
            return  # released meanwhile: try again
        _refuse_if_held(self.run_dir, holder, self.path)
        # Renamed away, not deleted: of two runs taking over at once, only one rename succeeds,
        # and the other finds the winner's fresh lock on its next try.
        stale = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        if read_holder(stale) != holder:  # another run's fresh lock was renamed: put it back
            with contextlib.suppress(OSError):
                os.link(stale, self.path)
        else:
            log.warning("%s: taking over the lock of a run that is gone (%s)", self.run_dir, describe(holder))
        stale.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._writing:
                if self._stop.is_set():
                    return
                holder = read_holder(self.path)
                if holder and "token" in holder and holder["token"] != self.token:
                    log.warning("%s: another run took this run's lock (%s)", self.run_dir, describe(holder))
                    return  # never write over another run's lock
                if not holder:
                    continue  # unreadable for a moment (a shared filesystem's hiccup): the next beat retries
                with contextlib.suppress(OSError):
                    atomic_write(self.path, self._record())

    def release(self) -> None:
        with self._writing:  # after this, no heartbeat writes the file again
            self._stop.set()
            holder = read_holder(self.path)
            if holder and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
