"""Windows built on every core: a pool of worker processes over shards of examples.

A worker (``features.workers``) receives a :class:`WindowJob` (the tokenizer as JSON, not the
transformers object, so it never imports transformers) and shards of examples, one core each: the
tokenizer's own threads are off inside workers, the pool is the parallelism.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from qa_dist.features.layout import WindowTokenizer
from qa_dist.features.offsets import OffsetMapping
from qa_dist.features.shards import SHARD_EXAMPLES, ShardArea, write_shard
from qa_dist.features.tables import examples_table, features_table
from qa_dist.features.windows import build_columns
from qa_dist.features.workers import WorkerPool
from qa_dist.runtime.faults import kill_point
from qa_dist.runtime.threads import available_cores


def default_workers() -> int:
    """The cores this process may use (its CPU affinity: under Slurm, the cores of its task)."""
    return available_cores()


@dataclass(frozen=True)
class WindowJob:
    """One split's window building, as sent to workers."""

    tokenizer: WindowTokenizer
    max_length: int
    doc_stride: int
    train: bool
    source: str | None = None

    def columns(self, examples: list, first_index: int = 0) -> dict[str, Any]:
        return build_columns(
            examples, self.tokenizer, self.max_length, self.doc_stride, self.train, self.source, first_index
        )

    def shard(self, area: str, index: int, examples: list[dict], builder: str) -> dict:
        """Build and write shard ``index`` of a cache entry; its record. ``builder``: the process
        whose pool built it (host and pid), recorded for the manifest."""
        columns = self.columns(examples, index * SHARD_EXAMPLES)
        tables = {"features": features_table(columns), "examples": examples_table(examples)}
        counts = {"num_examples": len(examples), "num_features": len(columns["input_ids"]), "builder": builder}
        return write_shard(area, index, tables, counts)


def concat_columns(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns of consecutive shards as one split's (their ``example_index`` already global)."""
    out: dict[str, Any] = {}
    for name in parts[0]:
        if name == "offset_mapping":
            out[name] = OffsetMapping.concat([p[name] for p in parts])
        else:
            out[name] = list(itertools.chain.from_iterable(p[name] for p in parts))
    return out


def build_in_pool(job: WindowJob, examples: list, num_proc: int) -> dict[str, Any]:
    """``job``'s columns for ``examples`` on ``num_proc`` processes, equal to one process's."""
    if num_proc <= 1 or len(examples) <= 512:
        return job.columns(examples)
    # Parts of 512 examples at least: a worker's start-up (some 0.3 s) buys nothing on fewer.
    size = min(SHARD_EXAMPLES, max(512, -(-len(examples) // num_proc)))
    starts = range(0, len(examples), size)
    parts: dict[int, dict] = {}
    with WorkerPool(min(num_proc, len(starts))) as pool:  # (at least 2 parts here)
        for n, start in enumerate(starts):
            pool.submit(n, job.columns, examples[start : start + size], start)
        while pool.busy:
            parts.update(pool.results())
    return concat_columns([parts[n] for n in range(len(starts))])


class _Running:
    """Shard tasks in flight, each holding its shard's lock, at most two per worker at a time. The
    pool starts with the second shard: a split of one shard is built in this process, without the
    workers' start-up."""

    def __init__(self, job: WindowJob, area: ShardArea, workers: int) -> None:
        self.job, self.area, self.workers = job, area, workers
        self.builder = f"{socket.gethostname()}:{os.getpid()}"
        self.pool: WorkerPool | None = None
        self.held: tuple | None = None
        self.locks: dict[int, Any] = {}
        self.built: set[int] = set()

    def run(self, index: int, examples: list[dict], lock) -> None:
        if self.workers <= 1:
            self._here(index, examples, lock)
        elif self.pool is None and self.held is None:
            self.held = (index, examples, lock)
        else:
            if self.pool is None:
                self.pool = WorkerPool(self.workers)
                self._submit(*self.held)
                self.held = None
            self._submit(index, examples, lock)

    def _here(self, index: int, examples: list[dict], lock) -> None:
        with lock:
            self.built.add(self.job.shard(str(self.area.path), index, examples, self.builder)["index"])
        kill_point("cache:after-shard")

    def _submit(self, index: int, examples: list[dict], lock) -> None:
        self.locks[index] = lock
        self.pool.submit(index, self.job.shard, str(self.area.path), index, examples, self.builder)
        while self.pool.busy >= 2 * self.workers:
            self._settle()

    def _settle(self) -> None:
        for index, record in self.pool.results():
            self.locks.pop(index).close()
            self.built.add(record["index"])
            kill_point("cache:after-shard")

    def finish(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self._here(*held)
        while self.pool is not None and self.pool.busy:
            self._settle()

    def close(self, failed: bool) -> None:
        if self.pool is not None:
            self.pool.close(kill=failed)
        for lock in [*self.locks.values(), *([self.held[2]] if self.held else [])]:
            lock.close()


def _build_pass(area: ShardArea, batches: Iterable[list[dict]], job: WindowJob, workers: int, built: set) -> list[int]:
    """Build every shard of one pass over the input that is neither done nor held by another
    builder; the number of examples of each shard."""
    counts: list[int] = []
    running = _Running(job, area, workers)
    failed = True
    try:
        for index, examples in enumerate(batches):
            counts.append(len(examples))
            if area.record(index, len(examples)) is not None:
                continue
            lock = area.take(index)
            if lock is None:
                continue  # another builder (another node, another job) has it
            if area.record(index, len(examples)) is not None:  # finished between the two looks
                lock.close()
                continue
            running.run(index, examples, lock)
        running.finish()
        failed = False
    finally:
        running.close(failed)
        built |= running.built
    return counts


def build_shards(
    area: ShardArea,
    passes: Callable[[], tuple[WindowJob, Iterable[list[dict]]]],
    *,
    workers: int,
    finish: bool,
    wait_timeout: float,
) -> list[dict] | None:
    """Build the shards of an entry that are not done yet.

    ``passes()``: the job, and a new pass over the split's validated examples, ``SHARD_EXAMPLES`` at
    a time (its end means the whole input was valid). With ``finish``, wait for the shards other builders hold,
    check the checksums of those this process did not write, and return every shard's record in
    order; a shard whose builder died unfinished, or whose files are damaged, is built in another
    pass. Without ``finish`` (a helper on another node), return once this pass is done.
    """
    area.create()
    built: set[int] = set()
    deadline = time.monotonic() + wait_timeout
    for _ in range(3):
        job, batches = passes()
        counts = _build_pass(area, batches, job, workers, built)
        if not finish:
            return None
        records = []
        for index, count in enumerate(counts):
            record = area.record(index, count)
            if record is None and area.wait_free(index, deadline):
                record = area.record(index, count)
            if record is not None and index not in built and not area.verify(index, record):
                record = None
            records.append(record)
        if all(r is not None for r in records):
            return records
        if time.monotonic() >= deadline:
            break
    from qa_dist.features.cache import CacheError  # (cache does not import this module)

    missing = [i for i, r in enumerate(records) if r is None]
    raise CacheError(
        f"{area.path}: {len(missing)} shard(s) of the feature cache entry were not built in time "
        f"(first: {missing[0]}); raise data.cache_wait_timeout, or look for a builder that is stuck"
    )
