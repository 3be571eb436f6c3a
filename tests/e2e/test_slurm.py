"""On a real one-node Slurm (started by the fixture): qa-dist launch --slurm trains, evaluates and
writes metrics; two srun tasks as two machines rendezvous and train together; USR1 before the time
limit, and the scheduler's SIGTERM to every process of the job (its preemption path), lead to a
checkpoint, a requeue and a resume that ends with the uninterrupted run's results."""

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


TWO_PROCESSES = re.compile(r"^training .*on 2 process\(es\)", re.M)
"""The training loop's start line (it may name the parameter count before the processes)."""


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
    assert TWO_PROCESSES.search(log) and "verified (warm)" not in log
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
    # The dry run wrote the configs the script launches from into the run directory (which Slurm
    # needs before the script runs: the job's log goes there).
    assert (run_dir / "launch" / "accelerate.yaml").exists()
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
    assert TWO_PROCESSES.search(log)
    assert (run_dir / "model" / "config.json").exists()


STEPS = 80


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, tiny_model):
    """An uninterrupted run of STEPS steps (and the warm cache the interrupted runs share)."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, cache = root / "run", root / "cache"
    done = _launch(
        slurm, "--slurm", "--cpu", *small_run_overrides(tiny_model, run_dir, cache, f"train.max_steps={STEPS}")
    )
    assert done.returncode == 0, done.stderr
    jobs = re.findall(r"submitted (?:prepare|training) job (\d+)", done.stdout)
    assert slurm.wait_for(jobs[-1]) == "COMPLETED", slurm.logs()
    return run_dir, cache


def _start_and_wait_for_training(slurm, run_dir, cache, tiny_model):
    done = _launch(
        slurm, "--slurm", "--cpu", *small_run_overrides(tiny_model, run_dir, cache, f"train.max_steps={STEPS}")
    )
    assert done.returncode == 0, done.stderr
    (job,) = re.findall(r"submitted training job (\d+)", done.stdout)
    log = run_dir / f"slurm-{job}.out"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and re.search(r"^step [1-9]\d*: loss", log.read_text(), re.M)):
        time.sleep(0.2)
    return job, log


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes_to_the_same_result(
    slurm, tmp_path, tiny_model, reference
):
    reference_dir, cache = reference
    run_dir = tmp_path / "run"
    job, log = _start_and_wait_for_training(slurm, run_dir, cache, tiny_model)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm.env)
    assert slurm.wait_for(job, timeout=600) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "requeueing job" in text and "preempted at step" in text
    assert re.search(r"resum", text, re.I)
    assert _final_metrics(run_dir, STEPS) == _final_metrics(reference_dir, STEPS)


def _signal_and_time_the_requeue(slurm, job, log, *scancel_args) -> tuple[float, dict]:
    """Send the signal; (seconds until the script asks for the requeue, the preempted.json it saw)."""
    seen = log.read_text().count("requeueing job")
    signalled = time.monotonic()
    subprocess.run(["scancel", *scancel_args, job], check=True, env=slurm.env)
    while log.read_text().count("requeueing job") == seen and time.monotonic() - signalled < 120:
        time.sleep(0.1)
    took = time.monotonic() - signalled
    text = log.read_text()
    assert text.count("requeueing job") == seen + 1, text[-4000:]
    return took, json.loads(text.split("checkpoint written (")[-1].split(")")[0])


def test_sigterm_from_the_scheduler_checkpoints_within_killwait_requeues_and_resumes(
    slurm, tmp_path, tiny_model, reference
):
    """The scheduler's own preemption path. Slurm's preemption (preempt.html): the job "is
    immediately sent SIGCONT and SIGTERM signals", then at the end of the partition's GraceTime
    SIGCONT, SIGTERM and, KillWait later, SIGKILL. That first SIGTERM goes to every task of every
    step (torchrun's agent and the training processes; slurmctld signals a job without the batch
    step for anything but SIGKILL), which is exactly what `scancel --signal=TERM JOB` sends. The run
    must checkpoint and the script ask for the requeue well before the SIGKILL: the test allows
    KillWait (10 s on this cluster), the least a GraceTime of 0 would leave. Then, after the resume,
    a SIGTERM to the batch shell alone (`scancel --signal=TERM --batch`, as `--signal=B:TERM@...`
    sends it): the trapped shell passes it on, and the run checkpoints and requeues again. The
    twice-resumed run ends with the uninterrupted run's metrics and predictions.

    Not reproducible with checkpointing, on Slurm 22.05: a SIGTERM to the batch step too (plain
    scancel, `scancel --full`, a preemption with GraceTime=0): srun itself gets it and answers with
    SIGKILL to its tasks at once ("forcing job termination"); see docs/launching.md."""
    reference_dir, cache = reference
    run_dir = tmp_path / "run"
    job, log = _start_and_wait_for_training(slurm, run_dir, cache, tiny_model)
    took, marker = _signal_and_time_the_requeue(slurm, job, log, "--signal=TERM")
    assert took < slurm_cluster.KILL_WAIT, f"{took:.1f} s from SIGTERM to the requeue: more than KillWait"
    assert marker["signal"] == "SIGTERM" and marker["exit_code"] == 75
    first = marker["step"]

    # The requeued job resumes; wait for it to train past the checkpoint, then signal its batch shell.
    def trains_again() -> bool:
        text = log.read_text()
        return "resumed from" in text and bool(re.search(r"^step \d+: loss", text.split("resumed from")[-1], re.M))

    deadline = time.time() + 300
    while time.time() < deadline and not trains_again():
        time.sleep(0.2)
    took, marker = _signal_and_time_the_requeue(slurm, job, log, "--signal=TERM", "--batch")
    assert took < slurm_cluster.KILL_WAIT, f"{took:.1f} s from SIGTERM to the requeue: more than KillWait"
    assert marker["signal"] == "SIGTERM" and marker["step"] > first

    assert slurm.wait_for(job, timeout=600) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "SIGTERM (preemption" in text and text.count("resumed from") >= 2
    assert _final_metrics(run_dir, STEPS) == _final_metrics(reference_dir, STEPS)


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
    assert TWO_PROCESSES.search(log.read_text())
    assert (run_dir / "model" / "config.json").exists()
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()


def _job_state(slurm, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=slurm.env).stdout
    return re.search(r"JobState=(\S+)", out).group(1)


def test_a_notice_to_one_job_reaches_only_its_own_processes_on_a_shared_node(slurm, tmp_path, tiny_model, reference):
    """Two jobs of the same user share the node. One is preempted (USR1 to its batch shell, as
    --signal=B:USR1@... sends it before the time limit): it checkpoints and requeues. The other,
    training all the while, trains on undisturbed (no checkpoint on a signal, no requeue) and ends
    with the weights and predictions of the same run alone."""
    from safetensors.torch import load_file

    reference_dir, cache = reference
    undisturbed, victim = tmp_path / "undisturbed", tmp_path / "victim"
    victim_args = small_run_overrides(tiny_model, victim, cache, "train.max_steps=100000", "train.checkpoint_every=0")
    done = _launch(slurm, "--slurm", "--cpu", "--gpus-per-node", "1", *victim_args)
    assert done.returncode == 0, done.stderr
    (other,) = re.findall(r"submitted training job (\d+)", done.stdout)
    other_log = victim / f"slurm-{other}.out"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        other_log.exists() and re.search(r"^step [1-9]\d*: loss", other_log.read_text(), re.M)
    ):
        time.sleep(0.2)
    job, log = _start_and_wait_for_training(slurm, undisturbed, cache, tiny_model)
    _signal_and_time_the_requeue(slurm, other, other_log, "--signal=USR1", "--batch")
    time.sleep(2)  # what a stray signal would do takes a step or two: a checkpoint, an exit
    assert _job_state(slurm, job) == "RUNNING", log.read_text()[-4000:]
    subprocess.run(["scancel", other], check=True, env=slurm.env)  # it has shown what it does
    assert slurm.wait_for(job, timeout=600) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "preempted at step" not in text and "requeueing job" not in text, text[-4000:]
    assert _final_metrics(undisturbed, STEPS) == _final_metrics(reference_dir, STEPS)
    weights, alone = (load_file(str(d / "model" / "model.safetensors")) for d in (undisturbed, reference_dir))
    assert weights.keys() == alone.keys() and all(bool((weights[k] == alone[k]).all()) for k in weights)
