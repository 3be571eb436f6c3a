"""Builders of one feature cache entry at once, without flock: at most duplicate work. Each removes
only the temporary folders proved abandoned, and a damaged entry another builder has dealt with
already is left to it."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

import qa_dist.features.cache as cache_module
from qa_dist.features.builders import OWNER, STALE_SECONDS, BuildFolder, is_stale, owner_record, remove_stale
from qa_dist.features.cache import Built, FeatureCache, check_entry

KEY = "0123456789abcdef0123456789abcdef"
WAIT = 60.0
"""Seconds one builder process waits for the other to reach its point (then the test fails)."""


def _built(rows: int = 2000) -> Built:
    features = pa.table({"input_ids": pa.array([[i, i + 1, i + 2] for i in range(rows)], pa.list_(pa.int32()))})
    examples = pa.table({"id": pa.array([f"q{i}" for i in range(rows)])})
    return Built(tables={"features": features, "examples": examples}, info={"num_examples": rows, "num_features": rows})


def _wait_for_file(path: Path) -> bool:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _no_flock(f, op):
    raise OSError(errno.ENOLCK, "No locks available")


def _builder_process(root: str, role: str, result: str) -> None:
    """One builder of KEY on a filesystem without flock. ``first`` stops inside its publish, its
    temporary folder made and a table file open, until ``second`` has cleaned up and is building;
    ``second`` publishes after ``first`` did, so its rename is the one that loses."""
    fcntl.flock = _no_flock  # this process only: the filesystem has no flock
    root_path, marks = Path(root), Path(root).parent / "marks"
    original_stream = pa.ipc.new_stream
    outcome: dict = {"role": role}

    def first_stream(sink, schema, **kw):
        if not (marks / "first-writing").exists():
            (marks / "first-writing").touch()
            outcome["second_started"] = _wait_for_file(marks / "second-building")
        return original_stream(sink, schema, **kw)

    def second_stream(sink, schema, **kw):
        outcome["first_published"] = _wait_for_file(root_path / KEY)
        return original_stream(sink, schema, **kw)

    def second_build() -> Built:
        # This builder has cleaned up the key's temporary folders: the first one's must be there.
        outcome["first_tmp_seen"] = sorted(p.name for p in root_path.glob(f".tmp-{KEY}-*"))
        (marks / "second-building").touch()
        return _built()

    try:
        if role == "first":
            pa.ipc.new_stream = first_stream
            entry = FeatureCache(root, wait_timeout=WAIT).open_or_build(KEY, _built)
        else:
            if not _wait_for_file(marks / "first-writing"):
                raise RuntimeError("the first builder never started writing")
            pa.ipc.new_stream = second_stream
            entry = FeatureCache(root, wait_timeout=WAIT).open_or_build(KEY, second_build)
        outcome |= {"ok": True, "built_here": entry.built_here}
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        outcome |= {"ok": False, "error": f"{type(e).__name__}: {e}"}
    Path(result).write_text(json.dumps(outcome))


def test_two_builders_of_one_key_without_flock_both_succeed_and_publish_one_entry(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    (tmp_path / "marks").mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = {
        role: ctx.Process(target=_builder_process, args=(str(root), role, str(tmp_path / f"{role}.json")))
        for role in ("first", "second")
    }
    for p in procs.values():
        p.start()
    for p in procs.values():
        p.join(timeout=3 * WAIT)
        if p.is_alive():
            p.kill()
    results = {role: json.loads((tmp_path / f"{role}.json").read_text()) for role in procs}
    assert results["first"]["ok"], results
    assert results["second"]["ok"], results
    # They overlapped for real: the first waited inside its publish until the second was building,
    # and the second's cleanup left the first's folder in place.
    assert results["first"]["second_started"] and results["second"]["first_published"]
    assert len(results["second"]["first_tmp_seen"]) == 1
    assert results["first"]["built_here"] and results["second"]["built_here"]  # duplicate work, no more
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [KEY]
    assert check_entry(root / KEY, KEY, full=True) is None
    assert not (root / KEY / OWNER).exists()
    assert [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".corrupt-"))] == []


# -- which temporary folders are abandoned ----------------------------------------------------------


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def _tmp_folder(
    root: Path, owner, age: float, *, file_age: float | None = None, host: str = "some-host", pid: int = 1
) -> Path:
    """A build's temporary folder of ``host`` and ``pid`` with a half-written table and ``owner`` (a
    record, raw text, or None for no owner file), nothing in it changed for ``age`` seconds (its
    table ``file_age``)."""
    folder = root / f".tmp-{KEY}-{host}-{pid}-{os.urandom(4).hex()}"
    folder.mkdir(parents=True)
    (folder / "features.arrow").write_bytes(b"\0" * 100)
    if owner is not None:
        (folder / OWNER).write_text(owner if isinstance(owner, str) else json.dumps(owner))
    now = time.time()
    for path in (folder / "features.arrow", folder / OWNER, folder):
        if path.exists():
            t = now - (file_age if file_age is not None and path.name == "features.arrow" else age)
            os.utime(path, (t, t))
    return folder


OLD = STALE_SECONDS + 60
FRESH = 5.0


def _this_process(**changes) -> dict:
    return owner_record() | changes


@pytest.mark.parametrize(
    ("owner", "age", "file_age", "stale"),
    [
        pytest.param(lambda: _this_process(), OLD, None, False, id="live-pid-this-host-kept-however-old"),
        pytest.param(lambda: _this_process(pid=_dead_pid()), FRESH, None, True, id="dead-pid-this-host-removed"),
        pytest.param(
            lambda: _this_process(started=owner_record()["started"] - 1000),
            FRESH,
            None,
            True,
            id="pid-reused-by-a-later-process-removed",
        ),
        pytest.param(
            lambda: _this_process(host="other-node"), FRESH, None, False, id="other-host-fresh-heartbeat-kept"
        ),
        pytest.param(lambda: _this_process(host="other-node"), OLD, None, True, id="other-host-old-heartbeat-removed"),
        pytest.param(
            lambda: _this_process(host="other-node"),
            OLD,
            FRESH,
            False,
            id="other-host-old-heartbeat-file-being-written",
        ),
        pytest.param(
            lambda: _this_process(pid=_dead_pid(), boot="another-boot"),
            FRESH,
            None,
            False,
            id="this-host-name-other-boot-judged-by-heartbeat",
        ),
        pytest.param(lambda: None, FRESH, None, False, id="no-owner-file-fresh-kept"),
        pytest.param(lambda: None, OLD, None, True, id="no-owner-file-old-removed"),
        pytest.param(lambda: "{half-writ", FRESH, None, False, id="damaged-owner-file-fresh-kept"),
        pytest.param(lambda: '{"host": 1, "pid": true}', OLD, None, True, id="damaged-owner-file-old-removed"),
    ],
)
def test_only_temporary_folders_proved_abandoned_are_removed(tmp_path, owner, age, file_age, stale):
    folder = _tmp_folder(tmp_path, owner(), age, file_age=file_age)
    assert is_stale(folder) is stale
    assert remove_stale(tmp_path, KEY) == ([folder] if stale else [])
    assert folder.exists() is not stale


@pytest.mark.parametrize(
    ("pid", "age", "stale"),
    [
        pytest.param(_dead_pid, FRESH, True, id="dead-pid-in-the-name-removed"),
        pytest.param(os.getpid, FRESH, False, id="live-pid-in-the-name-fresh-kept"),
        pytest.param(os.getpid, OLD, True, id="live-pid-in-the-name-old-removed"),
    ],
)
def test_without_an_owner_file_the_folders_name_says_whose_it_is(tmp_path, pid, age, stale):
    """A build killed before it wrote its owner file (or an older qa-dist's build) on this host."""
    folder = _tmp_folder(tmp_path, None, age, host=socket.gethostname(), pid=pid())
    assert is_stale(folder) is stale


def test_other_keys_folders_are_never_touched(tmp_path):
    other = tmp_path / ".tmp-ffffffffffffffffffffffffffffffff-h-1-00000000"
    other.mkdir()
    os.utime(other, (0, 0))
    assert remove_stale(tmp_path, KEY) == []
    assert other.exists()


def test_owner_record_names_this_process():
    record = owner_record()
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert isinstance(record["started"], float)


def test_build_folder_keeps_a_heartbeat_and_leaves_nothing(tmp_path):
    with BuildFolder(tmp_path, KEY, heartbeat=0.05) as folder:
        owner = folder.path / OWNER
        assert json.loads(owner.read_text())["pid"] == os.getpid()
        os.utime(owner, (0, 0))
        time.sleep(0.5)
        assert time.time() - owner.stat().st_mtime < 5  # the heartbeat touched it
        assert not is_stale(folder.path, now=time.time() + 10 * STALE_SECONDS)  # its owner is alive
        folder.seal()
        assert not owner.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_build_removes_an_abandoned_folder_and_keeps_a_live_builders(tmp_path):
    dead = _tmp_folder(tmp_path, _this_process(pid=_dead_pid()), FRESH)
    live = _tmp_folder(tmp_path, _this_process(), OLD)  # another thread of this process, say
    entry = FeatureCache(tmp_path).open_or_build(KEY, _built)
    assert entry.built_here and check_entry(entry.path, KEY, full=True) is None
    assert not dead.exists() and live.exists()


# -- a damaged entry that another builder deals with meanwhile -------------------------------------


def _race_after_second_check(monkeypatch, action) -> None:
    """Run ``action`` (the other builder) right after this builder's check inside the lock, before
    it moves the damaged entry aside: the interleaving two builders without flock can have."""
    real, calls = cache_module.check_entry, []

    def racing(path, key, full):
        verdict = real(path, key, full)
        calls.append(verdict)
        if len(calls) == 2:
            action()
        return verdict

    monkeypatch.setattr(cache_module, "check_entry", racing)
    monkeypatch.setattr(fcntl, "flock", _no_flock)


def _damaged_entry(root: Path) -> Path:
    entry = FeatureCache(root).open_or_build(KEY, _built).path
    (entry / "features.arrow").write_bytes(b"not arrow")
    return entry


def test_damaged_entry_already_moved_aside_by_another_builder_is_rebuilt(tmp_path, monkeypatch):
    entry = _damaged_entry(tmp_path)
    _race_after_second_check(monkeypatch, lambda: entry.rename(tmp_path / ".corrupt-by-the-other"))
    again = FeatureCache(tmp_path).open_or_build(KEY, _built)
    assert again.built_here
    assert check_entry(entry, KEY, full=True) is None


def test_damaged_entry_already_replaced_by_another_builder_is_kept(tmp_path, monkeypatch):
    entry = _damaged_entry(tmp_path)
    elsewhere = FeatureCache(tmp_path / "elsewhere").open_or_build(KEY, _built).path

    def replace():
        entry.rename(tmp_path / ".corrupt-by-the-other")
        elsewhere.rename(entry)  # the other builder's whole entry, published

    _race_after_second_check(monkeypatch, replace)
    built = []
    again = FeatureCache(tmp_path).open_or_build(KEY, lambda: built.append(1) or _built())
    assert not again.built_here and built == []
    assert check_entry(entry, KEY, full=True) is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_link_planted_at_the_lock_file_is_never_written_through(tmp_path):
    root, victim = tmp_path / "cache", tmp_path / "victim"
    victim.write_text("the victim's\n")
    (root / ".locks").mkdir(parents=True)
    (root / ".locks" / KEY).symlink_to(victim)
    entry = FeatureCache(root).open_or_build(KEY, _built)
    assert entry.built_here and check_entry(entry.path, KEY, full=True) is None
    assert victim.read_text() == "the victim's\n" and not (root / ".locks" / KEY).is_symlink()
