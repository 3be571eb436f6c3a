"""qa-dist launch: the memory estimate behind --strategy auto, the accelerate line (num_processes
over all nodes), the rendered sbatch script, the environment checks, and signals to a running launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, small_run_overrides

from qa_dist import launch as L
from qa_dist.config import load_config

BERT_LARGE = L.ModelShape(parameters=335_000_000, hidden=1024, layers=24, heads=16)
XLMR_XL = L.ModelShape(parameters=3_500_000_000, hidden=2560, layers=36, heads=32)
CONFIG = REPO / "configs" / "runs" / "cpu_sample_en.yaml"


def test_state_bytes_follow_the_16_bytes_per_parameter_rule():
    p, n = 1_000_000, 8
    assert L.state_bytes("ddp", p, n) == (16e6, 0.0)
    assert L.state_bytes("zero2", p, n) == (2e6 + 14e6 / 8, 0.0)
    assert L.state_bytes("zero3", p, n) == (2e6, 0.0)
    assert L.state_bytes("zero3_offload", p, n) == (4e6 / 8, 12e6 / 8)


def test_auto_prefers_ddp_and_moves_up_only_when_needed():
    # BERT-large fine-tuning on 80 GiB GPUs: plain DDP fits; ZeRO-3 would only cost speed.
    assert L.choose_strategy(BERT_LARGE, 8, 32, 384, 80.0)[0] == "ddp"
    # 3.5B parameters: 56 GB of states per GPU under DDP do not fit 40 GiB; sharded over 8 they do.
    chosen, estimates = L.choose_strategy(XLMR_XL, 8, 4, 384, 40.0)
    assert chosen == "zero2" and not estimates[0].fits
    assert L.choose_strategy(XLMR_XL, 2, 4, 384, 24.0)[0] in ("zero3", "zero3_offload")
    with pytest.raises(Exception, match="no strategy fits"):
        L.choose_strategy(XLMR_XL, 1, 64, 512, 8.0)


def test_num_processes_is_the_total_over_nodes_and_machine_rank_is_read_inside_srun():
    plan = L.Plan("zero3", nodes=4, processes_per_node=8, cpu=False)
    args = L.accelerate_args(plan, machine_rank="$SLURM_PROCID", head="$HEAD_NODE", port="$PORT")
    assert args[args.index("--num_processes") + 1] == "32"
    assert args[args.index("--num_machines") + 1] == "4"
    assert args[args.index("--deepspeed_config_file") + 1].endswith("configs/deepspeed/zero3.json")
    config = load_config(str(CONFIG), ["run_dir=/tmp/x"])
    script = L.render_sbatch(plan, config, str(CONFIG), ["train.lr=3e-5"], partition="gpu", time_limit="4:00:00")
    import re

    assert not re.findall(r"@[A-Z_]+@", script)  # every placeholder filled
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=4:00:00" in script
    assert '--machine_rank "$SLURM_PROCID"' in script  # quoted for the task, not expanded at submission
    assert "launch_on_node() {" in script and "export -f launch_on_node" in script
    assert "train.lr=3e-5 resume=auto" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_cpu_plans_run_ddp_over_gloo_and_refuse_strategies_without_a_cpu_path():
    assert L.Plan("ddp", 1, 2, cpu=True).accelerate_config.name == "cpu_ddp.yaml"
    with pytest.raises(Exception, match="needs GPUs"):
        _ = L.Plan("fsdp", 1, 2, cpu=True).accelerate_config


def _launch(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", "launch", "--config", str(CONFIG), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )


def test_dry_run_prints_the_accelerate_line(tmp_path):
    done = _launch("--dry-run", f"run_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=3")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "accelerate.commands.launch" in line and "--num_processes 2" in line
    assert "cpu_ddp.yaml" in line and line.endswith("train.max_steps=3")


def test_environment_checks_stop_a_launch_before_cluster_time_is_spent(tmp_path):
    import os

    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "missing"), "HF_HUB_OFLINE": "1"}
    done = _launch("--dry-run", f"run_dir={tmp_path}", "data.train=/nowhere/train.json", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "HF_DATASETS_CACHE" in done.stderr and "HF_HUB_OFLINE" in done.stderr
    assert "/nowhere/train.json does not exist" in done.stderr


@pytest.fixture(scope="module")
def launch_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("launch-cache")


def _processes_of(run_dir) -> list:
    """Live processes whose command line names ``run_dir`` (the launcher and every training process)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run_dir) in part for part in p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_qa_dist_launch_checkpoints_and_exits_75(tmp_path, tiny_model, launch_cache, sig):
    """SIGTERM or SIGUSR1 to the qa-dist launch process alone (as a scheduler or `kill` sends it):
    every training process checkpoints, the launch exits 75, and nothing is left running."""
    from qa_dist.train.checkpoint import complete_checkpoints

    run_dir = tmp_path / "run"
    overrides = small_run_overrides(tiny_model, run_dir, launch_cache, "train.max_steps=100000")
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qa_dist", "launch", "--config", str(CONFIG), "--cpu", "--no-check", *overrides],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 120
        while "step 2:" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        text = log.read_text()
        assert code == 75, text[-3000:]
        marker = json.loads((run_dir / "preempted.json").read_text())
        assert marker == {"step": marker["step"], "signal": sig.name, "exit_code": 75} and marker["step"] >= 2
        (checkpoint,) = complete_checkpoints(run_dir)
        assert checkpoint.name == f"step-{marker['step']:08d}"
        deadline = time.monotonic() + 10  # the launcher exits after its children; allow reaping
        while (alive := _processes_of(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, [p.info["cmdline"] for p in alive]
    finally:
        for p in _processes_of(run_dir):  # only what this test started: they name its run directory
            p.kill()
        if proc.poll() is None:
            proc.kill()
