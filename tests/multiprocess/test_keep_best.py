"""train.keep_best across a preemption (issue 12 part 4): two gloo processes, SIGUSR1 to rank 1 after
the first evaluation, resume=auto. The best model is exported to run_dir/best with the best step's
weights, its checkpoint survives pruning (keep_checkpoints=1), and the resumed run remembers the
best of the part before the preemption (trainer state, wandb summary); TensorBoard continues in
the same directory with every step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import REPO, _args, _launch, _run, _wait_for_step, _workers
from wandb_log import run_ids, summary

from qa_dist.train.checkpoint import complete_checkpoints


def _evaluations(run_dir: Path) -> dict[int, float]:
    """{step: F1} of every evaluation that finished (an evaluation a signal stopped wrote nothing)."""
    found = {}
    for metrics in (run_dir / "eval").glob("step_*/metrics.json"):
        found[int(metrics.parent.name.split("_")[1])] = json.loads(metrics.read_text())["raw"]["f1"]
    return dict(sorted(found.items()))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_keep_best_survives_preemption_and_resume(tmp_path, tiny_model):
    pytest.importorskip("tensorboard")
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    settings = [
        "train.max_steps=16",
        "eval.every=4",
        "train.checkpoint_every=0",
        "train.keep_checkpoints=1",
        "train.keep_best=eval/f1",
        "logging.trackers=[wandb,tensorboard]",
    ]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*_launch("cpu_ddp"), *_args(tiny_model, cache, run_dir, *settings)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        )
        _wait_for_step(log, 6, proc)  # after the first evaluation (step 4) and its best export
        os.kill(_workers(proc.pid)[1], signal.SIGUSR1)
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode != 0 and "exitcode  : 75" in text, text[-3000:]
    preempted = json.loads((run_dir / "preempted.json").read_text())["step"]
    before = _evaluations(run_dir)
    assert 4 in before and (run_dir / "best" / "best.json").exists()

    resumed = _run([*_launch("cpu_ddp"), *_args(tiny_model, cache, run_dir, *settings, "resume=auto")])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    f1 = _evaluations(run_dir)
    assert set(before) <= set(f1) and max(f1) == 16

    # The best: the first evaluation with the highest F1, over both parts of the run.
    best_step = max(f1, key=lambda s: (f1[s], -s))
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best == {"metric": "eval/f1", "mode": "max", "value": pytest.approx(f1[best_step]), "step": best_step}
    # The last checkpoint remembers it (and would hand it to a further resume).
    state = json.loads((complete_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    assert (state["best_step"], state["best_value"]) == (best_step, pytest.approx(f1[best_step]))
    assert (state["best_f1_step"], state["best_f1"]) == (best_step, pytest.approx(f1[best_step]))
    # keep_checkpoints=1 kept the best step's checkpoint besides the last one.
    steps = [int(p.name.split("-")[1]) for p in complete_checkpoints(run_dir)]
    assert steps == sorted({best_step, 16}), steps
    # best/ holds the best step's weights, verified like the final export, and loads.
    checkpoint = load_file(str(run_dir / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors"))
    exported = load_file(str(run_dir / "best" / "model.safetensors"))
    assert exported.keys() == checkpoint.keys()
    assert all(torch.equal(exported[k], checkpoint[k]) for k in exported)
    check = json.loads((run_dir / "best" / "export_check.json").read_text())
    assert check["max_abs_diff"] <= check["tolerance"] * check["scale"]
    if best_step < 16:
        final = load_file(str(run_dir / "model" / "model.safetensors"))
        assert not all(torch.equal(final[k], exported[k]) for k in final)
    assert not (run_dir / "best.partial").exists() and not (run_dir / "best.old").exists()

    # wandb: one run across both parts; its summary has the best of both parts.
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and run_ids(logs[0]) == run_ids(logs[1])
    end = summary(logs[1])
    assert end["best_eval_f1_step"] == best_step and end["best_eval_f1"] == pytest.approx(f1[best_step])
    assert end["best_model_dir"] == str(run_dir / "best")

    # TensorBoard: one directory, two event files, every step once and in order.
    from tensorboard_log import scalar_steps, tensorboard_events

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = tensorboard_events(run_dir / "tensorboard")
    assert scalar_steps(events, "loss") == list(range(2, 17, 2))
    assert scalar_steps(events, "eval/f1") == list(f1)
    assert preempted < 16


class _OneProcess:
    """What BestKeeper and Checkpointer ask of an Accelerator, for one process."""

    is_main_process = True
    num_processes = 1
    process_index = 0

    def wait_for_everyone(self) -> None:
        pass


def test_an_unknown_keep_best_key_names_the_available_ones(tmp_path):
    from qa_dist.errors import ConfigError
    from qa_dist.train.best import BestKeeper
    from qa_dist.train.checkpoint import TrainState

    keeper = BestKeeper(_OneProcess(), tmp_path, "eval/F1", checkpointer=None, export=None)
    with pytest.raises(
        ConfigError, match=r"train.keep_best: 'eval/F1' is not a metric .* available: eval/exact, eval/f1"
    ):
        keeper.update({"eval/f1": 50.0, "eval/exact": 40.0, "sample_predictions": object()}, TrainState(step=4))


def test_keep_best_direction_and_memory(tmp_path):
    from qa_dist.train.best import BestKeeper
    from qa_dist.train.checkpoint import TrainState

    saved, exported = [], []

    class Saver:
        def save(self, state):
            saved.append((state.step, state.best_value))

    def export(out_dir, files=None):  # the contract of Run.export: the directory and its files, in place
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (files or {}).items():
            (out_dir / name).write_text(text)
        exported.append(out_dir)

    state = TrainState(step=2, best_metric="min:eval/loss", best_value=1.0, best_step=1)  # as resumed
    keeper = BestKeeper(_OneProcess(), tmp_path, "min:eval/loss", Saver(), export)
    assert not keeper.update({"eval/loss": 1.5}, state)  # worse than the remembered best
    assert not keeper.update(None, state)  # an evaluation a signal stopped
    state.step = 3
    assert keeper.update({"eval/loss": 0.5}, state)
    assert saved == [(3, 0.5)] and (state.best_step, state.best_value) == (3, 0.5)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 3
    # Another metric than the one remembered starts afresh.
    other = BestKeeper(_OneProcess(), tmp_path, "eval/f1", Saver(), export)
    assert other.update({"eval/f1": 1.0}, state) and state.best_metric == "eval/f1"


def test_pruning_never_deletes_the_best_checkpoint(tmp_path):
    from qa_dist.train.checkpoint import COMPLETE, STATE, Checkpointer

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        path = root / f"step-{step:08d}"
        path.mkdir(parents=True)
        (path / COMPLETE).write_text("{}")
        (path / STATE).write_text("{}")
    Checkpointer(_OneProcess(), tmp_path, every=2, keep=2)._prune(root / "step-00000008", keep_step=2)
    assert sorted(p.name for p in complete_checkpoints(tmp_path)) == ["step-00000002", "step-00000006", "step-00000008"]


def test_keep_best_without_data_eval_needs_an_evaluator_of_your_own(tmp_path, tiny_model):
    """A custom evaluator brings its own metric: keep_best works without data.eval. Without one,
    qa-dist train and qa-dist launch refuse it before any work (nothing would be evaluated)."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    overrides = _args(tiny_model, cache, run_dir, "train.max_steps=2", "data.eval=null")[5:]
    keep = "train.keep_best=max:eval/score"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(REPO / "tests" / "train_with_evaluator.py")
    done = subprocess.run(
        [sys.executable, script, str(tmp_path / "calls.json"), "1", "data.train=sample:en-train", *overrides, keep],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert (best["metric"], best["value"], best["step"]) == ("eval/score", 2.0, 2)
    for command in (["train"], ["launch", "--cpu", "--dry-run", "--no-check"]):
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "qa_dist",
                *command,
                "--config",
                _args(tiny_model, cache, run_dir)[4],
                *overrides,
                keep,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )
        assert refused.returncode == 2, (command, refused.stderr[-3000:])
        assert refused.stderr.strip().splitlines()[-1] == (
            "qa-dist: error: train.keep_best: 'max:eval/score' needs data.eval (without evaluation there is no "
            "best model to keep)"
        )
