"""The shards of a feature cache entry while it is built, kept so that a build shared by several
builders, or killed and started again, does each shard once.

A split's examples are cut into shards of ``SHARD_EXAMPLES`` consecutive examples, whatever the
number of workers or nodes, so the shards (and the features) never depend on them. While an entry
is built, ``<cache_dir>/.shards/<key>/`` holds, for shard ``i`` (its name ``NNNNN``):

- ``NNNNN.<table>.arrow``: its tables, each written under a temporary name and renamed;
- ``NNNNN.json``: its record (each file's bytes, sha256 and rows, its counts), written last, by
  rename: a shard is done when its record reads back whole and its files have the sizes it names;
- ``NNNNN.lock``: ``flock``-ed by the one process building the shard, so builders of other nodes
  and other jobs take other shards. A killed builder's lock goes with it (the kernel releases it):
  its unfinished shard is taken by the next builder, its finished shards are kept.

The entry's publisher links the shards' files into the entry and removes the folder. Where flock
does not work, every builder builds every shard it finds not done: duplicate work, never a wrong
shard, since each file appears whole under its name or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from qa_dist.features.builders import is_count, open_lock, sha256_file, sha256_regular, write_table
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.jsonfile import read_json

log = logging.getLogger(__name__)

SHARD_EXAMPLES = 2048
"""Examples per shard. Small enough that a 2,000-question dev set feeds a few workers and a worker's
memory stays that of one shard; large enough that the per-shard costs (a task sent to a worker, two
files, a record) stay well under 1% of the build."""

NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
"""``flock`` errors that mean the filesystem does not support it (not that someone holds the lock)."""
_MAX_RECORD_BYTES = 1 << 20


def shard_name(index: int) -> str:
    return f"{index:05d}"


TABLES = ("features", "examples")
"""The tables of every shard (``features``: the windows, ``examples``: the examples they come from)."""


def _record_problem(record, index: int, count: int | None) -> str | None:
    """What is wrong with shard ``index``'s record (None: it is one this version writes for the
    shard as the builder cuts it, of ``count`` examples where the builder knows the number)."""
    if not isinstance(record, dict) or record.get("index") != index:
        return "not a shard record"
    if record.get("first_example") != index * SHARD_EXAMPLES or record.get("shard_examples") != SHARD_EXAMPLES:
        return "cut differently"
    files = record.get("files")
    names = {f"{shard_name(index)}.{table}.arrow": table for table in TABLES}
    if not isinstance(files, dict) or set(files) != set(names):
        return "not the files of a shard"
    for meta in files.values():
        if not isinstance(meta, dict) or not all(is_count(meta.get(k)) for k in ("bytes", "rows")):
            return "no byte and row counts"
        if not isinstance(meta.get("sha256"), str):
            return "no checksum"
    n_examples, n_features = record.get("num_examples"), record.get("num_features")
    if not is_count(n_examples) or not is_count(n_features) or (count is not None and n_examples != count):
        return "other counts"
    rows = {table: files[name]["rows"] for name, table in names.items()}
    if rows != {"features": n_features, "examples": n_examples}:
        return "rows that disagree with its counts"
    return None


def _clear(path: Path) -> None:
    """Remove a folder someone left at a file's name (a file or link is replaced by the rename)."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (VmHWM): what building a shard cost at most."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def write_shard(area: str | Path, index: int, tables: dict[str, pa.Table], counts: dict) -> dict:
    """Write shard ``index`` into the shard folder ``area`` (files first, the record last) and
    return its record. Runs in pool workers: the checksums are computed where the files are written."""
    area, name = Path(area), shard_name(index)
    files = {}
    for table_name, table in tables.items():
        final = area / f"{name}.{table_name}.arrow"
        tmp = area / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write_table(table, tmp)
            _clear(final)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        files[final.name] = {"bytes": final.stat().st_size, "sha256": sha256_file(final), "rows": table.num_rows}
    record = {
        "index": index,
        "first_example": index * SHARD_EXAMPLES,
        "shard_examples": SHARD_EXAMPLES,
        "files": files,
        **counts,
        "peak_rss_mb": peak_rss_mb(),
    }
    _clear(area / f"{name}.json")
    atomic_write(area / f"{name}.json", json.dumps(record))
    return record


class ShardArea:
    """The shard folder of one entry being built, as one builder process sees it."""

    def __init__(self, root: Path, key: str) -> None:
        self.path = Path(root) / ".shards" / key
        self._warned = False

    def create(self) -> None:
        """Make the folder: a link or file someone left at its name (or at ``.shards``) is removed
        first, so that nothing is ever written through it."""
        for folder in (self.path.parent, self.path):
            try:
                mode = folder.lstat().st_mode
            except FileNotFoundError:
                mode = None
            if mode is not None and not stat.S_ISDIR(mode):
                folder.unlink()  # (a link or a file: never followed)
            folder.mkdir(exist_ok=True)

    def record(self, index: int, count: int | None = None) -> dict | None:
        """Shard ``index``'s record if it is done: the record whole and of this shard (``count``: its
        number of examples, where known), its files regular files (not links, FIFOs or devices) of
        the sizes it names."""
        try:
            record = read_json(self.path / f"{shard_name(index)}.json", limit=_MAX_RECORD_BYTES)
        except (OSError, ValueError):
            return None
        if _record_problem(record, index, count) is not None:
            return None
        for file, meta in record["files"].items():
            try:
                info = (self.path / file).lstat()
            except OSError:
                return None
            if not stat.S_ISREG(info.st_mode) or info.st_size != meta["bytes"]:
                return None
        return record

    def verify(self, index: int, record: dict) -> bool:
        """Whether shard ``index``'s files match their checksums; a shard that does not is forgotten
        (its record removed), to be built again."""
        whole = all(
            sha256_regular(self.path / f, meta["bytes"]) == meta["sha256"] for f, meta in record["files"].items()
        )
        if not whole:
            log.warning("%s: shard %s does not match its checksums: building it again", self.path, shard_name(index))
            (self.path / f"{shard_name(index)}.json").unlink(missing_ok=True)
        return whole

    def _flock(self, f, blocking: bool) -> bool:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            if not self._warned:
                log.warning(
                    "%s: flock does not work on this filesystem (%s): every builder builds every shard it finds "
                    "not done (duplicate work only)",
                    self.path,
                    e.strerror,
                )
                self._warned = True
            return True

    def _lock_file(self, index: int):
        path = self.path / f"{shard_name(index)}.lock"
        _clear(path)
        return open_lock(path)

    @contextlib.contextmanager
    def claim(self, index: int) -> Iterator[bool]:
        """Hold shard ``index``'s lock while the block runs: yields False (at once) when another
        process holds it."""
        f = self._lock_file(index)
        try:
            yield self._flock(f, blocking=False)
        finally:
            f.close()  # (closing releases the lock)

    def take(self, index: int):
        """Shard ``index``'s lock, held until the returned file is closed; None when another holds it."""
        f = self._lock_file(index)
        if self._flock(f, blocking=False):
            return f
        f.close()
        return None

    def wait_free(self, index: int, deadline: float) -> bool:
        """Wait until nobody holds shard ``index``'s lock (False: still held at ``deadline``)."""
        delay = 0.05
        with self.claim(index) as free:
            if free:
                return True
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            with self.claim(index) as free:
                if free:
                    return True
        return False

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
