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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from qa_dist.features.builders import is_count, open_lock, sha256_file, write_table
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.jsonfile import read_json

log = logging.getLogger(__name__)

SHARD_EXAMPLES = 2048
"""Examples per shard. Small enough that a 2,000-question dev set feeds a few workers and a worker's
memory stays that of one shard; large enough that the per-shard costs (a task sent to a worker, two
files, a record) stay well under 1% of the build."""

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_MAX_RECORD_BYTES = 1 << 20


def shard_name(index: int) -> str:
    return f"{index:05d}"


def _record_problem(record, index: int) -> str | None:
    if not isinstance(record, dict) or record.get("index") != index:
        return "not a shard record"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "no files"
    for name, meta in files.items():
        if not isinstance(name, str) or not name.startswith(shard_name(index) + ".") or "/" in name:
            return f"{name!r} is not one of its files"
        if not isinstance(meta, dict) or not all(is_count(meta.get(k)) for k in ("bytes", "rows")):
            return f"{name}: no byte and row counts"
        if not isinstance(meta.get("sha256"), str):
            return f"{name}: no checksum"
    if not all(is_count(record.get(k)) for k in ("num_examples", "num_features")):
        return "no counts"
    return None


def _peak_rss_mb() -> float | None:
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
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        files[final.name] = {"bytes": final.stat().st_size, "sha256": sha256_file(final), "rows": table.num_rows}
    record = {"index": index, "files": files, **counts, "peak_rss_mb": _peak_rss_mb()}
    atomic_write(area / f"{name}.json", json.dumps(record))
    return record


class ShardArea:
    """The shard folder of one entry being built, as one builder process sees it."""

    def __init__(self, root: Path, key: str) -> None:
        self.path = Path(root) / ".shards" / key
        self._warned = False

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def record(self, index: int) -> dict | None:
        """Shard ``index``'s record if it is done: the record whole, its files of the sizes it names."""
        try:
            record = read_json(self.path / f"{shard_name(index)}.json", limit=_MAX_RECORD_BYTES)
        except (OSError, ValueError):
            return None
        if _record_problem(record, index) is not None:
            return None
        for file, meta in record["files"].items():
            try:
                if (self.path / file).stat().st_size != meta["bytes"]:
                    return None
            except OSError:
                return None
        return record

    def verify(self, index: int, record: dict) -> bool:
        """Whether shard ``index``'s files match their checksums; a shard that does not is forgotten
        (its record removed), to be built again."""
        try:
            whole = all(sha256_file(self.path / f) == meta["sha256"] for f, meta in record["files"].items())
        except OSError:
            whole = False
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
            if e.errno not in _NO_FLOCK:
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

    @contextlib.contextmanager
    def claim(self, index: int) -> Iterator[bool]:
        """Hold shard ``index``'s lock while the block runs: yields False (at once) when another
        process holds it."""
        f = open_lock(self.path / f"{shard_name(index)}.lock")
        try:
            yield self._flock(f, blocking=False)
        finally:
            f.close()  # (closing releases the lock)

    def take(self, index: int):
        """Shard ``index``'s lock, held until the returned file is closed; None when another holds it."""
        f = open_lock(self.path / f"{shard_name(index)}.lock")
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
