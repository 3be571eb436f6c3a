"""Turn a run config into feature cache entries: the ``qa-dist prepare`` stage, reused by training."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from qa_dist.config import DataConfig
from qa_dist.data.loading import load_source, source_fingerprint
from qa_dist.errors import ConfigError
from qa_dist.features import FEATURE_BUILDER_VERSION, build_eval_features, build_train_features
from qa_dist.features.cache import (
    Built,
    CacheEntry,
    FeatureCache,
    cache_key,
    check_entry,
    default_cache_dir,
    read_manifest,
)
from qa_dist.models import tokenizer_fingerprint
from qa_dist.runtime.dist import DistContext
from qa_dist.runtime.report import SILENT, Reporter

_INT_COLUMNS = {
    "input_ids": pa.list_(pa.int32()),
    "attention_mask": pa.list_(pa.int8()),
    "token_type_ids": pa.list_(pa.int8()),
    "start_positions": pa.int32(),
    "end_positions": pa.int32(),
    "example_index": pa.int32(),
    "cls_index": pa.int32(),
    "offset_mapping": pa.list_(pa.list_(pa.int32(), 2)),
    "example_id": pa.string(),
}
EXAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("title", pa.string()),
        ("context", pa.string()),
        ("question", pa.string()),
        (
            "answers",
            pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int32()))]),
        ),
        ("is_impossible", pa.bool_()),
    ]
)


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


def features_table(columns: dict[str, list]) -> pa.Table:
    return pa.table({name: pa.array(values, type=_INT_COLUMNS[name]) for name, values in columns.items()})


def examples_table(examples: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(examples, schema=EXAMPLE_SCHEMA)


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
    prepared = {}

    for role in roles:
        source, split = _split_spec(data, role)
        if source is None:
            continue
        started = time.perf_counter()
        parts = split_key_parts(data, role, tok_fp)
        key = cache_key(parts)

        def build(source=source, split=split, role=role, parts=parts) -> Built:
            report.status(f"{role}: reading and validating {source}")
            loaded = load_source(source, split, strict=data.strict, max_decompressed_mb=data.max_decompressed_mb)
            report.status(f"{role}: tokenizing {len(loaded.examples):,} questions and their contexts")
            builder = build_train_features if role == "train" else build_eval_features
            columns = builder(
                loaded.examples,
                tokenizer,
                data.max_length,
                data.doc_stride,
                progress=report.shows_progress,
                source=loaded.description,
            )
            return Built(
                tables={
                    "features": features_table(columns),
                    "examples": examples_table(loaded.examples),
                },
                info={
                    "role": role,
                    "source": loaded.description,
                    "key_parts": parts,
                    "num_examples": len(loaded.examples),
                    "num_features": len(columns["input_ids"]),
                    "validation": loaded.report.summary(),
                    "relocated_answers": len(loaded.report.relocations),
                },
            )

        entry = cache.open_or_build(key, build, description=f"{role} features of {source}")
        prepared[role] = PreparedSplit(role, source, entry, time.perf_counter() - started)
    if not prepared:
        raise ConfigError("nothing to prepare: set data.train and/or data.eval")
    return prepared
