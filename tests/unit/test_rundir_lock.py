"""One run per run directory: the lock names its holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import small_run_overrides

from qa_dist.errors import ConfigError
from qa_dist.runtime import rundir
from qa_dist.runtime.rundir import LOCK_FILE, RunDirLock, check_free

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "qa_dist" / "configs" / "runs" / "cpu_sample_en.yaml"


def _plant_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(holder))
    return path


@pytest.fixture
def live_pid():
    """A process that runs for the test's length: a live holder on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.2)
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    with RunDirLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        with pytest.raises(
            ConfigError, match=rf"another run is using it \(host {socket.gethostname()}, pid {os.getpid()}"
        ):
            RunDirLock(tmp_path / "run").acquire()
        with pytest.raises(ConfigError, match="another run is using it"):
            check_free(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released
    check_free(tmp_path / "run")


def test_a_dead_runs_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    _plant_lock(tmp_path, host=socket.gethostname(), pid=dead, started=time.time() - 5, heartbeat=time.time())
    with caplog.at_level(logging.WARNING, logger="qa_dist.runtime.rundir"), RunDirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"pid {dead}" in caplog.text and "taking over" in caplog.text


def test_a_reused_pid_is_not_the_holder(tmp_path, live_pid):
    # The pid runs, but it started after the lock was written: another process got the number.
    _plant_lock(tmp_path, host=socket.gethostname(), pid=live_pid, started=time.time() - 3600, heartbeat=time.time())
    RunDirLock(tmp_path).acquire().release()


def test_another_hosts_lock_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    fresh = _plant_lock(tmp_path, host="node-b", pid=1234, started=time.time() - 60, heartbeat=time.time() - 5)
    with pytest.raises(ConfigError, match=r"host node-b, pid 1234"):
        RunDirLock(tmp_path).acquire()
    holder = json.loads(fresh.read_text())
    _plant_lock(tmp_path, **{**holder, "heartbeat": time.time() - rundir.STALE_SECONDS - 1})
    RunDirLock(tmp_path).acquire().release()
    # A requeued Slurm job takes over its own earlier incarnation's lock, wherever it ran...
    live = {"host": "node-b", "pid": 1234, "started": time.time(), "heartbeat": time.time(), "slurm_job": "777"}
    _plant_lock(tmp_path, **live, slurm_restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunDirLock(tmp_path).acquire().release()
    # ...but another step of the same allocation (same job, same restart count) is refused.
    _plant_lock(tmp_path, **live, slurm_restart="1")
    with pytest.raises(ConfigError, match="Slurm job 777"):
        RunDirLock(tmp_path).acquire()


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '"x"', "null", '{"host": 5, "pid": "a"}'])
def test_a_damaged_lock_is_a_verdict_not_a_traceback(tmp_path, text):
    path = tmp_path / LOCK_FILE
    path.write_text(text)
    with pytest.raises(ConfigError, match="another run is using it"):  # fresh: it may be being written
        RunDirLock(tmp_path).acquire()
    old = time.time() - rundir.STALE_SECONDS - 10
    os.utime(path, (old, old))
    RunDirLock(tmp_path).acquire().release()


def test_the_heartbeat_moves_and_never_writes_over_another_runs_lock(tmp_path):
    lock = RunDirLock(tmp_path, heartbeat=0.05).acquire()
    first = json.loads(lock.path.read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(lock.path.read_text())["heartbeat"] > first
    other = {"host": "node-c", "pid": 1, "started": time.time(), "heartbeat": time.time(), "token": "theirs"}
    lock.path.write_text(json.dumps(other))  # judged dead and taken over meanwhile
    time.sleep(0.3)
    lock.release()
    assert json.loads(lock.path.read_text()) == other


def _train(tmp_path, tiny_model, *extra):
    overrides = small_run_overrides(tiny_model, tmp_path / "run", tmp_path / "cache", "train.max_steps=1", *extra)
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", "train", "--config", str(RECIPE), *overrides, "data.eval=null"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )


def test_train_and_launch_into_a_held_run_dir_stop_at_once(tmp_path, tiny_model, live_pid):
    _plant_lock(tmp_path / "run", host=socket.gethostname(), pid=live_pid, started=time.time(), heartbeat=time.time())
    done = _train(tmp_path, tiny_model)
    errors = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and f"pid {live_pid}" in errors[0] and socket.gethostname() in errors[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written
    overrides = small_run_overrides(tiny_model, tmp_path / "run", tmp_path / "cache")
    launched = subprocess.run(
        [sys.executable, "-m", "qa_dist", "launch", "--config", str(RECIPE), "--no-check", *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert launched.returncode == 2 and launched.stderr.count("\n") == 1, launched.stderr
    assert f"pid {live_pid}" in launched.stderr
    # The holder gone, training runs and leaves no lock behind.
    _plant_lock(tmp_path / "run", host=socket.gethostname(), pid=live_pid, started=time.time() - 3600, heartbeat=0)
    done = _train(tmp_path, tiny_model)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "taking over the lock" in done.stderr and not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_moment_of_an_unreadable_lock_does_not_stop_the_heartbeat(tmp_path, monkeypatch):
    lock = RunDirLock(tmp_path, heartbeat=0.05).acquire()
    real, failures = rundir.read_holder, iter([{}, None])  # an ESTALE, then a missing file, on a shared filesystem

    def flaky(path):
        return next(failures, real(path))

    monkeypatch.setattr(rundir, "read_holder", flaky)
    first = json.loads(lock.path.read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads(lock.path.read_text())["heartbeat"] > first
    lock.release()
    time.sleep(0.2)
    assert not lock.path.exists()  # no heartbeat writes it back after the release
