"""Content-addressed feature cache, built once per cache location and memory-mapped by every rank.

Layout of an entry ``<cache_dir>/<key>/``:
``features.arrow`` and ``examples.arrow`` (Arrow IPC streams, the format ``datasets`` memory-maps)
and ``manifest.json`` (checksums and counts). An entry is built in a temporary directory and
renamed into place with its manifest written last, so a half-built entry is never visible under
its key. On load the builder verifies every checksum; a partial or corrupted entry is moved aside
and rebuilt with a warning.

Who builds: with a cache directory shared by all nodes, global rank 0; with a node-local one,
local rank 0 of each node (``data.cache_shared``: ``shared``, ``local`` or ``auto``, which probes
the directory). The others wait on a signal file rather than inside a collective, so a long build
cannot trip a collective timeout; the builder's error, if any, is raised on every rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from qa_dist.dist import DistContext
from qa_dist.errors import DataError, QaDistError
from qa_dist.fsutil import atomic_write

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
_SIGNALS = ".signals"


class CacheError(QaDistError):
    """The cache directory is unusable, or waiting for another process's build timed out."""


def default_cache_dir(configured: str) -> Path:
    if "QA_DIST_CACHE" in os.environ and configured == "~/.cache/qa-dist/features":
        return Path(os.environ["QA_DIST_CACHE"]).expanduser()
    return Path(configured).expanduser()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    """Key of a cache entry: a hash of everything the features depend on (and nothing else)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class Built:
    """What a build function returns: Arrow tables to store, and facts for the manifest."""

    tables: dict[str, pa.Table]
    info: dict


@dataclass(frozen=True)
class CacheEntry:
    """A published, verified cache entry."""

    key: str
    path: Path
    manifest: dict
    built_here: bool
    """True in the one process that built the entry during this call."""

    def table(self, name: str) -> pa.Table:
        """``<name>.arrow`` as an Arrow table over a memory map: no copy, pages read on demand."""
        source = pa.memory_map(str(self.path / f"{name}.arrow"), "r")
        return pa.ipc.open_stream(source).read_all()

    def dataset(self, name: str):
        """``<name>.arrow`` as a memory-mapped ``datasets.Dataset`` (imports ``datasets``)."""
        import datasets

        return datasets.Dataset.from_file(str(self.path / f"{name}.arrow"), in_memory=False)


def _write_table(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # one record batch: numpy views over a column need no copy


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_manifest(entry: Path) -> dict | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def check_entry(entry: Path, key: str, full: bool) -> str | None:
    """None if the entry is whole; otherwise what is wrong. ``full`` compares checksums too."""
    if not entry.exists():
        return "missing"
    manifest = read_manifest(entry)
    if manifest is None:
        return "no readable manifest (partial or interrupted build)"
    if manifest.get("key") != key or manifest.get("format") != CACHE_FORMAT:
        return "manifest does not match the key or the format"
    for name, meta in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, manifest says {meta.get('bytes')}"
        if full and sha256_file(path) != meta.get("sha256"):
            return f"{name} does not match its checksum"
    return None


class FeatureCache:
    """Open or build entries in one cache directory on behalf of one process of a job."""

    def __init__(
        self,
        cache_dir: str | Path,
        dist: DistContext | None = None,
        *,
        shared: str = "auto",
        wait_timeout: float = 7200.0,
    ) -> None:
        self.root = Path(cache_dir).expanduser()
        self.dist = dist or DistContext()
        self.shared_mode = shared
        self.wait_timeout = wait_timeout
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"{self.root}: cannot create the cache directory ({e.strerror})") from None
        if not os.access(self.root, os.W_OK):
            raise CacheError(f"{self.root}: cache directory is not writable")

    # -- who builds ----------------------------------------------------------------------------

    def _is_builder(self, nonce: str) -> bool:
        d = self.dist
        if not d.is_distributed:
            return True
        shared = self.shared_mode == "shared"
        if self.shared_mode == "auto":
            if d.num_nodes == 1:
                shared = True
            else:
                # Global rank 0 drops a file; whoever sees it shares its filesystem. A wrong answer
                # (a slow NFS) costs a duplicate build, never a wrong entry: publishing is atomic.
                probe = self.root / f".probe-{nonce}"
                if d.rank == 0:
                    probe.touch()
                d.barrier()  # the probe exists before anyone looks
                shared = probe.exists()
                d.barrier()  # everyone has looked before it goes
                if d.rank == 0:
                    probe.unlink(missing_ok=True)
        return d.rank == 0 if shared else d.local_rank == 0

    # -- public --------------------------------------------------------------------------------

    def open_or_build(self, key: str, build: Callable[[], Built], *, description: str = "") -> CacheEntry:
        """Return the entry for ``key``, building it in exactly one process per cache location.

        Every rank of the job must call this with the same key, in the same order.
        """
        d = self.dist
        # Collective at the start, when every rank is here anyway: a run-wide name for the signal,
        # and a check that all ranks want the same entry (a rank waiting for a key nobody builds
        # would wait forever).
        gathered = d.all_gather((uuid.uuid4().hex, key))
        nonce, keys = gathered[0][0], [k for _, k in gathered]
        if len(set(keys)) > 1:
            raise CacheError(f"ranks computed different feature cache keys {keys}: their data or tokenizer differ")
        builder = self._is_builder(nonce)
        signal = self.root / _SIGNALS / f"{nonce}-{key}.json"
        built_here = False
        if builder:
            try:
                built_here = self._ensure(key, build, description)
                outcome = {"status": "ok"}
            except QaDistError as e:
                outcome = {"status": "error", "type": type(e).__name__, "message": str(e)}
                raise
            except BaseException as e:
                outcome = {
                    "status": "error",
                    "type": "RuntimeError",
                    "message": f"the process building the feature cache failed: {e!r}",
                }
                raise
            finally:
                if d.is_distributed:
                    atomic_write(signal, json.dumps(outcome))
        else:
            self._wait_for(signal, key)
        entry = self.root / key
        problem = check_entry(entry, key, full=False)
        if problem:
            raise CacheError(f"{entry}: cache entry is not usable after the build: {problem}")
        # Every rank has read the signal before the builder removes it.
        d.barrier()
        if builder and d.is_distributed:
            signal.unlink(missing_ok=True)
        return CacheEntry(key=key, path=entry, manifest=read_manifest(entry) or {}, built_here=built_here)

    # -- builder side --------------------------------------------------------------------------

    def _ensure(self, key: str, build: Callable[[], Built], description: str) -> bool:
        entry = self.root / key
        problem = check_entry(entry, key, full=True)
        if problem is None:
            return False
        with self._lock(key):
            # Another job may have published while this one waited for the lock.
            problem = check_entry(entry, key, full=True)
            if problem is None:
                return False
            if problem != "missing":
                aside = self.root / f".corrupt-{key}-{uuid.uuid4().hex[:8]}"
                log.warning(
                    "feature cache entry %s is damaged (%s): moved aside to %s and rebuilt",
                    entry,
                    problem,
                    aside,
                )
                entry.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
            for stale in self.root.glob(f".tmp-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock
            self._publish(key, build(), description)
        return True

    @contextlib.contextmanager
    def _lock(self, key: str):
        lock_path = self.root / ".locks" / key
        lock_path.parent.mkdir(exist_ok=True)
        # Serialises builders of one key across jobs; correctness never depends on it (publishing
        # is an atomic rename), so a filesystem without working flock only costs duplicate work.
        with open(lock_path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _publish(self, key: str, built: Built, description: str) -> None:
        tmp = self.root / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = {}
            for name, table in built.tables.items():
                path = tmp / f"{name}.arrow"
                _write_table(table, path)
                files[path.name] = {
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                    "rows": table.num_rows,
                }
            manifest = {
                "key": key,
                "format": CACHE_FORMAT,
                "description": description,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": files,
                **built.info,
            }
            atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2))  # written last
            _fsync_dir(tmp)
            try:
                tmp.rename(self.root / key)
            except OSError:
                if check_entry(self.root / key, key, full=True) is not None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another builder published first
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- waiting side --------------------------------------------------------------------------

    def _wait_for(self, signal: Path, key: str) -> None:
        deadline = time.monotonic() + self.wait_timeout
        delay = 0.05
        while not signal.exists():
            if time.monotonic() > deadline:
                raise CacheError(
                    f"{self.root}: waited {self.wait_timeout:.0f} s for another process to build "
                    f"cache entry {key}. If data.cache_dir is not one filesystem for all nodes, set "
                    "data.cache_shared=local; otherwise raise data.cache_wait_timeout or run "
                    "`qa-dist prepare` before the job"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        outcome = json.loads(signal.read_text())
        if outcome["status"] != "ok":
            error = DataError if outcome["type"] == "DataError" else CacheError
            raise error(outcome["message"])
