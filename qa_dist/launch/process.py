"""Running the launch line in the foreground and passing signals on to the training processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil  # a dependency of accelerate

from qa_dist.runtime.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER
from qa_dist.runtime.safepath import safe_environ


def run(cmd: list[str], run_dir: str | Path | None = None) -> int:
    """Run the launch line in the foreground, pass signals on, and return its exit code: 75 (the
    training checkpointed and stopped on a signal) when the run wrote a new ``preempted.json``.

    Why a child and not ``os.execv``: ``accelerate launch`` (torchrun's elastic agent, in process)
    starts every training process with ``start_new_session=True``, so no process group holds them,
    and it handles only SIGTERM, SIGINT, SIGHUP and SIGQUIT (``TORCHELASTIC_SIGNALS_TO_HANDLE``):
    SIGUSR1 kills the agent, which leaves its training processes running. On SIGTERM the agent
    forwards it to the workers but kills them 30 s later (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``),
    whether or not their checkpoint is written, and either way it exits 1, never 75. So the launcher
    stays in between: it starts the agent in a session of its own (a Ctrl-C or a SIGTERM to the
    terminal's process group reaches this process only, once), and on SIGTERM or SIGUSR1 it signals
    the training processes themselves (the agent's children), not the agent; they agree, save a
    checkpoint, write ``preempted.json`` and exit 75; the agent then sees them end and exits;
    the marker turns that into exit code 75 here. A second SIGTERM, and SIGINT, SIGHUP or SIGQUIT,
    go to the agent, which stops its workers its own way (no checkpoint). Before the training
    processes exist a SIGTERM or SIGUSR1 goes to the agent as SIGTERM: nothing to checkpoint yet."""
    marker = Path(run_dir) / PREEMPTED_MARKER if run_dir is not None else None
    before = _stamp(marker)
    proc: subprocess.Popen | None = None
    pending: list[int] = []
    asked: set[int] = set()

    def forward(signum: int, _frame=None) -> None:
        if proc is None:
            pending.append(signum)
            return
        if signum in (signal.SIGTERM, signal.SIGUSR1) and not (signum == signal.SIGTERM and signum in asked):
            asked.add(signum)
            workers = _children(proc.pid)
            for pid in workers:
                _kill(pid, signum)
            if workers:
                return
            signum = signal.SIGTERM  # no training process yet: nothing to checkpoint, stop
        _kill(proc.pid, signum)

    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        proc = subprocess.Popen(cmd, start_new_session=True, env=safe_environ())
        for signum in pending:
            forward(signum)
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if marker is not None and _stamp(marker) not in (None, before):
        print(
            f"qa-dist: training stopped on a signal after a checkpoint ({marker.read_text().strip()}); "
            "continue with resume=auto",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    return code if code >= 0 else 128 - code


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a rewritten file from the one seen before (None: no file)."""
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size) if st else None


def _children(pid: int) -> list[int]:
    """The direct children of ``pid``: the training processes torchrun's agent started."""
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(pid, signum)
