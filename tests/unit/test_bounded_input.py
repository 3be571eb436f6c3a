"""Bounded inputs: a compressed data file may decompress to data.max_decompressed_mb at most, and
finding out that a gzip bomb is over it costs seconds and a few MB, not the bomb's size."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import time

import pytest

from qa_dist import ConfigError, DataError
from qa_dist.config import DataConfig
from qa_dist.data import load_source, sample_path
from qa_dist.data.compressed import MAX_DECOMPRESSED_MB
from qa_dist.data.loading import load_file, source_fingerprint

BOMB_GIB = 10


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """About 10 MB of gzip that decompress to 10 GiB: the opening of a SQuAD file, then one small
    member (1 MiB of spaces, about 1 KB compressed) repeated. Concatenated gzip members are one
    valid gzip file, so nothing of the 10 GiB is ever held, here or in zlib."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.json.gz"
    spaces = gzip.compress(b" " * (1 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(b'{"data": ['))
        for _ in range(BOMB_GIB << 10):
            f.write(spaces)
    assert path.stat().st_size < 20 << 20
    return path


def test_the_default_limit_is_the_config_default():
    assert MAX_DECOMPRESSED_MB == DataConfig().max_decompressed_mb == 4096


@pytest.mark.parametrize("value", [0, -1])
def test_limit_below_one_is_refused(value):
    with pytest.raises(ConfigError, match=r"max_decompressed_mb: .* must be >= 1"):
        DataConfig(max_decompressed_mb=value)


@pytest.mark.parametrize(
    "limit_mb",
    [
        # The default: about 10 s here, counting 4 GiB at zlib's speed (some 450 MiB/s).
        pytest.param(None, marks=pytest.mark.slow, id="default"),
        pytest.param(256, id="256"),
    ],
)
def test_gzip_bomb_stops_fast_in_bounded_memory(bomb, limit_mb):
    # In a child process, so that its peak resident memory is the loader's alone. The address-space
    # guard makes a regression (decompressing the whole bomb, as gzip.decompress did) fail with a
    # MemoryError in the child instead of taking 10 GiB of this machine.
    child = textwrap.dedent(
        """
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from qa_dist.data.loading import load_file
        from qa_dist.errors import DataError
        options = {"max_decompressed_mb": int(sys.argv[2])} if sys.argv[2:] else {}
        start = time.perf_counter()
        try:
            load_file(sys.argv[1], **options)
            message = None
        except DataError as e:
            message = str(e)
        elapsed = time.perf_counter() - start
        # VmHWM, this program's own peak: ru_maxrss keeps the high-water mark of the forked copy
        # of the parent before exec (the test process, gigabytes late in a full run).
        status = open("/proc/self/status").read()
        peak_kib = int(status.split("VmHWM:")[1].split()[0])
        print(json.dumps({"message": message, "elapsed": elapsed, "peak_mib": peak_kib / 1024}))
        """
    )
    command = [sys.executable, "-c", child, str(bomb)] + ([str(limit_mb)] if limit_mb else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"bomb, limit {limit_mb or 'default'}: error after {result['elapsed']:.2f} s, peak RSS {result['peak_mib']:.0f} MiB"
    )
    assert result["message"] == (
        f"{bomb}: decompresses to more than {limit_mb or 4096} MB (data.max_decompressed_mb); "
        "a gzip bomb, or raise the limit"
    )
    assert result["elapsed"] < 30
    assert result["peak_mib"] < 1024


def _padded_sample(tmp_path, size: int):
    """The shipped en-dev sample, padded with trailing spaces to ``size`` bytes, gzipped."""
    text = sample_path("en-dev").read_bytes()
    assert len(text) < size
    path = tmp_path / f"padded-{size}.json.gz"
    path.write_bytes(gzip.compress(text + b" " * (size - len(text))))
    return path


def test_a_lower_limit_stops_a_file_just_over_it(tmp_path):
    over = _padded_sample(tmp_path, (1 << 20) + 1)
    with pytest.raises(DataError) as caught:
        load_file(over, max_decompressed_mb=1)
    message = str(caught.value)
    assert message.startswith(f"{over}: decompresses to more than 1 MB (data.max_decompressed_mb)")
    assert "\n" not in message
    # load_source passes the limit on; at the limit exactly, or under a higher one, it loads.
    with pytest.raises(DataError, match=r"more than 1 MB \(data\.max_decompressed_mb\)"):
        load_source(str(over), max_decompressed_mb=1)
    assert len(load_file(over, max_decompressed_mb=2).examples) == 112
    assert len(load_file(_padded_sample(tmp_path, 1 << 20), max_decompressed_mb=1).examples) == 112


def test_a_file_under_the_limit_loads_as_before(tmp_path):
    plain = sample_path("en-train")
    raw = gzip.compress(plain.read_bytes())
    # Two members and zero padding after one, both of which gzip.decompress accepts.
    half = len(plain.read_bytes()) // 2
    members = gzip.compress(plain.read_bytes()[:half]) + b"\0" * 7 + gzip.compress(plain.read_bytes()[half:])
    expected = load_file(plain).examples
    for name, content in (("one.json.gz", raw), ("two-members.json.gz", members)):
        path = tmp_path / name
        path.write_bytes(content)
        loaded = load_file(path)
        assert loaded.examples == expected
        assert loaded.fingerprint == source_fingerprint(str(path))


def test_many_small_members_load_in_linear_time(tmp_path):
    # The shipped sample, one gzip member per byte: 131,394 members in 3 MB. gzip.decompress copies
    # the rest of the file at each member (quadratic: about 14 s here); the members are read from
    # the one buffer instead (under 1 s).
    text = sample_path("en-train").read_bytes()
    path = tmp_path / "members.json.gz"
    path.write_bytes(b"".join(gzip.compress(text[i : i + 1], compresslevel=1) for i in range(len(text))))
    start = time.perf_counter()
    loaded = load_file(path)
    elapsed = time.perf_counter() - start
    assert loaded.examples == load_file(sample_path("en-train")).examples
    assert elapsed < 5, elapsed


def test_broken_gzip_is_still_named(tmp_path):
    for name, content in (
        ("truncated.json.gz", gzip.compress(b'{"data": []}' * 100)[:-12]),
        ("not-gzip.json.gz", b'{"data": []}'),
        ("garbage-after.json.gz", gzip.compress(b'{"data": []}') + b"junk"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}: not a valid gzip file \("):
            load_file(path)


def test_a_data_folder_is_bounded_too(tmp_path, bomb):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.json.gz").write_bytes(bomb.read_bytes())
    with pytest.raises(DataError, match=r"train\.json\.gz: decompresses to more than 1 MB"):
        load_source(str(folder), "train", max_decompressed_mb=1)
    with pytest.raises(DataError, match=r"train\.json\.gz: decompresses to more than 1 MB"):
        source_fingerprint(str(folder), "train", max_decompressed_mb=1)


def test_prepare_on_a_bomb_is_one_line_and_exit_2(tmp_path, bomb):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qa_dist",
            "prepare",
            "-q",
            f"data.train={bomb}",
            "data.max_decompressed_mb=1",
            "model.name_or_path=sample:zh-char-tokenizer",
            "data.max_length=32",
            "data.doc_stride=8",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0] == (
        f"qa-dist: error: {bomb}: decompresses to more than 1 MB (data.max_decompressed_mb); "
        "a gzip bomb, or raise the limit"
    )
