"""SIGTERM / SIGUSR1: checkpoint at the next step boundary, on every rank, then exit."""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75
"""Exit code after a checkpoint forced by SIGTERM or SIGUSR1 (EX_TEMPFAIL: try again). The Slurm
script requeues the job on it; the requeued run continues with resume=auto."""


class PreemptionFlag:
    """Set by a signal handler; the ranks agree on it at step boundaries (any rank asked: all stop)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
