"""SIGTERM / SIGUSR1: checkpoint at the next step boundary, on every rank, then exit."""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75
"""Exit code after a checkpoint forced by SIGTERM or SIGUSR1 (EX_TEMPFAIL: try again). The Slurm
script requeues the job on it; the requeued run continues with resume=auto."""


PREEMPTED_MARKER = "preempted.json"
"""Written into the run directory by rank zero after a preemption checkpoint (step, signal, exit code)."""


class PreemptionFlag:
    """Set by a signal handler; the ranks agree on it at step boundaries (any rank asked: all stop)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum = 0
        """The signal received here (0: none)."""
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
