"""Named points where the fault tests kill a process, to prove that a run survives it.

``QA_DIST_KILL_AT=checkpoint:before-weights`` (for example) makes every process that reaches that
point SIGKILL itself there: what a preemption without grace, an OOM killer or a node failure does
at the worst moment; ``NAME@N``: the N-th time the process reaches it. Unset (always, outside the
tests), a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

KILL_AT = "QA_DIST_KILL_AT"

POINTS = (
    "checkpoint:before-weights",
    "checkpoint:between-files",
    "checkpoint:before-complete",
    "checkpoint:before-rename",
    "checkpoint:between-renames",
    "export:before-weights",
    "export:before-publish",
    "cache:after-shard",
)


_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    wanted = os.environ.get(KILL_AT)
    if not wanted or not wanted.startswith(name):
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == (int(nth) if nth.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)
