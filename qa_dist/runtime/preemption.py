"""SIGTERM / SIGUSR1: checkpoint at the next step boundary, on every rank, then exit.

An evaluation inside training has no step boundary for minutes, and ignoring the signal there made
a job whose rank died outlive it by the launcher's whole grace period: torchrun sends SIGTERM to
the surviving ranks, which evaluated on until its SIGKILL 30 s later. So an evaluation asks
``stop_requested`` after every batch: one collective in which the ranks agree whether any was
signalled. Signalled: every rank leaves the evaluation at the same batch (``EvaluationStopped``)
and the loop checkpoints and exits as at any step boundary (a scheduler's preemption during an
evaluation still ends in a checkpoint and a requeue). A dead peer: that collective fails at once.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

from qa_dist.runtime.dist import max_over_ranks
from qa_dist.runtime.report import Reporter

EXIT_PREEMPTED = 75
"""Exit code after a checkpoint forced by SIGTERM or SIGUSR1 (EX_TEMPFAIL: try again). The Slurm
script requeues the job on it; the requeued run continues with resume=auto."""


PREEMPTED_MARKER = "preempted.json"
"""Written into the run directory by rank zero after a preemption checkpoint (step, signal, exit code)."""


class EvaluationStopped(Exception):
    """Raised on every rank at the same batch of an evaluation when a rank was signalled."""


def write_preempted_marker(report: Reporter, run_dir: Path, step: int, signal_name: str) -> None:
    """After the preemption checkpoint (rank zero's reporter writes it). Launchers (torchrun) report
    a worker's exit code only in their log: the marker tells a batch script that the run stopped on
    purpose, checkpointed, and wants a requeue. One line of JSON: the script echoes it."""
    marker = {"step": step, "signal": signal_name, "exit_code": EXIT_PREEMPTED}
    report.write_text(Path(run_dir) / PREEMPTED_MARKER, json.dumps(marker))


def clear_preempted_marker(report: Reporter, run_dir: Path) -> None:
    """At the start of a run: a marker left by the run before must not requeue this one."""
    report.remove(Path(run_dir) / PREEMPTED_MARKER)


class PreemptionFlag:
    """Set by a signal handler; the ranks agree on it at step boundaries (any rank asked: all stop)."""

    active: PreemptionFlag | None = None
    """The flag of the training run in this process, while it evaluates (for ``stop_requested``)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum = 0
        """The signal received here (0: none)."""
        self.stopped_evaluation = False
        """An evaluation was stopped (on every rank alike: they agree at the same batch)."""
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def evaluation(self):
        """Every rank evaluates inside: ``stop_requested`` consults this flag, and an evaluation it
        stopped ends here quietly (the caller then checkpoints at the step boundary)."""
        PreemptionFlag.active = self
        try:
            yield
        except EvaluationStopped:
            self.stopped_evaluation = True
        finally:
            PreemptionFlag.active = None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_requested(device=None) -> bool:
    """Whether any rank was signalled during this evaluation. Every rank calls this at the same
    points (after each batch of an evaluation); outside a training run's evaluation (``qa-dist
    evaluate``) it is False without any collective."""
    flag = PreemptionFlag.active
    return flag is not None and max_over_ranks(flag.signum, device) > 0


def check_stop(device=None) -> None:
    """``stop_requested``, raising ``EvaluationStopped`` when it is true."""
    if stop_requested(device):
        raise EvaluationStopped
