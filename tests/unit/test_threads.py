"""The thread plan: processes on a node together use no more threads than the job's cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qa_dist.runtime.threads import available_cores, threads_per_process

PROBE = """
import json, os
import torch  # imported before the plan, as in make_accelerator and current_context
from qa_dist.runtime.threads import plan_threads
n = plan_threads()
import numba
from qa_dist.eval.spans import window_candidates_cpu
import numpy as np
x = np.zeros((4, 8), np.float32); m = np.ones((4, 8), bool)
window_candidates_cpu(x, x, m, m, np.zeros(4, np.int64), 2, 3)  # starts numba's pool
print(json.dumps({"planned": n, "torch": torch.get_num_threads(), "numba": numba.get_num_threads()}))
"""


def _probe(**env) -> dict:
    base = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "LOCAL_WORLD_SIZE")
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env}, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_processes_times_threads_fit_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = available_cores()
    assert threads_per_process() == cores
    for processes in (1, 2, 3, 64):
        n = threads_per_process(processes)
        assert n >= 1 and (n * processes <= cores or n == 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's (or the Slurm script's) choice wins
    assert threads_per_process(8) == 3


@pytest.mark.parametrize("local", ["1", "2"])
def test_torch_and_numba_get_the_plan_in_a_launched_process(local):
    got = _probe(LOCAL_WORLD_SIZE=local)
    n = max(1, available_cores() // int(local))
    assert got == {"planned": n, "torch": n, "numba": n}


def test_the_plan_can_be_switched_off():
    got = _probe(LOCAL_WORLD_SIZE="2", QA_DIST_THREAD_PLAN="off")
    assert got["planned"] is None and got["numba"] == available_cores()  # numba's default: every core
