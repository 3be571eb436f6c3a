"""The CPU span kernel is compiled once, also from a read-only install: qa-dist's wheel installed with
pip into a directory that is then made read-only, a read-only HOME, ``QA_DIST_CACHE`` writable. The
first process compiles and writes ``$QA_DIST_CACHE/numba``, the next loads the kernels from there
(numba's dispatcher counts a cache hit and nothing is compiled); a process for another CPU compiles
for its own; with nothing writable at all, post-processing still works (it compiles each time). The
times are printed, not asserted (bench/span_compile.py measures them)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

# Synthetic windows of SQuAD's shape (question tokens, a context of words, padding) and seeded random
# logits; two postprocess calls, timed, then what numba's dispatchers did.
CHILD = r"""
import hashlib, json, sys, time
import numpy as np
import pyarrow as pa
import qa_dist
import qa_dist.eval.postprocess
from qa_dist import postprocess

windows, length, question = 256, 384, 12
words = [f"w{i}" for i in range(300)]
context = " ".join(words)
starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
row = [None] * question + [(int(s), int(s) + len(w)) for s, w in zip(starts, words)]
row += [None] * (length - len(row))
examples = [{"id": f"q{i}", "context": context} for i in range(windows)]
# An Arrow table, as a datasets.Dataset hands its columns over (made before the clock starts:
# pyarrow imports pandas at its first conversion of Python lists, not a cost of the kernel's).
offsets = pa.array([row] * windows, type=pa.list_(pa.list_(pa.int32())))
features = pa.table({"example_id": [e["id"] for e in examples], "offset_mapping": offsets})
rng = np.random.default_rng(0)
start, end = (rng.standard_normal((windows, length), dtype=np.float32) for _ in range(2))
times = []
for _ in range(2):
    t0 = time.perf_counter()
    predictions = postprocess(examples, features, start, end, version_2_with_negative=True)
    times.append(time.perf_counter() - t0)
from qa_dist.eval import span_kernel
kernel, helper = span_kernel.window_candidates, span_kernel._true_range
print(json.dumps({
    "first": times[0], "second": times[1], "package": qa_dist.__file__,
    "hits": sum(kernel.stats.cache_hits.values()), "misses": sum(kernel.stats.cache_misses.values()),
    "cache_path": kernel.stats.cache_path, "helper_compiled": len(helper.overloads),
    "answers": hashlib.sha256(json.dumps([predictions.answers, predictions.null_odds], sort_keys=True).encode()).hexdigest(),
}))
"""

WHERE = "import qa_dist.eval.span_kernel as k; print(k.window_candidates.stats.cache_path)"


def _drop_dac_override() -> None:
    """(preexec_fn) Root writes through mode bits: start the child without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (prctl PR_CAPBSET_DROP; from exec on), so that read-only means read-only."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _env(site: Path, home: Path, **extra: str) -> dict:
    drop = ("NUMBA_CACHE_DIR", "NUMBA_CACHE_LOCATOR_CLASSES", "QA_DIST_CACHE", "XDG_CACHE_HOME", "NUMBA_CPU_NAME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": str(site), "HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def _python(site: Path, home: Path, code: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(site, home, **extra),
        preexec_fn=_drop_dac_override,
        timeout=300,
    )


def _postprocess(site: Path, home: Path, cwd: Path, **extra: str) -> dict:
    done = _python(site, home, CHILD, cwd, **extra)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(site), result["package"]  # the install, not the checkout
    print(f"first call {result['first']:.2f} s, second {result['second']:.2f} s: {extra or 'nothing writable'}")
    return result


