"""SIGKILL inside a checkpoint save or an export: what is left is either complete or ignored.

Every rank kills itself at a named point (``QA_DIST_KILL_AT``, qa_dist.runtime.faults) the second
time it saves, so one intact checkpoint exists; ``resume=auto`` must continue from it and reach the
weights of the uninterrupted run. A torn export is never the model: ``run_dir/model`` and
``run_dir/best`` only ever hold a verified export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_run_overrides
from safetensors.torch import load_file

from qa_dist.train.checkpoint import complete_checkpoints, verify
from qa_dist.train.checkpoint.manifest import aside_path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "qa_dist" / "configs" / "runs" / "cpu_sample_en.yaml"
STEPS = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2", "data.eval=null"]


def _train(model, cache, run_dir, *extra, processes: int = 2, kill_at: str | None = None):
    launcher = [sys.executable]
    if processes > 1:
        accelerate = [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu_ddp.yaml"),
        ]
        launcher += [*accelerate, "--num_processes", str(processes)]
    env = {k: v for k, v in os.environ.items() if k != "QA_DIST_KILL_AT"} | {"OMP_NUM_THREADS": "1"}
    if kill_at:
        env["QA_DIST_KILL_AT"] = kill_at
    args = ["-m", "qa_dist", "train", "--config", str(RECIPE), *small_run_overrides(model, run_dir, cache, *extra)]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model):
    cache = tmp_path_factory.mktemp("torn-cache")
    run_dir = tmp_path_factory.mktemp("torn") / "straight"
    done = _train(tiny_model, cache, run_dir, *STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    return cache, _weights(run_dir)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "point", ["checkpoint:before-weights", "checkpoint:between-files", "checkpoint:before-complete"]
)
def test_sigkill_inside_a_checkpoint_save_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model, straight, point):
    cache, expected = straight
    run_dir = tmp_path / "run"
    killed = _train(tiny_model, cache, run_dir, *STEPS, kill_at=f"{point}@2")  # the save at step 4
    assert killed.returncode != 0 and not (run_dir / "model").exists(), killed.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-00000002"]
    resumed = _train(tiny_model, cache, run_dir, *STEPS, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-00000002" in resumed.stderr
    weights = _weights(run_dir)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["export:before-weights", "export:before-publish"])
def test_a_torn_final_export_is_never_the_model(tmp_path, tiny_model, point):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    steps = ["train.max_steps=2", "train.checkpoint_every=0", "data.eval=null"]
    killed = _train(tiny_model, cache, run_dir, *steps, processes=1, kill_at=point)
    assert killed.returncode != 0 and not (run_dir / "model").exists(), killed.stderr[-2000:]
    resumed = _train(tiny_model, cache, run_dir, *steps, "resume=auto", processes=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / "model.partial").exists()
    assert json.loads((run_dir / "export_check.json").read_text())["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_a_torn_best_export_is_never_the_best_model(tmp_path, tiny_model):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    steps = ["train.max_steps=2", "train.checkpoint_every=0", "eval.every=1", "train.keep_best=eval/f1"]
    # The first export of the run is the best model's, at step 1.
    killed = _train(tiny_model, cache, run_dir, *steps, processes=1, kill_at="export:before-publish")
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert not (run_dir / "best").exists() and (run_dir / "best.partial" / "model.safetensors").is_file()
    resumed = _train(tiny_model, cache, run_dir, *steps, "resume=auto", processes=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["step"] in (1, 2) and (run_dir / "best" / "model.safetensors").is_file()
    assert not (run_dir / "best.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["checkpoint:before-weights@2", "checkpoint:before-complete@2", "checkpoint:between-renames@2"]
)
def test_a_best_resave_killed_midway_never_loses_the_only_checkpoint(tmp_path, tiny_model, point):
    """keep_best with keep_checkpoints=1: the last step is checkpointed, then its evaluation is a
    new best and the best keeper saves that step again. A SIGKILL inside that re-save (before the
    weights, before the marker, between the renames that put it in place) leaves the first save
    of the step intact, and resume=auto continues from it, not from step 0."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    steps = ["train.max_steps=2", "train.checkpoint_every=0", "train.keep_checkpoints=1", "train.keep_best=eval/f1"]
    killed = _train(tiny_model, cache, run_dir, *steps, processes=1, kill_at=point)
    assert killed.returncode != 0 and (run_dir / "best" / "best.json").exists(), killed.stderr[-2000:]
    # The first save, in place or (killed between the renames) set aside under a hidden name.
    step2 = run_dir / "checkpoints" / "step-00000002"
    assert any(p.is_dir() and verify(p) is None for p in (step2, aside_path(step2))), killed.stderr[-2000:]
    resumed = _train(tiny_model, cache, run_dir, *steps, "resume=auto", processes=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "(step 2)" in resumed.stderr, resumed.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-00000002"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002"]
    assert json.loads((run_dir / "best" / "best.json").read_text())["step"] == 2
