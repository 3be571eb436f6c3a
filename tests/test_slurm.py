"""On a real one-node Slurm (started by the fixture): qa-dist launch --slurm trains, evaluates and
writes metrics; two srun tasks as two machines rendezvous and train together; USR1 before the time
limit leads to a checkpoint, a requeue and a resume that ends with the uninterrupted run's results."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import slurm_cluster
from conftest import REPO, small_run_overrides

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(slurm_cluster.available() is not None, reason=str(slurm_cluster.available())),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _launch(slurm, *args):
    cmd = [sys.executable, "-m", "qa_dist", "launch", "--config", str(REPO / "configs/runs/cpu_sample_en.yaml")]
    env = {**slurm.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _final_metrics(run_dir, step):
    metrics = json.loads((run_dir / "eval" / f"step_{step}" / "metrics.json").read_text())
    return metrics["raw"], (run_dir / "eval" / f"step_{step}" / "predictions.json").read_text()


def test_launch_slurm_runs_prepare_then_training_on_two_processes(slurm, tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    done = _launch(
        slurm, "--slurm", "--cpu", *small_run_overrides(tiny_model, run_dir, tmp_path / "cache", "train.max_steps=12")
    )
    assert done.returncode == 0, done.stderr + slurm.logs()
    prepare, train = re.findall(r"submitted (?:prepare|training) job (\d+)", done.stdout)
    assert f"(after {prepare})" in done.stdout  # the cache was cold: training waits for the CPU job
    assert slurm.wait_for(prepare) == "COMPLETED", slurm.logs()
    assert slurm.wait_for(train) == "COMPLETED", (run_dir / f"slurm-{train}.out").read_text()[-4000:]
    log = (run_dir / f"slurm-{train}.out").read_text()
    assert "training on 2 process(es)" in log and "verified (warm)" not in log
    raw, predictions = _final_metrics(run_dir, 12)
    assert raw["missing"] == 0 and raw["total"] == len(json.loads(predictions))
    # A second launch finds the cache warm: one job, no prepare.
    again = _launch(
        slurm, "--slurm", "--cpu", "--dry-run", *small_run_overrides(tiny_model, run_dir, tmp_path / "cache")
    )
    assert again.returncode == 0 and "qa_dist prepare" not in again.stdout


def test_two_srun_tasks_as_two_machines_train_together(slurm, tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    overrides = small_run_overrides(tiny_model, run_dir, tmp_path / "cache", "train.max_steps=6")
    done = _launch(slurm, "--slurm", "--cpu", "--nodes", "2", "--gpus-per-node", "1", "--dry-run", *overrides)
    assert done.returncode == 0, done.stderr
    run_dir.mkdir()  # Slurm opens the job's log there before the script runs
    script = tmp_path / "train.sbatch"
    script.write_text(done.stdout[done.stdout.index("#!/bin/bash\n# qa-dist training") :])
    assert '--machine_rank "$SLURM_PROCID"' in script.read_text()
    # The one host plays two nodes: two tasks on it, machine ranks 0 and 1.
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", str(script)],
        capture_output=True,
        text=True,
        env=slurm.env,
        cwd=tmp_path,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip()
    state = slurm.wait_for(job)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "training on 2 process(es)" in log
    assert (run_dir / "model" / "config.json").exists()


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes_to_the_same_result(slurm, tmp_path, tiny_model):
    steps = 80
    reference = tmp_path / "reference"
    cache = tmp_path / "cache"
    done = _launch(
        slurm, "--slurm", "--cpu", *small_run_overrides(tiny_model, reference, cache, f"train.max_steps={steps}")
    )
    assert done.returncode == 0, done.stderr
    jobs = re.findall(r"submitted (?:prepare|training) job (\d+)", done.stdout)
    assert slurm.wait_for(jobs[-1]) == "COMPLETED"

    run_dir = tmp_path / "run"
    done = _launch(
        slurm, "--slurm", "--cpu", *small_run_overrides(tiny_model, run_dir, cache, f"train.max_steps={steps}")
    )
    (job,) = re.findall(r"submitted training job (\d+)", done.stdout)
    log = run_dir / f"slurm-{job}.out"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and re.search(r"^step [1-9]\d*: loss", log.read_text(), re.M)):
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm.env)
    assert slurm.wait_for(job, timeout=600) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "requeueing job" in text and "preempted at step" in text
    assert re.search(r"resum", text, re.I)
    assert _final_metrics(run_dir, steps) == _final_metrics(reference, steps)


def test_a_run_dir_full_of_shell_and_sbatch_syntax_is_one_literal_path_on_slurm(slurm, tmp_path, tiny_model):
    """The rendered scripts as sbatch and bash really read them (issue 14 item 1): spaces, quotes,
    $(...), ;, #, % and backticks in the run directory neither run nor split anything; the job logs
    land in that very directory and training writes there."""
    run_dir = tmp_path / 'run $(touch pwned); `touch pwned` it\'s "100%j" a#b'
    cmd = [sys.executable, "-m", "qa_dist", "launch", "--config", str(REPO / "configs/runs/cpu_sample_en.yaml")]
    overrides = small_run_overrides(tiny_model, run_dir, tmp_path / "cache", "train.max_steps=2")
    done = subprocess.run(
        [*cmd, "--slurm", "--cpu", *overrides],
        capture_output=True,
        text=True,
        env={**slurm.env, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,  # the jobs run here: a `touch pwned` that ran would leave its file here
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    prepare, train = re.findall(r"submitted (?:prepare|training) job (\d+)", done.stdout)
    assert slurm.wait_for(prepare) == "COMPLETED", slurm.logs()
    state = slurm.wait_for(train)
    log = run_dir / f"slurm-{train}.out"  # sbatch read --output as one literal path (%% for %)
    assert state == "COMPLETED" and log.exists(), sorted(str(p) for p in tmp_path.rglob("*.out"))
    assert (run_dir / f"slurm-prepare-{prepare}.out").exists()
    assert "training on 2 process(es)" in log.read_text()
    assert (run_dir / "model" / "config.json").exists()
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()