def _writable(path: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (nothing is written into the checkout)."""
    root = tmp_path_factory.mktemp("numba-wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "qa_dist", src / "qa_dist", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "wheel", str(src), "--no-deps"]
        + ["--no-build-isolation", "-w", str(root / "dist")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = (root / "dist").glob("qa_dist-*.whl")
    assert "qa_dist/eval/span_kernel.py" in zipfile.ZipFile(path).namelist()
    return path


def _install(wheel: Path, site: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "install", "--no-deps"]
        + ["--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return site


@pytest.fixture(scope="module")
def readonly(wheel, tmp_path_factory):
    """(site, home): the wheel installed into a read-only directory, and a read-only home."""
    root = tmp_path_factory.mktemp("numba-readonly")
    site, home = _install(wheel, root / "site"), root / "home"
    home.mkdir()
    subprocess.run(["chmod", "-R", "a-w", str(site), str(home)], check=True)
    probe = _python(site, home, f"open({str(site / 'probe')!r}, 'w')", root)
    if probe.returncode == 0:
        _writable(root)
        pytest.skip("cannot make a directory read-only for a child process here (root without CAP_SETPCAP?)")
    yield site, home
    _writable(root)  # (so that pytest can remove it)


def test_a_second_process_loads_the_kernel_from_the_cache_of_a_readonly_install(readonly, tmp_path):
    site, home = readonly
    cache = tmp_path / "cache"
    cold = _postprocess(site, home, tmp_path, QA_DIST_CACHE=str(cache))
    assert (cold["misses"], cold["hits"]) == (1, 0) and cold["helper_compiled"] == 1, cold
    where = Path(cold["cache_path"])
    assert where.is_relative_to(cache / "numba"), where  # $QA_DIST_CACHE/numba/<cpu>/<source dir>
    assert where.parent.parent == cache / "numba" and where.parent.name.count("-") >= 1
    written = sorted(p.name for p in where.iterdir())
    assert any(n.startswith("span_kernel.window_candidates-") and n.endswith(".nbi") for n in written), written
    assert any(n.startswith("span_kernel.window_candidates-") and n.endswith(".nbc") for n in written), written
    assert not list(site.rglob("*.nbi")), "nothing is written beside the read-only sources"

    warm = _postprocess(site, home, tmp_path, QA_DIST_CACHE=str(cache))
    # Loaded, not compiled: a cache hit, and the helper the kernel calls was not compiled either.
    assert (warm["hits"], warm["misses"]) == (1, 0) and warm["helper_compiled"] == 0, warm
    assert warm["cache_path"] == cold["cache_path"] and warm["answers"] == cold["answers"]
    assert sorted(p.name for p in where.iterdir()) == written  # nothing rewritten
    print(f"warm first call minus second call: {warm['first'] - warm['second']:.2f} s")

    # Another CPU (as numba sees it: NUMBA_CPU_NAME) compiles for itself, in a directory of its own,
    # and leaves the first CPU's entries as they were.
    other = _postprocess(site, home, tmp_path, QA_DIST_CACHE=str(cache), NUMBA_CPU_NAME="generic")
    assert (other["misses"], other["hits"]) == (1, 0) and other["answers"] == cold["answers"], other
    assert Path(other["cache_path"]).parent.name.startswith("generic-") and other["cache_path"] != cold["cache_path"]
    again = _postprocess(site, home, tmp_path, QA_DIST_CACHE=str(cache))
    assert (again["hits"], again["misses"]) == (1, 0), again


def test_nothing_writable_still_works(readonly, tmp_path):
    site, home = readonly
    done = _postprocess(site, home, tmp_path)  # no QA_DIST_CACHE, no NUMBA_CACHE_DIR, read-only HOME
    assert done["cache_path"] is None and done["misses"] == 1, done  # compiled, nowhere to cache it
    unwritable = tmp_path / "unwritable"
    unwritable.mkdir()
    unwritable.chmod(0o555)
    try:  # unwritable ones named: no cache either, and no error at import
        also = _python(site, home, WHERE, tmp_path, QA_DIST_CACHE=str(unwritable), NUMBA_CACHE_DIR=str(unwritable))
    finally:
        unwritable.chmod(0o755)
    assert also.returncode == 0 and also.stdout.strip() == "None", also.stderr[-3000:]


def test_where_the_cache_goes(wheel, readonly, tmp_path):
    """The order: NUMBA_CACHE_DIR, beside the sources where writable, $QA_DIST_CACHE/numba,
    ~/.cache/qa-dist/numba (found at import; nothing is compiled here)."""
    site, home = readonly
    writable_home = tmp_path / "home"
    writable_home.mkdir()
    numba_dir, qa_cache = tmp_path / "numba-cache-dir", tmp_path / "qa-cache"

    def where(site: Path, home: Path, **extra: str) -> Path:
        done = _python(site, home, WHERE, tmp_path, **extra)
        assert done.returncode == 0, done.stderr[-3000:]
        return Path(done.stdout.strip())

    both = {"NUMBA_CACHE_DIR": str(numba_dir), "QA_DIST_CACHE": str(qa_cache)}
    assert where(site, home, **both).is_relative_to(numba_dir)
    assert where(site, writable_home, QA_DIST_CACHE=str(qa_cache)).is_relative_to(qa_cache / "numba")
    assert where(site, writable_home).is_relative_to(writable_home / ".cache" / "qa-dist" / "numba")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    blocked.chmod(0o555)
    try:  # an unwritable $QA_DIST_CACHE: the home's
        assert where(site, writable_home, QA_DIST_CACHE=str(blocked)).is_relative_to(writable_home / ".cache")
    finally:
        blocked.chmod(0o755)

    # A writable install: numba's usual place, beside the source.
    user_site = _install(wheel, tmp_path / "user-site")
    assert where(user_site, home, QA_DIST_CACHE=str(qa_cache)) == user_site / "qa_dist" / "eval" / "__pycache__"
