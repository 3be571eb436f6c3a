"""Checkpoint folders that people and scripts put beside qa-dist's, and markers and states holding
whatever JSON someone wrote: the checkpointer skips what it did not write, never deletes it, and
reads any damaged record as a verdict (an older checkpoint, or one line), never a traceback. One
process, a real Accelerator on CPU."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qa_dist.errors import ConfigError
from qa_dist.runtime.fsutil import replace_dir
from qa_dist.runtime.jsonfile import Damaged
from qa_dist.train.checkpoint import (
    COMPLETE,
    STATE,
    Checkpointer,
    TrainState,
    complete_checkpoints,
    read_state,
    verify,
    write_manifest,
)
from qa_dist.train.checkpoint.manifest import aside_path, partial_path, recover_checkpoints
from qa_dist.train.checkpoint.state import SCHEDULER

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
"""Any JSON value (NaN and infinities included: Python's json writes and reads them)."""


@pytest.fixture(scope="module")
def accelerator():
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return acc


def _checkpointer(acc, run_dir: Path, keep: int = 1) -> Checkpointer:
    return Checkpointer(acc, run_dir, every=2, keep=keep)


@pytest.fixture(scope="module")
def saved(accelerator, tmp_path_factory) -> Path:
    """One intact checkpoint (step 2), copied by the tests that damage it."""
    run_dir = tmp_path_factory.mktemp("saved")
    return _checkpointer(accelerator, run_dir).save(TrainState(step=2))


def _write(checkpoint: Path, name: str, data: bytes) -> None:
    """``name`` rewritten, and, for a state file, COMPLETE rewritten to match: what someone who can
    write the run directory can do (checksums guard against damage, not against them)."""
    (checkpoint / name).write_bytes(data)
    if name != COMPLETE:
        write_manifest(checkpoint, 2)


def _copy(saved: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(saved.parent.parent, run_dir)
    return run_dir


def test_folders_not_named_step_digits_are_skipped_never_deleted_and_named_once(accelerator, saved, tmp_path, caplog):
    run_dir = _copy(saved, tmp_path)
    root = run_dir / "checkpoints"
    shutil.copytree(root / "step-00000002", root / "step-00000002.bak")  # a user's backup
    (root / "step-latest").mkdir()  # a script's link-like folder
    (root / "step-notes.txt").write_text("mine")
    checkpointer = _checkpointer(accelerator, run_dir)
    with caplog.at_level(logging.WARNING):
        state = checkpointer.restore("auto")
        assert state is not None and state.step == 2
        checkpointer.save(TrainState(step=4))  # prunes step 2 (keep_checkpoints=1)
        checkpointer.save(TrainState(step=6))
    assert sorted(p.name for p in root.iterdir()) == [
        "step-00000002.bak",
        "step-00000006",
        "step-latest",
        "step-notes.txt",
    ]
    assert (root / "step-notes.txt").read_text() == "mine"
    warnings = [r.getMessage() for r in caplog.records if "not checkpoints" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert all(name in warnings[0] for name in ("step-00000002.bak", "step-latest", "step-notes.txt"))
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-00000006"]


def test_resume_auto_from_step_0_beside_checkpoint_folders_says_so(accelerator, saved, tmp_path, caplog):
    run_dir = _copy(saved, tmp_path)
    root = run_dir / "checkpoints"
    (root / "step-00000002" / COMPLETE).unlink()  # an older qa-dist's torn save
    (root / "step-latest").mkdir()
    with caplog.at_level(logging.WARNING):
        assert _checkpointer(accelerator, run_dir).restore("auto") is None
    (line,) = [r.getMessage() for r in caplog.records if "starting from step 0" in r.getMessage()]
    assert "step-00000002" in line and "step-latest" in line


def test_a_resave_of_a_step_keeps_the_intact_checkpoint_until_the_new_one_is_complete(
    accelerator, saved, tmp_path, monkeypatch
):
    run_dir = _copy(saved, tmp_path)
    path = run_dir / "checkpoints" / "step-00000002"
    checkpointer = _checkpointer(accelerator, run_dir)
    seen = []

    def save_state(out_dir, *args, **kwargs):
        seen.append((out_dir, verify(path)))  # the intact checkpoint, while the new one is written
        return Accelerator.save_state(accelerator, out_dir, *args, **kwargs)

    monkeypatch.setattr(accelerator, "save_state", save_state)
    checkpointer.save(TrainState(step=2, best_step=2, best_value=1.0, best_metric="eval/f1"))
    ((written, intact_meanwhile),) = seen
    assert Path(written).name.startswith(".step-00000002.partial-") and intact_meanwhile is None
    assert verify(path) is None and read_state(path).best_step == 2
    assert not Path(written).exists() and not aside_path(path).exists()


def test_a_resave_killed_between_its_renames_is_recovered(saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    path = run_dir / "checkpoints" / "step-00000002"
    # What a SIGKILL between the two renames leaves: the intact checkpoint set aside, the new one
    # complete under its hidden name.
    shutil.copytree(path, partial_path(path, "0123456789ab"))
    path.rename(aside_path(path))
    assert complete_checkpoints(run_dir) == []
    recover_checkpoints(path.parent)
    assert verify(path) is None and not aside_path(path).exists()
    # And after the second rename: the superseded one goes.
    shutil.copytree(path, aside_path(path))
    recover_checkpoints(path.parent)
    assert verify(path) is None and not aside_path(path).exists()


def test_replace_dir_moves_a_planted_link_never_its_target(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "new").mkdir()
    (tmp_path / "final").symlink_to(target)
    replace_dir(tmp_path / "new", tmp_path / "final")
    assert (tmp_path / "final").is_dir() and not (tmp_path / "final").is_symlink()
    assert (target / "keep").read_text() == "x"


# --- damaged records ---------------------------------------------------------------------------

RECORDS = [COMPLETE, STATE, SCHEDULER]


@pytest.mark.parametrize("name", RECORDS)
@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
        b"\xff\xfe not utf-8",
        b"1" * 5000,
        b'{"step": 2',
    ],
    ids=["deep-list", "deep-object", "not-utf8", "long-int", "torn"],
)
def test_a_damaged_record_is_a_verdict(saved, tmp_path, name, content):
    run_dir = _copy(saved, tmp_path)
    path = run_dir / "checkpoints" / "step-00000002"
    _write(path, name, content)
    problem = verify(path)
    assert isinstance(problem, str) and problem


def test_a_huge_marker_is_not_read(saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    path = run_dir / "checkpoints" / "step-00000002"
    (path / COMPLETE).write_text(json.dumps({"format": "qa-dist-checkpoint/1", "pad": "x" * (65 << 20)}))
    assert "more than the" in verify(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(RECORDS), value=JSON)
def test_any_json_in_a_checkpoint_record_is_a_verdict(saved, tmp_path_factory, name, value):
    run_dir = _copy(saved, tmp_path_factory.mktemp("any"))
    path = run_dir / "checkpoints" / "step-00000002"
    _write(path, name, json.dumps(value).encode())
    problem = verify(path)  # never raises
    assert problem is None or isinstance(problem, str)
    if name == STATE:
        try:
            state = read_state(path)
        except Damaged:
            return
        assert isinstance(state.step, int) and state.step >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=JSON)
def test_any_files_table_in_complete_is_a_verdict(saved, tmp_path_factory, files):
    run_dir = _copy(saved, tmp_path_factory.mktemp("files"))
    path = run_dir / "checkpoints" / "step-00000002"
    manifest = json.loads((path / COMPLETE).read_text())
    (path / COMPLETE).write_text(json.dumps({**manifest, "files": files}))
    assert isinstance(verify(path), str)  # (an empty table leaves every file unlisted)


def test_resume_auto_falls_back_past_a_damaged_state_and_an_explicit_resume_is_one_line(accelerator, saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    checkpointer = _checkpointer(accelerator, run_dir, keep=2)
    checkpointer.save(TrainState(step=4))
    step4 = run_dir / "checkpoints" / "step-00000004"
    (step4 / STATE).write_text('{"step": "4"}')
    write_manifest(step4, 4)
    assert checkpointer.restore("auto").step == 2
    with pytest.raises(ConfigError, match="not intact: unreadable trainer or scheduler state"):
        checkpointer.restore(str(run_dir / "checkpoints" / "step-00000004"))


def _scheduled(accelerator, run_dir: Path) -> Checkpointer:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Checkpointer(accelerator, run_dir, every=2, keep=2, scheduler=scheduler)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON)
def test_any_scheduler_state_that_is_not_this_schedulers_falls_back_to_an_older_checkpoint(
    accelerator, tmp_path_factory, value
):
    run_dir = tmp_path_factory.mktemp("sched")
    checkpointer = _scheduled(accelerator, run_dir)
    checkpointer.save(TrainState(step=2))
    step4 = checkpointer.save(TrainState(step=4))
    _write(step4, SCHEDULER, json.dumps(value).encode())
    write_manifest(step4, 4)
    assert checkpointer.restore("auto").step == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON)
def test_any_json_in_best_json_or_the_run_dir_lock_is_a_verdict(tmp_path_factory, value):
    from qa_dist.runtime.rundir import LOCK_FILE, describe, holder_alive, read_holder
    from qa_dist.train.best import read_best

    run_dir = tmp_path_factory.mktemp("best")
    (run_dir / "best").mkdir()
    (run_dir / "best" / "best.json").write_text(json.dumps(value))
    try:
        record = read_best(run_dir)
        assert record.mode in ("max", "min") and isinstance(record.step, int)
    except Damaged:
        pass
    (run_dir / LOCK_FILE).write_text(json.dumps(value))
    holder = read_holder(run_dir / LOCK_FILE)
    assert isinstance(holder, dict)
    assert isinstance(holder_alive(holder, run_dir / LOCK_FILE), bool) and isinstance(describe(holder), str)


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b"\xff", b"9" * 5000])
def test_damaged_best_json_lock_and_recorded_windows_are_verdicts(tmp_path, content):
    from qa_dist.eval.run import recorded_windows
    from qa_dist.models import WINDOWS_FILE
    from qa_dist.runtime.rundir import LOCK_FILE, read_holder
    from qa_dist.train.best import read_best

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_bytes(content)
    with pytest.raises(Damaged):
        read_best(tmp_path)
    (tmp_path / LOCK_FILE).write_bytes(content)
    assert read_holder(tmp_path / LOCK_FILE) == {}
    (tmp_path / WINDOWS_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match=WINDOWS_FILE):
        recorded_windows(tmp_path)


