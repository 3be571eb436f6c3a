"""Threads, planned once per process: the processes on a node together use no more threads than the
cores this job may use.

Each training process runs two thread pools on the CPU: torch's intra-op pool (the forward and
backward on the CPU, host-side work on GPU nodes) and numba's (the CPU span search of every
evaluation). Left alone, each pool sizes itself to every core of the machine, in every process:
two processes on two cores then run six threads after their first evaluation, and training stays
several times slower from then on. The plan, for every process qa-dist runs:

- the cores: those this process may run on (``os.sched_getaffinity``: what Slurm, taskset or a
  container allow), not the machine's;
- the processes sharing them: ``LOCAL_WORLD_SIZE`` (set by torchrun and ``accelerate launch``), else 1;
- threads per process: ``OMP_NUM_THREADS`` where it is set (your choice, or the Slurm script's:
  the task's CPUs divided by its processes), else cores // processes, at least 1;
- torch's intra-op pool and numba's pool both get that number.

``QA_DIST_THREAD_PLAN=off`` leaves both pools alone (``bench/train_throughput.py`` compares the two).
"""

from __future__ import annotations

import os
import sys

PLAN_SWITCH = "QA_DIST_THREAD_PLAN"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def threads_per_process(local_processes: int | None = None) -> int:
    explicit = _int_env("OMP_NUM_THREADS")
    if explicit:
        return explicit
    processes = local_processes or _int_env("LOCAL_WORLD_SIZE") or 1
    return max(1, available_cores() // processes)


def plan_threads(local_processes: int | None = None) -> int | None:
    """Apply the plan to this process; the threads per process (None: switched off). numba reads
    ``NUMBA_NUM_THREADS`` when it is first imported (the first evaluation); torch is told directly.
    ``OMP_NUM_THREADS`` is read, never written: processes this one starts plan for themselves."""
    if os.environ.get(PLAN_SWITCH, "").lower() == "off":
        return None
    n = threads_per_process(local_processes)
    os.environ["NUMBA_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n
