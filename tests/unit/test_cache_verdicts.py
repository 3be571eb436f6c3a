"""Whatever a feature cache entry's ``manifest.json`` or a build's signal file holds, the reader
gets a verdict: a damaged entry is rebuilt, a damaged signal is a one-line CacheError naming it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qa_dist.errors import DataError
from qa_dist.features.cache import MANIFEST, Built, CacheError, FeatureCache, check_entry, read_manifest

KEY = "fedcba9876543210fedcba9876543210"

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


def _built(rows: int = 50) -> Built:
    features = pa.table({"input_ids": pa.array([[i, i + 1] for i in range(rows)], pa.list_(pa.int32()))})
    examples = pa.table({"id": pa.array([f"q{i}" for i in range(rows)])})
    return Built(tables={"features": features, "examples": examples}, info={"num_examples": rows, "num_features": rows})


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A whole entry, copied for each example."""
    root = tmp_path_factory.mktemp("template")
    return FeatureCache(root).open_or_build(KEY, _built).path


def _copy(template: Path, into: Path) -> Path:
    entry = into / KEY
    shutil.copytree(template, entry)
    return entry


def _placed(template: Path, where: str, value, name: str):
    """``value`` put in one place of the template's manifest (or as the whole of it)."""
    manifest = json.loads((template / MANIFEST).read_text())
    if where == "whole":
        return value
    if where == "files":
        manifest["files"] = value
    elif where == "entry":
        manifest["files"]["features.arrow"] = value
    elif where in ("bytes", "sha256"):
        manifest["files"]["features.arrow"][where] = value
    elif where == "name":
        manifest["files"][name] = manifest["files"].pop("features.arrow")
    else:  # a top-level field: key, format, or a count consumers read
        manifest[where] = value
    return manifest


PLACES = ["whole", "files", "entry", "bytes", "sha256", "name", "key", "format", "num_examples", "num_features"]


def _assert_verdict(entry: Path) -> None:
    for full in (False, True):
        verdict = check_entry(entry, KEY, full=full)
        assert verdict is None or isinstance(verdict, str)
    manifest = read_manifest(entry)
    assert manifest is None or isinstance(manifest, dict)
    if check_entry(entry, KEY, full=True) is None:  # whole: every file it names is inside it
        for name in manifest["files"]:
            assert (entry / name).resolve().parent == entry.resolve()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(PLACES), value=JSON, name=st.text())
def test_any_json_in_a_manifest_is_a_verdict(template, where, value, name):
    with tempfile.TemporaryDirectory() as d:
        entry = _copy(template, Path(d))
        (entry / MANIFEST).write_text(json.dumps(_placed(template, where, value, name)))
        _assert_verdict(entry)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_any_bytes_in_a_manifest_are_a_verdict(template, data):
    with tempfile.TemporaryDirectory() as d:
        entry = _copy(template, Path(d))
        (entry / MANIFEST).write_bytes(data)
        _assert_verdict(entry)


def _wait(root: Path, signal: Path) -> None:
    FeatureCache(root, wait_timeout=5)._wait_for(signal, KEY)


def _assert_wait_verdict(root: Path, signal: Path) -> None:
    try:
        _wait(root, signal)
    except DataError:
        pass
    except CacheError as e:
        if str(e).startswith(f"{signal}: damaged signal file"):
            assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(value=JSON | st.fixed_dictionaries({"status": JSON, "type": JSON, "message": JSON}))
def test_any_json_in_a_signal_file_is_the_outcome_or_a_cache_error(value):
    with tempfile.TemporaryDirectory() as d:
        signal = Path(d) / ".signals" / f"n-{KEY}.json"
        signal.parent.mkdir()
        signal.write_text(json.dumps(value))
        _assert_wait_verdict(Path(d), signal)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_in_a_signal_file_are_the_outcome_or_a_cache_error(data):
    with tempfile.TemporaryDirectory() as d:
        signal = Path(d) / f"n-{KEY}.json"
        signal.write_bytes(data)
        _assert_wait_verdict(Path(d), signal)


# -- explicit cases ----------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = json.dumps({"pad": "x" * 20_000_000})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(DEEP.encode(), "damaged manifest: nested too deeply", id="nested-100000-deep"),
        pytest.param(HUGE.encode(), "damaged manifest: 20,000,011 bytes, more than the 16,777,216", id="20-MB"),
        pytest.param(b'{"key": "\xff\xfe"}', "damaged manifest: not UTF-8", id="invalid-utf8"),
        pytest.param(b"1" * 5000, "damaged manifest: not JSON", id="integer-too-long-to-convert"),
    ],
)
def test_unreadable_manifests_are_damaged(template, tmp_path, content, reason):
    entry = _copy(template, tmp_path)
    (entry / MANIFEST).write_bytes(content)
    started = time.perf_counter()
    assert check_entry(entry, KEY, full=True).startswith(reason)
    assert time.perf_counter() - started < 5
    assert read_manifest(entry) is None


def _with_files(files) -> dict:
    return {"key": KEY, "format": 1, "files": files, "num_examples": 1, "num_features": 1}


