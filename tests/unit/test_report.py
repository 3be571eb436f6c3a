"""Rank zero's output has one owner (qa_dist.runtime.report), and the batch plan's one-step check comes
before any model is loaded."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, small_run_overrides

from qa_dist.config import TrainConfig
from qa_dist.errors import ConfigError
from qa_dist.features.batches import epoch_plan, micro_batches
from qa_dist.runtime.report import SilentReporter, reporter_for


def test_rank_zero_reports_and_the_others_are_silent(tmp_path, capsys):
    zero, other = reporter_for(0), reporter_for(1)
    assert zero.active and not other.active and isinstance(other, SilentReporter)
    for report, name in ((zero, "zero"), (other, "other")):
        report.line(f"line from {name}")
        report.line(f"result from {name}", stdout=True)
        report.status(f"status from {name}")
        report.write_json(tmp_path / name / "record.json", {"rank": name})
        bar = report.bar(3, desc="work", unit="step")
        bar.update(3)
        bar.close()
    out, err = capsys.readouterr()
    assert out == "result from zero\n"
    assert "line from zero" in err and "status from zero" in err and "other" not in err
    assert (tmp_path / "zero" / "record.json").read_text() == '{\n  "rank": "zero"\n}'
    assert not (tmp_path / "other").exists()
    # --quiet: no progress messages, the lines stay.
    quiet = reporter_for(0, progress=False)
    quiet.status("hidden")
    quiet.line("shown")
    assert capsys.readouterr().err == "shown\n"
    # A run record is never half-written: the value is checked before the file is touched.
    zero.write_json(tmp_path / "zero" / "record.json", {"x": 1})
    with pytest.raises(ValueError):
        zero.write_json(tmp_path / "zero" / "record.json", {"x": float("nan")})
    assert (tmp_path / "zero" / "record.json").read_text() == '{\n  "x": 1\n}'
    zero.remove(tmp_path / "zero" / "record.json")
    assert not (tmp_path / "zero" / "record.json").exists()


RANK_CHECK = re.compile(r"is_main_process|\brank == 0|\.rank != 0|process_index == 0")
COORDINATION = {
    # Writer elections inside collective protocols, not output (see qa_dist/runtime/report.py).
    "runtime/report.py",
    "runtime/dist.py",  # the rank a gather goes to
    "features/cache.py",  # which process builds an entry, the shared-filesystem probe
    "train/checkpoint/checkpointer.py",  # a checkpoint's markers and pruning, between barriers
    "train/best.py",  # the best keeper's decision, made on rank zero for all
    "train/export.py",  # save_pretrained(is_main_process=...) and the export check
    "train/setup.py",  # who holds the run directory's lock, who puts a verified export in place
    "launch/accelerate.py",  # accelerate's --main_process_ip/port flags
}


def test_rank_checks_only_in_the_reporter_and_coordination():
    package = REPO / "qa_dist"
    found = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if RANK_CHECK.search(path.read_text(encoding="utf-8"))
    )
    assert set(found) <= COORDINATION, set(found) - COORDINATION


def test_micro_batches_resume_inside_an_epoch_where_the_fresh_run_was():
    lengths = np.random.default_rng(0).integers(20, 200, size=103)
    train = TrainConfig(per_device_batch_size=4, gradient_accumulation_steps=2, seed=7)
    assert train.steps_per_epoch(len(lengths), 2) == 103 // 8 // 2 == 6
    fresh = micro_batches(lengths, train, rank=1, world_size=2)
    first = [next(fresh) for _ in range(30)]  # 12 usable micro-steps per epoch: into epoch 2
    resumed = micro_batches(lengths, train, rank=1, world_size=2, epoch=first[17][0], micro_step=first[17][1])
    again = [next(resumed) for _ in range(13)]
    assert [(e, m) for e, m, _ in again] == [(e, m) for e, m, _ in first[17:]]
    assert all((a[2] == b[2]).all() for a, b in zip(again, first[17:], strict=True))
    plan = epoch_plan(lengths, batch_size=4, world_size=2, seed=7, epoch=1)
    assert (first[12][2] == plan[0, 1]).all() and first[12][:2] == (1, 0)


def test_a_plan_that_fills_no_step_is_one_line_naming_the_keys():
    train = TrainConfig(per_device_batch_size=8, gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match=r"^63 training windows do not fill one optimizer step of 2 process") as e:
        train.steps_per_epoch(63, 2)
    assert "train.per_device_batch_size 8" in str(e.value) and "train.gradient_accumulation_steps 4" in str(e.value)
    with pytest.raises(ConfigError):
        next(micro_batches(np.ones(63, dtype=np.int64), train, 0, 2))


def test_train_stops_on_a_plan_that_fills_no_step_before_loading_the_model(tmp_path, tiny_model):
    """The weights are garbage: had the model been loaded first, its error would come instead."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    overrides = small_run_overrides(model, tmp_path / "run", tmp_path / "cache", "train.per_device_batch_size=4096")
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "train", "--config", str(REPO / "configs/runs/cpu_sample_en.yaml")]
        + overrides,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert len(lines) == 1 and "do not fill one optimizer step" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_run_summary_says_when_a_model_only_abstains():
    from qa_dist.train.tracking import _f1_row, abstention_note

    summary = {"best_eval_f1": 48.2, "best_eval_f1_step": 20, "best_eval_has_ans_f1": 0.0}
    summary |= {"final_eval_f1": 31.5, "final_eval_f1_step": 22, "final_eval_has_ans_f1": 12.25}
    assert _f1_row(summary, "best") == "48.20 at step 20 (answerable questions: F1 0.00)"
    assert _f1_row(summary, "final") == "31.50 at step 22 (answerable questions: F1 12.25)"
    assert abstention_note(12.25) is None and abstention_note(None) is None  # CMRC without unanswerables
    assert "answers no answerable question" in abstention_note(0.0)


def test_a_kill_between_the_two_renames_of_an_export_loses_nothing(tmp_path):
    from qa_dist.runtime.fsutil import recover_dir, replace_dir

    (tmp_path / "model.old").mkdir()  # the previous export, set aside; the kill came before the second rename
    (tmp_path / "model.old" / "weights").write_text("previous")
    recover_dir(tmp_path / "model")
    assert (tmp_path / "model" / "weights").read_text() == "previous"
    (tmp_path / "model.partial").mkdir()
    (tmp_path / "model.partial" / "weights").write_text("new")
    replace_dir(tmp_path / "model.partial", tmp_path / "model")
    assert (tmp_path / "model" / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"
    ]
