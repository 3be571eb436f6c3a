"""A feature cache entry on disk: its files, its manifest, the checks of both, and publishing one.

An entry ``<cache_dir>/<key>/`` holds Arrow IPC streams (the format ``datasets`` memory-maps) and
``manifest.json``: each file's bytes, sha256 and rows, the tables (``features``, ``examples``) as
lists of their files in order (one file ``<table>.arrow``, or shards ``<table>-NNNNN.arrow``), and
the counts. An entry is written in a temporary folder and renamed into place with its manifest
written last, so a half-built entry is never visible under its key.

Whatever a ``manifest.json`` holds (not JSON, nested too deeply, over 16 MiB, not UTF-8, another
shape than the cache writes), ``check_entry`` calls it damage and the entry is rebuilt.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from qa_dist.errors import DataError
from qa_dist.features.builders import (
    BuildFolder,
    fsync_dir,
    is_count,
    manifest_shape_problem,
    sha256_file,
    write_table,
)
from qa_dist.features.shards import ShardArea, shard_name
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.jsonfile import read_json

CACHE_FORMAT = 2
"""2: the manifest lists each table's files (``tables``; shards). 1 (one ``<table>.arrow`` each) is
still read; an older qa-dist refuses a format-2 entry as damage instead of reading files it lacks."""
FORMATS = (1, 2)
MANIFEST = "manifest.json"


def _reason(e: OSError) -> str:
    """What went wrong, in a few words (pyarrow's OSErrors carry no errno, only a message)."""
    return e.strerror or str(e) or type(e).__name__


@dataclass(frozen=True)
class Built:
    """What a build function returns: Arrow tables to store, and facts for the manifest."""

    tables: dict[str, pa.Table]
    info: dict
    """With ``COUNTS`` among them, as ints: an entry whose manifest lacks them is damaged."""


class ShardedBuild(Protocol):
    """A build cut into shards that several builders share (``features.parallel.build_shards``).

    ``run(area, finish=True)`` (the entry's builder): build the shards not done, wait for those
    others hold, and return every shard's record with the manifest's facts (``COUNTS`` among them).
    ``run(area, finish=False)`` (a helper on another node): build what nobody holds, return None."""

    def run(self, area: ShardArea, *, finish: bool) -> tuple[list[dict], dict] | None: ...


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of gigabytes of shards), or a copy where links are refused."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EMLINK, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target, follow_symlinks=False)


@dataclass(frozen=True)
class CacheEntry:
    """A published, verified cache entry."""

    key: str
    path: Path
    manifest: dict
    built_here: bool
    """True in the one process that built the entry during this call."""

    def files(self, name: str) -> list[Path]:
        """The files of table ``name``, in order: its shards, or one ``<name>.arrow``."""
        tables = self.manifest.get("tables") or {}
        return [self.path / f for f in tables.get(name, [f"{name}.arrow"])]

    def table(self, name: str) -> pa.Table:
        """Table ``name`` over memory maps of its shards, one chunk each: no copy, pages read on demand."""
        parts = [pa.ipc.open_stream(pa.memory_map(str(f), "r")).read_all() for f in self.files(name)]
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def dataset(self, name: str):
        """Table ``name`` as a memory-mapped ``datasets.Dataset`` (imports ``datasets``)."""
        import datasets  # about 1.5 s: only for the callers that ask for a Dataset

        parts = [datasets.Dataset.from_file(str(f), in_memory=False) for f in self.files(name)]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


_MAX_JSON_BYTES = 16 << 20
"""Manifests and signals take a few KiB: a larger one is damage, refused before it is read."""


def _load_manifest(entry: Path) -> dict | str:
    """The entry's manifest, or what is wrong with it."""
    try:
        manifest = read_json(entry / MANIFEST, limit=_MAX_JSON_BYTES)
    except FileNotFoundError:
        return "no manifest (partial or interrupted build)"
    except OSError as e:
        return f"no readable manifest ({_reason(e)})"
    except ValueError as e:
        return f"damaged manifest: {e}"
    problem = manifest_shape_problem(manifest)
    return f"damaged manifest: {problem}" if problem else manifest


def read_manifest(entry: Path) -> dict | None:
    """The entry's manifest, if it is readable and of the shape the cache writes."""
    manifest = _load_manifest(entry)
    return manifest if isinstance(manifest, dict) else None


def check_entry(entry: Path, key: str, full: bool) -> str | None:
    """None if the entry is whole; otherwise what is wrong. ``full`` compares checksums too. Any
    content of the entry's files gives a verdict, never an exception."""
    if not entry.exists():
        return "missing"
    manifest = _load_manifest(entry)
    if isinstance(manifest, str):
        return manifest
    fmt = manifest.get("format")
    if (
        manifest.get("key") != key
        or not is_count(fmt)
        or fmt not in FORMATS
        or (fmt == 1) != ("tables" not in manifest)
    ):
        return "manifest does not match the key or the format"
    for name, meta in manifest["files"].items():
        path = entry / name
        try:
            if not path.is_file():
                return f"{name} is missing"
            if (size := path.stat().st_size) != meta["bytes"]:
                return f"{name} has {size} bytes, manifest says {meta['bytes']}"
            if full and sha256_file(path) != meta["sha256"]:
                return f"{name} does not match its checksum"
        except OSError as e:
            return f"{name} cannot be read ({_reason(e)})"
    return None


def publish_tables(root: Path, key: str, built: Built, description: str) -> None:
    """Write ``built``'s tables as the entry ``key`` (one file each), published by rename."""
    with BuildFolder(root, key) as folder:
        files = {}
        for name, table in built.tables.items():
            path = folder.path / f"{name}.arrow"
            write_table(table, path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path), "rows": table.num_rows}
        _seal_and_rename(root, key, folder, {"description": description, "files": files, **built.info})


def publish_shards(root: Path, key: str, build: ShardedBuild, description: str) -> None:
    """Build the entry ``key`` in shards (with any other builders of it) and publish it: the shards'
    files are linked into it, and their folder goes."""
    area = ShardArea(root, key)
    try:
        records, info = build.run(area, finish=True)
    except DataError:
        area.remove()  # this key's data is invalid: no build of it will ever use these shards
        raise
    with BuildFolder(root, key) as folder:
        files, tables = {}, {}
        for record in records:
            for file, meta in record["files"].items():
                table = file.split(".")[1]
                name = f"{table}-{shard_name(record['index'])}.arrow"
                link_or_copy(area.path / file, folder.path / name)
                files[name] = meta
                tables.setdefault(table, []).append(name)
        builders: dict[str, int] = {}
        for record in records:
            builder = str(record.get("builder"))
            builders[builder] = builders.get(builder, 0) + 1
        peaks = [r["peak_rss_mb"] for r in records if isinstance(r.get("peak_rss_mb"), (int, float))]
        counts = {"num_shards": len(records), "shard_builders": builders, "peak_rss_mb": max(peaks, default=None)}
        _seal_and_rename(
            root, key, folder, {"description": description, "files": files, "tables": tables, **counts, **info}
        )
    area.remove()


def _seal_and_rename(root: Path, key: str, folder: BuildFolder, facts: dict) -> None:
    fmt = CACHE_FORMAT if "tables" in facts else 1
    manifest = {"key": key, "format": fmt, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts}
    atomic_write(folder.path / MANIFEST, json.dumps(manifest, indent=2))  # written last
    folder.seal()
    fsync_dir(folder.path)
    try:
        folder.path.rename(root / key)
    except OSError:
        if check_entry(root / key, key, full=True) is not None:
            raise
        # another builder published first: its entry stays, this folder goes
    fsync_dir(root)
