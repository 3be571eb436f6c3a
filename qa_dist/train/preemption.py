"""SIGTERM / SIGUSR1: checkpoint at the next step boundary, on every rank, then exit.

During an evaluation a SIGTERM ends the process at once instead: an evaluation has no step
boundary to stop at for minutes, and the usual sender of a SIGTERM then is the launcher (torchrun)
taking the job down because a peer rank died, which the surviving ranks would otherwise outlive
by the launcher's whole grace period before it kills them. SIGUSR1 (what the Slurm script sends
for a time limit or preemption notice) still waits for the evaluation and checkpoints after it.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

from qa_dist.fsutil import atomic_write

EXIT_PREEMPTED = 75
"""Exit code after a checkpoint forced by SIGTERM or SIGUSR1 (EX_TEMPFAIL: try again). The Slurm
script requeues the job on it; the requeued run continues with resume=auto."""


PREEMPTED_MARKER = "preempted.json"
"""Written into the run directory by rank zero after a preemption checkpoint (step, signal, exit code)."""


class Terminated(SystemExit):
    """Raised by the handler when SIGTERM arrives during an evaluation; the exit code is the
    shell's for a death by SIGTERM (143)."""


def write_preempted_marker(run_dir: Path, step: int, signal_name: str) -> None:
    """Rank zero, after the preemption checkpoint. Launchers (torchrun) report a worker's exit code
    only in their log: the marker tells a batch script that the run stopped on purpose,
    checkpointed, and wants a requeue."""
    marker = {"step": step, "signal": signal_name, "exit_code": EXIT_PREEMPTED}
    atomic_write(Path(run_dir) / PREEMPTED_MARKER, json.dumps(marker))


class PreemptionFlag:
    """Set by a signal handler; the ranks agree on it at step boundaries (any rank asked: all stop)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum = 0
        """The signal received here (0: none)."""
        self.evaluating = False
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if self.evaluating and signum == signal.SIGTERM:
            raise Terminated(128 + signum)

    @contextlib.contextmanager
    def evaluation(self):
        """While inside, SIGTERM ends this process at once (raises ``Terminated``)."""
        if self.signum == signal.SIGTERM:
            raise Terminated(128 + self.signum)
        self.evaluating = True
        try:
            yield
        finally:
            self.evaluating = False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
