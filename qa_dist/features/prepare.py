"""Turn a run config into feature cache entries: the ``qa-dist prepare`` stage, reused by training."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from qa_dist.config import DataConfig
from qa_dist.data.loading import source_fingerprint
from qa_dist.data.streaming import stream_source
from qa_dist.errors import ConfigError, DataError
from qa_dist.features import FEATURE_BUILDER_VERSION
from qa_dist.features.cache import (
    CacheEntry,
    FeatureCache,
    cache_key,
    check_entry,
    default_cache_dir,
    read_manifest,
)
from qa_dist.features.layout import WindowTokenizer
from qa_dist.features.parallel import WindowJob, build_shards, default_workers
from qa_dist.features.shards import SHARD_EXAMPLES, ShardArea
from qa_dist.features.tables import examples_table, features_table  # noqa: F401  (callers import them from here)
from qa_dist.models import tokenizer_fingerprint
from qa_dist.runtime.dist import DistContext
from qa_dist.runtime.report import SILENT, Reporter


@dataclass(frozen=True)
class PreparedSplit:
    role: str
    """``train`` or ``eval``."""
    source: str
    entry: CacheEntry
    seconds: float

    @property
    def num_examples(self) -> int:
        return self.entry.manifest["num_examples"]

    @property
    def num_features(self) -> int:
        return self.entry.manifest["num_features"]


def _split_spec(data: DataConfig, role: str) -> tuple[str | None, str]:
    return (data.train, data.train_split) if role == "train" else (data.eval, data.eval_split)


def split_key_parts(data: DataConfig, role: str, tokenizer_fp: str) -> dict | None:
    """What names the cache entry of one split (None when the config has no such split)."""
    source, split = _split_spec(data, role)
    if source is None:
        return None
    return {
        "role": role,
        "data": source_fingerprint(source, split, max_decompressed_mb=data.max_decompressed_mb),
        "tokenizer": tokenizer_fp,
        "max_length": data.max_length,
        "doc_stride": data.doc_stride,
        "builder": FEATURE_BUILDER_VERSION,
        # How the data was validated: an entry built leniently (answers relocated) must not satisfy
        # a strict run, which has to reject that data.
        "strict": data.strict,
    }


def warm_entries(data: DataConfig, tokenizer) -> dict[str, dict | None]:
    """Each split of ``data`` (train, eval) to the manifest of its whole cache entry, or to None
    where it has none yet (no reading of data beyond fingerprinting it)."""
    root = default_cache_dir(data.cache_dir)
    fp = tokenizer_fingerprint(tokenizer)
    entries = {}
    for role in ("train", "eval"):
        parts = split_key_parts(data, role, fp)
        if parts is not None:
            path, key = root / cache_key(parts), cache_key(parts)
            entries[role] = read_manifest(path) if check_entry(path, key, full=False) is None else None
    return entries


@dataclass
class SplitBuild:
    """The sharded build of one split's entry (a :class:`~qa_dist.features.cache.ShardedBuild`)."""

    data: DataConfig
    role: str
    source: str
    split: str
    parts: dict
    tokenizer: WindowTokenizer
    report: Reporter = SILENT

    @property
    def workers(self) -> int:
        return self.data.preprocess_workers or default_workers()

    def _counted(self, batches):
        """The batches, with a progress bar of the examples handed out (rank zero's reporter)."""
        if not self.report.shows_progress:
            yield from batches
            return
        with tqdm(desc=f"{self.role} windows", unit="ex", mininterval=0.5) as bar:
            for batch in batches:
                yield batch
                bar.update(len(batch))

    def run(self, area: ShardArea, *, finish: bool) -> tuple[list[dict], dict] | None:
        passes = []

        def one_pass():
            self.report.status(f"{self.role}: reading, validating and cutting windows from {self.source}")
            stream = stream_source(
                self.source, self.split, strict=self.data.strict, max_decompressed_mb=self.data.max_decompressed_mb
            )
            passes.append(stream)
            job = WindowJob(
                self.tokenizer, self.data.max_length, self.data.doc_stride, self.role == "train", stream.description
            )
            return job, self._counted(stream.batches(SHARD_EXAMPLES))

        records = build_shards(
            area, one_pass, workers=self.workers, finish=finish, wait_timeout=self.data.cache_wait_timeout
        )
        if records is None:
            return None
        stream = passes[-1]
        if stream.fingerprint != self.parts["data"]:  # (the key was computed from other bytes)
            raise DataError(
                f"{stream.description}: changed while the feature cache was built from it; run again once it is "
                "written whole"
            )
        return records, {
            "role": self.role,
            "source": stream.description,
            "key_parts": self.parts,
            "num_examples": sum(r["num_examples"] for r in records),
            "num_features": sum(r["num_features"] for r in records),
            "validation": stream.report.summary(),
            "relocated_answers": len(stream.report.relocations),
        }


def prepare_features(
    data: DataConfig,
    tokenizer,
    dist: DistContext | None = None,
    *,
    roles: tuple[str, ...] = ("train", "eval"),
    report: Reporter = SILENT,
) -> dict[str, PreparedSplit]:
    """Open (or build, once per cache location) the feature cache entries of ``data``.

    Every rank of a job calls this; exactly one process per cache location tokenizes, the others
    memory-map its result. ``report``: where the stages and the tokenizer's progress go (rank
    zero's reporter; silent by default).
    """
    cache = FeatureCache(
        default_cache_dir(data.cache_dir),
        dist,
        shared=data.cache_shared,
        wait_timeout=data.cache_wait_timeout,
    )
    tok_fp = tokenizer_fingerprint(tokenizer)
    spec = WindowTokenizer.of(tokenizer)
    prepared = {}

    for role in roles:
        source, split = _split_spec(data, role)
        if source is None:
            continue
        started = time.perf_counter()
        parts = split_key_parts(data, role, tok_fp)
        key = cache_key(parts)

        build = SplitBuild(data, role, source, split, parts, spec, report)
        entry = cache.open_or_build(key, build, description=f"{role} features of {source}")
        prepared[role] = PreparedSplit(role, source, entry, time.perf_counter() - started)
    if not prepared:
        raise ConfigError("nothing to prepare: set data.train and/or data.eval")
    return prepared