def test_a_resumed_run_names_a_damaged_best_json(accelerator, tmp_path, caplog):
    from qa_dist.train.best import BestKeeper

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text("[" * 100_000)
    keeper = BestKeeper(accelerator, tmp_path, "eval/f1", _checkpointer(accelerator, tmp_path), export=None)
    with caplog.at_level(logging.WARNING):
        keeper.check_resumed(TrainState(step=4, best_metric="eval/f1", best_value=0.5, best_step=4))
    (line,) = [r.getMessage() for r in caplog.records if "best.json" in r.getMessage()]
    assert "damaged (nested too deeply)" in line and "step 4" in line


@pytest.mark.parametrize("what", ["file", "empty-folder", "dangling-link", "damaged-checkpoint"])
def test_whatever_holds_the_name_of_a_checkpoint_set_aside_never_costs_it(accelerator, saved, tmp_path, what):
    run_dir = _copy(saved, tmp_path)
    path = run_dir / "checkpoints" / "step-00000002"
    if what == "damaged-checkpoint":
        shutil.copytree(path, aside_path(path))
        (path / STATE).write_text("{}")
    else:
        path.rename(aside_path(path))
        if what == "file":
            path.write_text("junk")
        elif what == "empty-folder":
            path.mkdir()
        else:
            path.symlink_to(tmp_path / "nowhere")
    state = _checkpointer(accelerator, run_dir).restore("auto")
    assert state is not None and state.step == 2 and verify(path) is None


def test_a_name_too_long_in_complete_and_an_unwritable_checkpoints_folder_are_one_line(accelerator, saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    checkpointer = _checkpointer(accelerator, run_dir, keep=2)
    step4 = checkpointer.save(TrainState(step=4))
    manifest = json.loads((step4 / COMPLETE).read_text())
    manifest["files"]["a" * 300] = {"size": 1, "sha256": "0" * 64}
    (step4 / COMPLETE).write_text(json.dumps(manifest))
    assert "too long" in verify(step4)
    assert checkpointer.restore("auto").step == 2
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the folder goes")
    with pytest.raises(ConfigError, match=r"^checkpoint .*step-00000002: .*\n?$"):
        _checkpointer(accelerator, blocked).save(TrainState(step=2))