GOOD_FILE = {"bytes": 1, "sha256": "0" * 64}


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        pytest.param([1, 2], "holds a JSON list", id="list"),
        pytest.param(_with_files({"features.arrow": 7}), "is not a byte count and a sha256", id="file-entry-number"),
        pytest.param(_with_files({"features.arrow": "x"}), "is not a byte count and a sha256", id="file-entry-str"),
        pytest.param(_with_files({"features.arrow": None}), "is not a byte count and a sha256", id="file-entry-null"),
        pytest.param(_with_files({"features.arrow": [1]}), "is not a byte count and a sha256", id="file-entry-list"),
        pytest.param(
            _with_files({"features.arrow": {"bytes": True, "sha256": "0"}}), "not a byte count", id="bytes-bool"
        ),
        pytest.param(_with_files({"features.arrow": {"bytes": 1, "sha256": 1}}), "not a byte count", id="sha-int"),
        pytest.param(_with_files({"../features.arrow": GOOD_FILE}), "is not a file name inside", id="dot-dot"),
        pytest.param(_with_files({"/etc/passwd": GOOD_FILE}), "is not a file name inside", id="absolute"),
        pytest.param(_with_files({"a/b": GOOD_FILE}), "is not a file name inside", id="subfolder"),
        pytest.param(_with_files({"..": GOOD_FILE}), "is not a file name inside", id="parent"),
        pytest.param(_with_files({"a\0b": GOOD_FILE}), "is not a file name inside", id="nul"),
        pytest.param(_with_files({"x" * 300: GOOD_FILE}), "is not a file name inside", id="too-long"),
        pytest.param(_with_files({"\ud800": GOOD_FILE}), "is not a file name inside", id="lone-surrogate"),
        pytest.param(_with_files({}), "'files' is not a table", id="no-files"),
        pytest.param(_with_files([]), "'files' is not a table", id="files-list"),
        pytest.param(
            _with_files({"f": GOOD_FILE}) | {"num_examples": "12"}, "num_examples not a count", id="count-str"
        ),
        pytest.param(_with_files({"f": GOOD_FILE}) | {"num_features": -1}, "num_features not a count", id="count-neg"),
        pytest.param(
            {k: v for k, v in _with_files({"f": GOOD_FILE}).items() if k != "num_examples"},
            "num_examples",
            id="count-missing",
        ),
        pytest.param(
            _with_files({"f": GOOD_FILE}) | {"format": True}, "does not match the key or the format", id="format-bool"
        ),
        pytest.param(
            _with_files({"f": GOOD_FILE}) | {"format": 1.0}, "does not match the key or the format", id="format-float"
        ),
    ],
)
def test_manifests_of_another_shape_are_damaged(template, tmp_path, manifest, reason):
    entry = _copy(template, tmp_path)
    (entry / MANIFEST).write_text(json.dumps(manifest))
    verdict = check_entry(entry, KEY, full=True)
    assert verdict is not None and reason in verdict, verdict


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_manifest_that_is_no_file_is_damaged_and_never_blocks(template, tmp_path, kind):
    entry = _copy(template, tmp_path)
    (entry / MANIFEST).unlink()
    if kind == "folder":
        (entry / MANIFEST).mkdir()
    else:
        os.mkfifo(entry / MANIFEST)
    assert check_entry(entry, KEY, full=True) == "damaged manifest: not a regular file"


def test_manifest_with_numbers_for_file_entries_is_rebuilt_with_a_warning(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    first = cache.open_or_build(KEY, _built)
    manifest = json.loads((first.path / MANIFEST).read_text())
    manifest["files"] = {name: 7 for name in manifest["files"]}
    (first.path / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="qa_dist.features.cache"):
        again = cache.open_or_build(KEY, _built)
    assert again.built_here
    assert any("damaged" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    assert check_entry(again.path, KEY, full=True) is None
    assert again.table("features").num_rows == 50
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".corrupt-", ".tmp-"))] == []


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"[1, 2]", id="list"),
        pytest.param(b"3", id="number"),
        pytest.param(b'{"message": "x"}', id="no-status"),
        pytest.param(b'{"status": "error", "type": 1, "message": "x"}', id="error-without-a-type"),
        pytest.param(b'{"status": "maybe"}', id="unknown-status"),
        pytest.param(DEEP.encode(), id="nested-100000-deep"),
        pytest.param(b'{"status": "\xff"}', id="invalid-utf8"),
        pytest.param(HUGE.encode(), id="20-MB"),
        pytest.param(b"", id="empty"),
    ],
)
def test_a_damaged_signal_file_is_a_one_line_cache_error_naming_it(tmp_path, content):
    signal = tmp_path / f"n-{KEY}.json"
    signal.write_bytes(content)
    with pytest.raises(CacheError) as raised:
        _wait(tmp_path, signal)
    message = str(raised.value)
    assert message.startswith(f"{signal}: damaged signal file of the feature cache build (")
    assert "\n" not in message and len(message) < 500


@pytest.mark.parametrize(
    ("outcome", "error"),
    [
        ({"status": "ok"}, None),
        ({"status": "error", "type": "DataError", "message": "bad data"}, DataError),
        ({"status": "error", "type": "CacheError", "message": "disk full"}, CacheError),
    ],
)
def test_a_whole_signal_file_gives_the_builders_outcome(tmp_path, outcome, error):
    signal = tmp_path / f"n-{KEY}.json"
    signal.write_text(json.dumps(outcome))
    if error is None:
        _wait(tmp_path, signal)
    else:
        with pytest.raises(error, match=outcome["message"]):
            _wait(tmp_path, signal)
