"""The shared feature cache: content-addressed keys, atomic publishing, damage detection."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SQUAD11_DEV, SQUAD20_DEV, save_tokenizer, subset_nested

import qa_dist.features.prepare
from qa_dist import DataError, build_eval_features, build_train_features, load_config, load_examples
from qa_dist.features.cache import check_entry
from qa_dist.features.prepare import prepare_features
from qa_dist.models import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def squad_file(tmp_path):
    path = tmp_path / "data" / "squad2-small.json"
    path.parent.mkdir()
    path.write_text(json.dumps(subset_nested(SQUAD20_DEV, 40)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory, minilm_tokenizer):
    return save_tokenizer(minilm_tokenizer, tmp_path_factory.mktemp("minilm-tok"))


def _config(tmp_path, train, tokenizer_dir, **data):
    overrides = [
        f"data.train={train}",
        f"data.eval={train}",
        f"model.name_or_path={tokenizer_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=128",
        "data.doc_stride=32",
        f"run_dir={tmp_path / 'run'}",
    ]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, overrides)


def _prepare(config):
    return prepare_features(config.data, load_tokenizer(config.model))


def _keys(config):
    return {role: split.entry.key for role, split in _prepare(config).items()}


def test_warm_cache_is_memory_mapped_and_equals_direct_features(tmp_path, squad_file, minilm_dir, minilm_tokenizer):
    import pyarrow as pa
    from datasets.table import MemoryMappedTable

    config = _config(tmp_path, squad_file, minilm_dir)
    cold = _prepare(config)
    assert cold["train"].entry.built_here and cold["eval"].entry.built_here
    warm = _prepare(config)
    assert not warm["train"].entry.built_here and not warm["eval"].entry.built_here
    examples = load_examples(squad_file)
    expected = build_train_features(examples, minilm_tokenizer, 128, 32)
    allocated = pa.total_allocated_bytes()
    table = warm["train"].entry.table("features")
    assert pa.total_allocated_bytes() - allocated < 4096  # buffers live in the memory map
    assert table.to_pydict() == expected
    features = warm["train"].entry.dataset("features")
    assert isinstance(features.data, MemoryMappedTable)
    assert features.to_dict() == expected
    expected_eval = build_eval_features(examples, minilm_tokenizer, 128, 32)
    got_eval = warm["eval"].entry.dataset("features").to_dict()
    got_eval["offset_mapping"] = [
        [tuple(o) if o is not None else None for o in row] for row in got_eval["offset_mapping"]
    ]
    assert got_eval == expected_eval
    cached_examples = warm["eval"].entry.table("examples").to_pylist()
    assert cached_examples == examples
    manifest = warm["train"].entry.manifest
    assert manifest["num_examples"] == len(examples) and manifest["num_features"] == len(expected["input_ids"])


def test_key_changes_with_each_input_and_with_nothing_else(
    tmp_path, squad_file, minilm_dir, wordpiece_tokenizer, monkeypatch
):
    base = _keys(_config(tmp_path, squad_file, minilm_dir))
    # Same content elsewhere, a touched file, a re-saved tokenizer, unrelated settings: same key.
    moved = tmp_path / "elsewhere" / "renamed.json"
    moved.parent.mkdir()
    shutil.copy(squad_file, moved)
    os.utime(moved, (1, 1))
    copy_dir = shutil.copytree(minilm_dir, tmp_path / "tokenizer-copy")
    assert _keys(_config(tmp_path, moved, copy_dir)) == base
    same = load_config(
        None,
        [
            f"data.train={squad_file}",
            f"data.eval={squad_file}",
            f"model.name_or_path={minilm_dir}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=128",
            "data.doc_stride=32",
            "train.lr=1e-3",
            "eval.n_best_size=5",
            f"run_dir={tmp_path / 'other'}",
        ],
    )
    assert _keys(same) == base
    # Each input the features depend on: a new key.
    edited = tmp_path / "edited.json"
    edited.write_text(squad_file.read_text().replace("Normandy", "Normandie", 1))
    changed = [
        _keys(_config(tmp_path, edited, minilm_dir)),
        _keys(_config(tmp_path, squad_file, minilm_dir, max_length=96)),
        _keys(_config(tmp_path, squad_file, minilm_dir, doc_stride=16)),
        _keys(_config(tmp_path, squad_file, save_tokenizer(wordpiece_tokenizer, tmp_path / "wp"))),
        _keys(_config(tmp_path, squad_file, minilm_dir, strict="true")),  # validation mode: issue 14 item 6
    ]
    monkeypatch.setattr(qa_dist.features.prepare, "FEATURE_BUILDER_VERSION", "test-next")
    changed.append(_keys(_config(tmp_path, squad_file, minilm_dir)))
    for keys in changed:
        assert keys["train"] != base["train"] and keys["eval"] != base["eval"]
    assert len({k["train"] for k in changed}) == len(changed)
    assert base["train"] != base["eval"]  # training and evaluation features are different entries


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "no-manifest", "bad-manifest"])
def test_damaged_entry_is_detected_and_rebuilt_with_a_warning(tmp_path, squad_file, minilm_dir, damage, caplog):
    config = _config(tmp_path, squad_file, minilm_dir)
    entry = _prepare(config)["train"].entry
    before = entry.table("features").to_pydict()
    arrow = entry.files("features")[0]
    if damage == "flip-byte":
        data = bytearray(arrow.read_bytes())
        data[len(data) // 2] ^= 0xFF
        arrow.write_bytes(bytes(data))
    elif damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif damage == "no-manifest":
        (entry.path / "manifest.json").unlink()
    else:
        (entry.path / "manifest.json").write_text("{not json")
    assert check_entry(entry.path, entry.key, full=True) is not None
    with caplog.at_level(logging.WARNING, logger="qa_dist.features.cache"):
        again = _prepare(config)["train"].entry
    assert again.built_here
    assert any("damaged" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    assert again.table("features").to_pydict() == before
    assert check_entry(again.path, again.key, full=True) is None


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else []


def test_bad_data_writes_nothing_to_the_cache(tmp_path, minilm_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "question": "q?",
                    "context": "ctx",
                    "answers": {"text": ["nowhere"], "answer_start": [0]},
                }
            ]
        )
    )
    config = _config(tmp_path, bad, minilm_dir)
    with pytest.raises(DataError, match="bad.json: question 'x'"):
        _prepare(config)
    cache = tmp_path / "cache"
    assert _entries(cache) == []
    assert not list(cache.glob(".tmp-*"))


def _write_config(tmp_path, data_path, tokenizer_dir, cache, **extra) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "train": str(data_path),
            "max_length": 64,
            "doc_stride": 16,
            "cache_dir": str(cache),
            **extra,
        },
        "model": {"name_or_path": str(tokenizer_dir)},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_kill_during_build_leaves_nothing_valid(tmp_path, minilm_dir):
    data = tmp_path / "squad-dev.json.gz"
    shutil.copy(SQUAD11_DEV, data)
    cache = tmp_path / "cache"
    config = _write_config(tmp_path, data, minilm_dir, cache)
    cmd = [sys.executable, "-m", "qa_dist", "prepare", "-q", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(cache.glob(".tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob(".tmp-*")), "killed while writing the entry"
    assert _entries(cache) == []  # nothing under a key: a later run cannot take it as valid

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "train built" in done.stdout
    (entry,) = _entries(cache)
    assert check_entry(entry, entry.name, full=True) is None
    assert not list(cache.glob(".tmp-*"))  # the killed build's leftovers are cleaned up


# -- several processes (torchrun, gloo) -------------------------------------------------------


TORCHRUN_2 = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
]


def _torchrun(tmp_path, config, *extra, timeout=300):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = str(REPO / "tests" / "mp_prepare.py")
    cmd = [*TORCHRUN_2, script, "--config", str(config), "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]
    return done, reports


@pytest.mark.multiprocess
def test_two_processes_one_tokenizes_both_see_identical_features(tmp_path, minilm_dir):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(subset_nested(SQUAD20_DEV, 200)))
    config = _write_config(tmp_path, data, minilm_dir, tmp_path / "cache")
    # The builder takes longer than the process group's timeout; the other rank waits on a
    # file, not in a collective, so the job still succeeds.
    done, reports = _torchrun(tmp_path, config, "--pg-timeout", "4", "--slow-build", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(r["tokenize_calls"] > 0 for r in reports) == [False, True]
    assert [r["train"]["built_here"] for r in reports] == [True, False]
    assert reports[0]["train"]["sha256"] == reports[1]["train"]["sha256"]
    assert reports[0]["train"]["rows"] > 200
    assert max(r["seconds"] for r in reports) > 6

    # Warm: nobody tokenizes.
    done, reports = _torchrun(tmp_path, config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["tokenize_calls"] for r in reports] == [0, 0]


@pytest.mark.multiprocess
def test_node_local_caches_build_once_per_node(tmp_path, minilm_dir):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(subset_nested(SQUAD20_DEV, 20)))
    config = _write_config(tmp_path, data, minilm_dir, tmp_path / "unused")
    # Two simulated nodes with their own disks: auto detects that the directory is not shared.
    done, reports = _torchrun(tmp_path, config, "--simulate-nodes", "--per-rank-cache")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["train"]["built_here"] for r in reports] == [True, True]
    assert reports[0]["train"]["sha256"] == reports[1]["train"]["sha256"]
    # Two simulated nodes on one shared directory: only global rank 0 builds.
    shutil.rmtree(tmp_path / "out")
    done, reports = _torchrun(tmp_path, config, "--simulate-nodes", f"data.cache_dir={tmp_path / 'shared'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["train"]["built_here"] for r in reports] == [True, False]


@pytest.mark.multiprocess
def test_a_waiter_that_gives_up_while_the_build_succeeds_stops_every_rank_with_one_line(tmp_path, minilm_dir):
    """Rank 1 stops waiting (data.cache_wait_timeout) while rank 0 is still building: rank 0, its
    build done, learns of it and stops too, rather than wait in a barrier rank 1 never reaches."""
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(subset_nested(SQUAD20_DEV, 600)))
    config = _write_config(tmp_path, data, minilm_dir, tmp_path / "cache")
    cmd = [*TORCHRUN_2, "-m", "qa_dist", "prepare", "-q", "--config", str(config), "data.cache_wait_timeout=0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("qa-dist: error: ") == 2, done.stderr[-3000:]
    assert "another rank: " in done.stderr and "waited 0 s for another process to build" in done.stderr
    assert f'File "{REPO / "qa_dist"}' not in done.stderr  # no traceback from our processes


@pytest.mark.multiprocess
def test_bad_data_fails_every_rank_with_the_same_clear_error(tmp_path, minilm_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q7", "question": "", "context": "c", "answers": []}) + "\n")
    config = _write_config(tmp_path, bad, minilm_dir, tmp_path / "cache")
    cmd = [*TORCHRUN_2, "-m", "qa_dist", "prepare", "-q", "--config", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("qa-dist: error: ") == 2  # both ranks, neither hangs
    assert "bad.jsonl: question 'q7' (line 1): question is empty" in done.stderr
    assert f'File "{REPO / "qa_dist"}' not in done.stderr  # no traceback from our processes
    assert "exitcode  : 2" in done.stderr  # torchrun's failure report: our exit code for bad input
    assert _entries(tmp_path / "cache") == []


def test_tokenizer_fingerprint_ignores_runtime_truncation_and_padding(minilm_tokenizer):
    """MiniLM's tokenizer.json ships with truncation on and transformers clears it on the first call:
    ranks that made different calls must still compute the same cache key."""
    from copy import deepcopy

    from qa_dist.models import tokenizer_fingerprint

    fresh = deepcopy(minilm_tokenizer)
    before = tokenizer_fingerprint(fresh)
    fresh("a question", "a context")
    fresh("x", truncation=True, max_length=5, padding="max_length")
    assert tokenizer_fingerprint(fresh) == before


# -- full disks, read-only caches, locks (issue 14 item 8) ------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` at ``path`` (needs root; the test is skipped without it)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _run_prepare(config: Path, *overrides: str, timeout: float = 300):
    cmd = [sys.executable, "-m", "qa_dist", "prepare", "-q", "--config", str(config), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _one_line_error(done) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_full_disk_during_a_build_is_a_one_line_error_and_leaves_nothing(tmp_path, squad_file, minilm_dir):
    with _tmpfs(tmp_path / "small-disk", "64k") as cache:
        config = _write_config(tmp_path, squad_file, minilm_dir, cache)
        line = _one_line_error(_run_prepare(config))
        assert f"{cache}: cannot write feature cache entry" in line and "No space left on device" in line, line
        assert _entries(cache) == []
        assert not list(cache.glob(".tmp-*"))  # the partial build is gone, its space free again


def test_warm_entry_on_a_read_only_cache_is_usable(tmp_path, squad_file, minilm_dir):
    with _tmpfs(tmp_path / "ro-cache", "32m") as cache:
        config = _write_config(tmp_path, squad_file, minilm_dir, cache)
        cold = _run_prepare(config)
        assert cold.returncode == 0, cold.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        with pytest.raises(OSError):
            (cache / "probe").touch()  # really read-only, even for root
        warm = _run_prepare(config)
        assert warm.returncode == 0, warm.stderr
        assert "train verified (warm)" in warm.stdout
        # An entry that is not there cannot be built: a clear error, not a traceback.
        line = _one_line_error(_run_prepare(config, "data.max_length=96"))
        assert f"{cache}: cache directory is not writable, and cache entry" in line
        assert "is missing: it cannot be built here" in line


def test_waiting_for_the_build_lock_is_bounded_by_cache_wait_timeout(tmp_path, squad_file, minilm_dir):
    import fcntl

    from qa_dist.features.cache import cache_key
    from qa_dist.features.prepare import split_key_parts
    from qa_dist.models import tokenizer_fingerprint

    cache = tmp_path / "cache"
    config_path = _write_config(tmp_path, squad_file, minilm_dir, cache, cache_wait_timeout=1)
    config = load_config(str(config_path), [])
    key = cache_key(split_key_parts(config.data, "train", tokenizer_fingerprint(load_tokenizer(config.model))))
    (cache / ".locks").mkdir(parents=True)
    with open(cache / ".locks" / key, "a+") as held:  # another job is building this entry
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        line = _one_line_error(_run_prepare(config_path, timeout=120))  # blocked forever before
        assert time.monotonic() - started < 60
    assert f"{cache}: waited 1 s for another process to build cache entry {key}" in line
    assert "data.cache_wait_timeout" in line
    assert _entries(cache) == []


def test_lock_file_that_cannot_be_created_is_a_clear_error(tmp_path, squad_file, minilm_dir):
    from qa_dist.features.cache import CacheError

    config = _config(tmp_path, squad_file, minilm_dir)
    (tmp_path / "cache" / ".locks").parent.mkdir(parents=True)
    (tmp_path / "cache" / ".locks").write_text("not a directory")  # root ignores permission bits
    with pytest.raises(CacheError, match=r"\.locks/[0-9a-f]+: cannot create the lock file of the feature cache"):
        _prepare(config)
    assert _entries(tmp_path / "cache") == []


def test_filesystem_without_flock_builds_without_the_lock_with_a_warning(
    tmp_path, squad_file, minilm_dir, monkeypatch, caplog
):
    import errno
    import fcntl

    def no_flock(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    config = _config(tmp_path, squad_file, minilm_dir)
    with caplog.at_level(logging.WARNING, logger="qa_dist.features.cache"):
        prepared = _prepare(config)
    assert prepared["train"].entry.built_here
    assert any("flock does not work" in r.getMessage() for r in caplog.records)


@pytest.mark.multiprocess
def test_two_processes_share_a_read_only_warm_cache(tmp_path, minilm_dir):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(subset_nested(SQUAD20_DEV, 20)))
    with _tmpfs(tmp_path / "ro-cache", "32m") as cache:
        config = _write_config(tmp_path, data, minilm_dir, cache)
        cold = _run_prepare(config)
        assert cold.returncode == 0, cold.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        # No signal files can be written: the ranks agree through a collective instead.
        done, reports = _torchrun(tmp_path, config)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [r["tokenize_calls"] for r in reports] == [0, 0]
        assert reports[0]["train"]["sha256"] == reports[1]["train"]["sha256"]
        # A missing entry: every rank fails with the same clear error, none waits for the other.
        shutil.rmtree(tmp_path / "out")
        done, reports = _torchrun(tmp_path, config, "data.max_length=96", timeout=120)
        assert done.returncode != 0 and reports == []
        assert done.stderr.count("cache directory is not writable, and cache entry") == 2, done.stderr[-3000:]
