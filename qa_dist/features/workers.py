"""A small process pool for building features, written by hand for two reasons.

``multiprocessing``'s ``spawn`` and ``forkserver`` start methods import the parent's main script
again in every worker: a training script without an ``if __name__ == "__main__":`` guard then runs
again inside each worker (its ``init_process_group`` included) and the pool breaks. ``fork`` copies
a process that may run threads (gloo's, torch's, the Rust tokenizer's), whose locks a child can
inherit held. So each worker is a fresh interpreter, ``python -P -m qa_dist.features.workers``
(``-P``: the working directory is not put on ``sys.path``), that reads tasks from its stdin and
writes results to its stdout, one pickle each way: parent and workers are one program talking
through pipes only they hold, never a file. A worker that dies (killed for memory, say) is named
with its signal instead of leaving the pool waiting, and workers end when the parent does (their
stdin closes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections import deque
from multiprocessing.connection import wait as wait_readable
from pathlib import Path
from typing import Any

from qa_dist.errors import QaDistError

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class WorkerDied(QaDistError):
    """A worker process ended while it held a task."""


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "qa_dist.features.workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=1 << 20,
            env=env,
        )
        self.task: Any = None  # the ticket of the task it holds
        with contextlib.suppress(OSError):  # a shard's examples in one write, not sixteen (Linux)
            fcntl.fcntl(self.proc.stdin.fileno(), _F_SETPIPE_SZ, 1 << 20)

    def send(self, ticket: Any, fn, args: tuple) -> None:
        self.task = ticket
        self.proc.stdin.write(pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL))
        self.proc.stdin.flush()

    def receive(self):
        try:
            status, value = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError):
            code = self.proc.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            hint = " (killed, perhaps for memory: lower data.preprocess_workers)" if code == -signal.SIGKILL else ""
            raise WorkerDied(f"a feature-building worker (pid {self.proc.pid}) died with {how}{hint}") from None
        if status == "error":
            raise value
        return value


class WorkerPool:
    """``n`` worker processes; tasks are ``(fn, args)`` with ``fn`` importable by name."""

    def __init__(self, n: int) -> None:
        self.workers = [_Worker() for _ in range(n)]
        self.queue: deque = deque()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def submit(self, ticket: Any, fn, *args) -> None:
        self.queue.append((ticket, fn, args))
        self._dispatch()

    def _dispatch(self) -> None:
        for worker in self.workers:
            if worker.task is None and self.queue:
                ticket, fn, args = self.queue.popleft()
                worker.send(ticket, fn, args)

    @property
    def busy(self) -> int:
        return len(self.queue) + sum(w.task is not None for w in self.workers)

    def results(self) -> list[tuple[Any, Any]]:
        """Wait for at least one task to finish: ``(ticket, result)`` of each that has."""
        holding = {w.proc.stdout: w for w in self.workers if w.task is not None}
        done = []
        for stream in wait_readable(list(holding)):
            worker = holding[stream]
            ticket, worker.task = worker.task, None
            done.append((ticket, worker.receive()))
        self._dispatch()
        return done

    def close(self, *, kill: bool = False) -> None:
        for worker in self.workers:
            if kill:
                worker.proc.kill()
            with contextlib.suppress(OSError):  # (a worker that died already)
                worker.proc.stdin.close()
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            worker.proc.stdout.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(kill=kind is not None)


def _serve() -> None:
    """A worker: run tasks from stdin until it closes, results to the real stdout (stray prints of
    a library go to stderr instead, so they cannot break the stream of results)."""
    tasks = sys.stdin.buffer
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        try:
            fn, args = pickle.load(tasks)
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args))
        except (QaDistError, OSError) as e:  # (a full disk is the caller's one-line error)
            reply = ("error", e)
        except Exception as e:  # noqa: BLE001  (sent whole to the parent, which raises it)
            reply = ("error", RuntimeError(f"feature-building worker failed: {e!r}\n{traceback.format_exc()}"))
        pickle.dump(reply, results, protocol=pickle.HIGHEST_PROTOCOL)
        results.flush()


if __name__ == "__main__":
    _serve()
