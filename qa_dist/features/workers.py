"""A small process pool for building features, written by hand for two reasons.

``multiprocessing``'s ``spawn`` and ``forkserver`` start methods import the parent's main script
again in every worker: a training script without an ``if __name__ == "__main__":`` guard then runs
again inside each worker (its ``init_process_group`` included) and the pool breaks. ``fork`` copies
a process that may run threads (gloo's, torch's, the Rust tokenizer's), whose locks a child can
inherit held. So each worker is a fresh interpreter, ``python -P -m qa_dist.features.workers``
(``-P``: the working directory is not put on ``sys.path``), that reads tasks from its stdin and
writes results to its stdout, one pickle each way: parent and workers are one program talking
through pipes only they hold, never a file (results on a pipe of their own, framed). A worker that dies (killed for memory, say) is named
with its signal instead of leaving the pool waiting, and workers end when the parent does (their
stdin closes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import signal
import struct
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


_MAGIC = b"QADW"
_HEADER = struct.Struct(">4sQ")


def _read_exact(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            raise EOFError
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _stderr_fd() -> int:
    """Where a worker's stray prints go: this process's stderr, or nowhere if it has none."""
    try:
        return sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):  # (an embedding host, a closed stream)
        return subprocess.DEVNULL


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
        # Results come back on a pipe of their own: whatever the worker's interpreter or a library
        # prints (a sitecustomize, say) goes to stderr and can never corrupt them.
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "qa_dist.features.workers", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=_stderr_fd(),
                pass_fds=(write_fd,),
                bufsize=1 << 20,
                env=env,
            )
        finally:
            os.close(write_fd)
        self.results = read_fd
        self.task: Any = None  # the ticket of the task it holds
        with contextlib.suppress(OSError):  # a shard's examples in one write, not sixteen (Linux)
            fcntl.fcntl(self.proc.stdin.fileno(), _F_SETPIPE_SZ, 1 << 20)

    def fileno(self) -> int:
        return self.results

    def _died(self, what: str) -> WorkerDied:
        with contextlib.suppress(OSError):
            self.proc.kill()
        code = self.proc.wait()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        hint = " (killed, perhaps for memory: lower data.preprocess_workers)" if code == -signal.SIGKILL else ""
        return WorkerDied(f"a feature-building worker (pid {self.proc.pid}) {what}: it ended with {how}{hint}")

    def send(self, ticket: Any, fn, args: tuple) -> None:
        self.task = ticket
        try:
            self.proc.stdin.write(pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL))
            self.proc.stdin.flush()
        except OSError:  # (a broken pipe: it died before it read its task)
            raise self._died("could not be given its task") from None

    def receive(self):
        try:
            magic, size = _HEADER.unpack(_read_exact(self.results, _HEADER.size))
            if magic != _MAGIC:
                raise ValueError("not a result")
            status, value = pickle.loads(_read_exact(self.results, size))
        except Exception:  # noqa: BLE001  (an ended or garbled stream: the worker is of no more use)
            raise self._died("stopped before it returned its result") from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.results)


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
        holding = {w.results: w for w in self.workers if w.task is not None}
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
            worker.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(kill=kind is not None)


def _die_with_parent() -> None:
    """Linux: be killed when the parent dies, instead of finishing a shard nobody will read."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _reply(error: BaseException) -> tuple:
    """An error as the parent raises it: itself where it pickles (its type kept whatever the pool
    size), with the worker's traceback as a note; else a RuntimeError naming it."""
    if not isinstance(error, QaDistError):  # (the CLI prints a QaDistError as one line: no traceback)
        error.add_note("in the feature-building worker:\n" + traceback.format_exc())
    try:
        pickle.dumps(error)
        return ("error", error)
    except Exception:  # noqa: BLE001
        return ("error", RuntimeError(f"feature-building worker failed: {error!r}\n{traceback.format_exc()}"))


def _serve(results_fd: int) -> None:
    """A worker: run tasks from stdin until it closes, each result framed on its own pipe. Ctrl-C
    is the parent's to handle (it closes the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    tasks = sys.stdin.buffer
    while True:
        try:
            fn, args = pickle.load(tasks)
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args))
        except Exception as e:  # noqa: BLE001  (sent to the parent, which raises it)
            reply = _reply(e)
        payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            os.write(results_fd, _HEADER.pack(_MAGIC, len(payload)))
            view = memoryview(payload)
            while view:
                view = view[os.write(results_fd, view) :]
        except BrokenPipeError:  # the parent is gone: nobody to tell
            os._exit(0)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
