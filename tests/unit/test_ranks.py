"""A notice forwarded to this job's recorded training processes only: real processes, real signals.
A record of another job's process, a stale record whose pid went to a later process, a process that
does not run ``qa_dist train`` (torchrun's agent), and damaged records signal nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qa_dist.runtime import ranks

WAIT_FOR_USR1 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def _process(job: str, *args: str) -> subprocess.Popen:
    """A process whose command line reads ``python -m ... ARGS`` to ranks' check (``-c`` code first)."""
    env = {**os.environ, "SLURM_JOB_ID": job}
    proc = subprocess.Popen([sys.executable, "-c", WAIT_FOR_USR1, *args], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def _record(run_dir, job: str, pid: int, started=None) -> None:
    path = run_dir / ranks.RANKS_DIR / job / f"{socket.gethostname()}-{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    started = ranks._started(pid) if started is None else started
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": started}))


def _ended(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def test_only_this_jobs_training_processes_are_signalled(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    trainer = _process("41", "-m", "qa_dist", "train")
    other_job = _process("42", "-m", "qa_dist", "train")  # the same user's other job on the node
    agent = _process("41", "-m", "accelerate.commands.launch", "-m", "qa_dist", "train")  # would die of USR1
    restarted = _process("41", "-m", "qa_dist", "train")  # its record is stale: another start time
    for proc in (trainer, other_job, agent):
        _record(tmp_path, "41", proc.pid)
    _record(tmp_path, "41", restarted.pid, started=ranks._started(restarted.pid) - 100)
    try:
        assert ranks.send(signal.SIGUSR1, tmp_path) == [trainer.pid]
        assert _ended(trainer) == 7
        assert all(p.poll() is None for p in (other_job, agent, restarted))
    finally:
        for proc in (trainer, other_job, agent, restarted):
            proc.kill()
            proc.wait()


def test_a_training_process_records_itself_under_slurm_and_forgets_at_the_end(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert ranks.record(tmp_path) is None  # not a Slurm job: nothing to forward to
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    path = ranks.record(tmp_path)
    entry = json.loads(path.read_text())
    assert path.parent == tmp_path / ".ranks" / "7" and entry["pid"] == os.getpid()
    assert abs(entry["started"] - ranks._started(os.getpid())) < 1e-6
    assert ranks.send(signal.SIGUSR1, tmp_path) == []  # never the sender itself
    ranks.forget(path)
    assert not path.exists()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["host", "pid", "started", "x"]), c),
        max_leaves=10,
    )
)
def test_any_record_signals_nothing_it_should_not(tmp_path_factory, monkeypatch, value):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    run_dir = tmp_path_factory.mktemp("ranks")
    path = run_dir / ".ranks" / "9" / f"{socket.gethostname()}-1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(value))
    assert ranks.send(signal.SIGUSR1, run_dir) == []  # pid 1 (init) runs no qa_dist train of job 9


def test_the_command_line_forwarder(tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "5"}
    trainer = _process("5", "-m", "qa_dist", "train")
    _record(tmp_path, "5", trainer.pid)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist.runtime.ranks", "USR1", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "SIGUSR1 to 1 training process(es)" in done.stdout, done.stderr
    assert _ended(trainer) == 7
    assert time.monotonic() - started < 10  # no torch, no accelerate: it must be quick under a time limit
    bad = subprocess.run([sys.executable, "-m", "qa_dist.runtime.ranks", "KILL", str(tmp_path)], capture_output=True)
    assert bad.returncode == 2


@pytest.fixture(autouse=True)
def _no_stray_usr1():
    """(the sender never signals itself; should it, this process would die here, loudly)"""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, previous)


FORKS = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], '-m', 'qa_dist', 'train'], stdout=subprocess.PIPE,"
    " text=True)\n"
    "child.stdout.readline()\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_process_started_by_a_training_process_and_a_record_not_the_users_own_signal_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    env = {**os.environ, "SLURM_JOB_ID": "43"}
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKS, WAIT_FOR_USR1, "-m", "qa_dist", "train"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    trainer = _process("43", "-m", "qa_dist", "train")
    try:
        _record(tmp_path, "43", child)  # a data loader worker, say: the trainer's command line and job
        assert ranks.send(signal.SIGUSR1, tmp_path) == []
        _record(tmp_path, "43", trainer.pid)
        planted = tmp_path / ".ranks" / "43" / f"{socket.gethostname()}-{trainer.pid}.json"
        os.chmod(planted, 0o664)  # group-writable: anyone in the group could have written it
        assert ranks.send(signal.SIGUSR1, tmp_path) == []
        os.chmod(planted, 0o600)
        assert ranks.send(signal.SIGUSR1, tmp_path) == [trainer.pid]
        assert _ended(trainer) == 7
    finally:
        for proc in (parent, trainer):
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_notice_sent_before_a_process_recorded_itself_is_acted_on_at_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "44")
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        assert ranks.send(signal.SIGUSR1, tmp_path) == []  # while the run is being built
        ranks.forget(ranks.record(tmp_path))
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
