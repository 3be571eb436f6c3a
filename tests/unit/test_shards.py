"""Sharded feature cache entries: built by a pool of workers, the same whatever their number, kept
across a killed build, checked when another process wrote them, and shared by the builders of
several nodes."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SQUAD11_DEV, SQUAD20_DEV, save_tokenizer

from qa_dist import build_eval_features, build_train_features, load_config, load_examples
from qa_dist.features.layout import WindowTokenizer
from qa_dist.features.prepare import prepare_features
from qa_dist.features.shards import SHARD_EXAMPLES
from qa_dist.models import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory, minilm_tokenizer):
    return save_tokenizer(minilm_tokenizer, tmp_path_factory.mktemp("minilm-tok"))


def _config_file(tmp_path: Path, data: Path, tokenizer_dir: str, cache: Path, **extra) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"train": str(data), "max_length": 128, "doc_stride": 32, "cache_dir": str(cache), **extra},
        "model": {"name_or_path": str(tokenizer_dir)},
    }
    path = tmp_path / f"run-{cache.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _prepare(path: Path):
    config = load_config(str(path))
    return prepare_features(config.data, load_tokenizer(config.model))["train"]


def _prepare_cli(config: Path, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qa_dist", "prepare", "-q", "--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_the_number_of_workers_changes_neither_the_key_nor_the_features(tmp_path, minilm_dir):
    one = _prepare(_config_file(tmp_path, SQUAD11_DEV, minilm_dir, tmp_path / "one", preprocess_workers=1))
    two = _prepare(_config_file(tmp_path, SQUAD11_DEV, minilm_dir, tmp_path / "two", preprocess_workers=2))
    assert one.entry.key == two.entry.key
    n = one.num_examples
    assert n > 10_000 and one.entry.manifest["num_shards"] == math.ceil(n / SHARD_EXAMPLES)
    for name in ("features", "examples"):
        a, b = one.entry.table(name), two.entry.table(name)
        assert a.column(0).num_chunks == one.entry.manifest["num_shards"]  # one memory-mapped chunk per shard
        assert a.equals(b)
    # ...and they are the windows of one in-memory build of the whole split.
    direct = build_train_features(
        load_examples(str(SQUAD11_DEV)),
        load_tokenizer(load_config(None, [f"model.name_or_path={minilm_dir}"]).model),
        128,
        32,
    )
    assert one.entry.table("features").to_pydict() == direct


@pytest.mark.parametrize("build", [build_train_features, build_eval_features])
def test_num_proc_gives_the_columns_of_one_process(build, minilm_tokenizer):
    examples = load_examples(str(SQUAD20_DEV))[:5000]
    one = build(examples, minilm_tokenizer, 128, 32)
    three = build(examples, minilm_tokenizer, 128, 32, num_proc=3)
    assert sorted(one) == sorted(three)
    for name in one:
        assert three[name] == one[name], name
    assert max(one["example_index"]) == len(examples) - 1


def _shard_area(cache: Path) -> Path:
    (area,) = (cache / ".shards").iterdir()
    return area


def test_a_killed_build_resumes_from_its_finished_shards(tmp_path, minilm_dir):
    config = _config_file(tmp_path, SQUAD11_DEV, minilm_dir, tmp_path / "cache", preprocess_workers=1)
    killed = _prepare_cli(config, QA_DIST_KILL_AT="cache:after-shard@2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    area = _shard_area(tmp_path / "cache")
    assert sorted(p.name for p in area.glob("*.json")) == ["00000.json", "00001.json"]
    kept = {p.name: p.stat().st_ino for p in area.glob("*.features.arrow")}
    assert not [p for p in (tmp_path / "cache").iterdir() if len(p.name) == 32]  # nothing published

    done = _prepare_cli(config)
    assert done.returncode == 0, done.stderr[-2000:]
    split = _prepare(config)
    assert not split.entry.built_here
    # The two finished shards are the entry's files now (hard links of the same inodes): not rebuilt.
    for shard, inode in kept.items():
        assert (split.entry.path / f"features-{shard.split('.')[0]}.arrow").stat().st_ino == inode
    assert not (tmp_path / "cache" / ".shards" / split.entry.key).exists()
    fresh = _prepare(_config_file(tmp_path, SQUAD11_DEV, minilm_dir, tmp_path / "fresh", preprocess_workers=2))
    assert split.entry.table("features").equals(fresh.entry.table("features"))


def test_a_finished_shard_that_was_damaged_is_built_again(tmp_path, minilm_dir, caplog):
    config = _config_file(tmp_path, SQUAD11_DEV, minilm_dir, tmp_path / "cache", preprocess_workers=1)
    assert _prepare_cli(config, QA_DIST_KILL_AT="cache:after-shard@1").returncode == -9
    shard = _shard_area(tmp_path / "cache") / "00000.features.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum tells
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        split = _prepare(config)
    assert "does not match its checksums" in caplog.text
    fresh = _prepare(_config_file(tmp_path, SQUAD11_DEV, minilm_dir, tmp_path / "fresh", preprocess_workers=1))
    assert split.entry.table("features").equals(fresh.entry.table("features"))


def test_invalid_data_publishes_nothing_and_keeps_no_shards(tmp_path, minilm_dir):
    records = load_examples(str(SQUAD11_DEV))[: 2 * SHARD_EXAMPLES + 10]
    records.append(dict(records[0]))  # a duplicate id, after two whole shards
    data = tmp_path / "flat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = _prepare_cli(_config_file(tmp_path, data, minilm_dir, tmp_path / "cache", preprocess_workers=2))
    assert done.returncode == 2
    assert "duplicate" in done.stderr.lower() and "Traceback" not in done.stderr
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if len(p.name) == 32]
    assert not list((cache / ".shards").iterdir()) if (cache / ".shards").exists() else True


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.multiprocess
def test_the_builders_of_two_nodes_share_the_shards_of_one_entry(tmp_path, minilm_dir):
    """Two simulated nodes on one shared cache directory: global rank 0 builds the entry, local rank
    0 of the other node takes shards too; each shard is built once, the entry is the one-process one."""
    data = tmp_path / "dev.json.gz"
    shutil.copy(SQUAD11_DEV, data)
    cache = tmp_path / "shared"
    config = _config_file(tmp_path, data, minilm_dir, cache, preprocess_workers=1)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [*TORCHRUN_2, str(REPO / "tests" / "mp_prepare.py"), "--config", str(config), "--out", str(out)]
    cmd += ["--simulate-nodes", "--slow-build", "0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["train"]["built_here"] for r in reports] == [True, False]
    assert all(r["tokenize_calls"] > 0 for r in reports)  # both nodes tokenized shards
    assert reports[0]["train"]["sha256"] == reports[1]["train"]["sha256"]
    manifest = json.loads((Path(reports[0]["train"]["path"]) / "manifest.json").read_text())
    builders = manifest["shard_builders"]
    assert len(builders) == 2 and sum(builders.values()) == manifest["num_shards"] == 6
    assert not (cache / ".shards" / reports[0]["train"]["key"]).exists()
    fresh = _prepare(_config_file(tmp_path, data, minilm_dir, tmp_path / "fresh", preprocess_workers=1))
    assert fresh.entry.key == reports[0]["train"]["key"]
    assert fresh.entry.table("features").equals(_reopen(cache, fresh.entry.key).table("features"))


def _reopen(cache: Path, key: str):
    from qa_dist.features.cache import CacheEntry, read_manifest

    return CacheEntry(key=key, path=cache / key, manifest=read_manifest(cache / key), built_here=False)


@pytest.mark.parametrize("fixture", ["minilm_tokenizer", "bpe_left_tokenizer", "zh_wordpiece_tokenizer"])
def test_a_long_context_is_tokenized_in_pieces_as_it_is_whole(fixture, request, monkeypatch):
    """A context past LONG_TEXT characters is tokenized piece by piece (bounded memory); the ids and
    offsets are those of one call on the whole text, with spaces (English) and without (Chinese)."""
    from conftest import CMRC_DEV, read_json_gz

    from qa_dist.features import layout

    tokenizer = request.getfixturevalue(fixture)
    backend = WindowTokenizer.of(tokenizer).backend()
    source = CMRC_DEV if fixture.startswith("zh") else SQUAD11_DEV
    text = " ".join(p["context"] for a in read_json_gz(source)["data"] for p in a["paragraphs"])[:60_000]
    if fixture.startswith("zh"):
        text = text.replace(" ", "")
    monkeypatch.setattr(layout, "LONG_TEXT", 4000)
    assert len(layout._cuts(backend, text)) > 10  # (it is cut)
    (ids,), (offsets,) = layout.tokenize_texts(backend, [text])
    assert isinstance(offsets, np.ndarray)
    whole = backend.encode(text, add_special_tokens=False)
    assert ids == whole.ids
    assert offsets.tolist() == [list(o) for o in whole.offsets]
    # Mixed with short texts, each keeps its place.
    short = ["a short one", text[:100]]
    got_ids, got_offsets = layout.tokenize_texts(backend, [short[0], text, short[1]])
    assert got_ids[1] == whole.ids and got_ids[0] == backend.encode(short[0], add_special_tokens=False).ids
    assert got_offsets[2] == backend.encode(short[1], add_special_tokens=False).offsets


def test_a_cut_never_falls_inside_one_pre_token_longer_than_the_probe(bpe_left_tokenizer, monkeypatch):
    """Under a byte-level BPE a run of 2,000 spaces is one pre-token: a cut inside it looks clean to
    a window of 256 characters each side but changes the tokens; cuts go to where the run starts."""
    from qa_dist.features import layout

    backend = WindowTokenizer.of(bpe_left_tokenizer).backend()
    words = " ".join(f"word{i % 97} is here." for i in range(3000))
    text = words[:3000] + " " * 2000 + words[3000:20000]
    monkeypatch.setattr(layout, "LONG_TEXT", 4000)
    cuts = layout._cuts(backend, text)
    assert cuts and not any(3001 <= c < 5000 for c in cuts)
    (ids,), (offsets,) = layout.tokenize_texts(backend, [text])
    whole = backend.encode(text, add_special_tokens=False)
    assert ids == whole.ids and offsets.tolist() == [list(o) for o in whole.offsets]


def _tamper(record: dict, how: str, area: Path) -> None:
    features, examples = "00000.features.arrow", "00000.examples.arrow"
    if how == "a-table-missing":
        del record["files"][examples]
    elif how == "other-counts":
        record["num_examples"] -= 7
    elif how == "a-foreign-file":
        record["files"]["00000.lock"] = {"bytes": 0, "sha256": "0" * 64, "rows": 0}
    elif how == "cut-differently":
        record["first_example"], record["shard_examples"] = 0, 1024
    elif how == "a-fifo":  # (a FIFO named as a shard file of 0 bytes: never opened to be hashed)
        (area / features).unlink()
        os.mkfifo(area / features)
        record["files"][features]["bytes"] = 0
    elif how == "a-link-to-a-device":
        (area / features).unlink()
        (area / features).symlink_to("/dev/zero")
        record["files"][features]["bytes"] = 0


@pytest.mark.parametrize(
    "how", ["a-table-missing", "other-counts", "a-foreign-file", "cut-differently", "a-fifo", "a-link-to-a-device"]
)
def test_a_shard_record_that_is_not_this_shards_is_built_again(tmp_path, minilm_dir, how):
    """Whoever wrote into .shards (another version, another user, damage): a record must name exactly
    this shard's two tables, its cut and counts, and regular files of its sizes; else it is rebuilt,
    without hanging on a FIFO or reading a device."""
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in load_examples(str(SQUAD11_DEV))[:5000]))
    config = _config_file(tmp_path, data, minilm_dir, tmp_path / "cache", preprocess_workers=1)
    assert _prepare_cli(config, QA_DIST_KILL_AT="cache:after-shard@1").returncode == -9
    area = _shard_area(tmp_path / "cache")
    record = json.loads((area / "00000.json").read_text())
    _tamper(record, how, area)
    (area / "00000.json").write_text(json.dumps(record))
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "prepare", "-q", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    split = _prepare(config)
    fresh = _prepare(_config_file(tmp_path, data, minilm_dir, tmp_path / "fresh", preprocess_workers=1))
    assert split.entry.table("features").equals(fresh.entry.table("features"))
    assert split.entry.table("examples").equals(fresh.entry.table("examples"))
    assert sorted(split.entry.manifest["tables"]) == ["examples", "features"]
