"""Turn a run config into feature cache entries: the ``qa-dist prepare`` stage, reused by training."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from qa_dist.cache import Built, CacheEntry, FeatureCache, cache_key, check_entry, default_cache_dir
from qa_dist.config import RunConfig
from qa_dist.data.loading import load_source, source_fingerprint
from qa_dist.dist import DistContext
from qa_dist.errors import ConfigError
from qa_dist.features import FEATURE_BUILDER_VERSION, build_eval_features, build_train_features
from qa_dist.models import tokenizer_fingerprint
from qa_dist.report import SILENT, Reporter

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


def _split_spec(config: RunConfig, role: str) -> tuple[str | None, str]:
    data = config.data
    return (data.train, data.train_split) if role == "train" else (data.eval, data.eval_split)


def split_key_parts(config: RunConfig, role: str, tokenizer_fp: str) -> dict | None:
    """What names the cache entry of one split (None when the config has no such split)."""
    source, split = _split_spec(config, role)
    if source is None:
        return None
    data = config.data
    return {
        "role": role,
        "data": source_fingerprint(source, split),
        "tokenizer": tokenizer_fp,
        "max_length": data.max_length,
        "doc_stride": data.doc_stride,
        "builder": FEATURE_BUILDER_VERSION,
        # How the data was validated: an entry built leniently (answers relocated) must not satisfy
        # a strict run, which has to reject that data.
        "strict": data.strict,
    }


def cache_is_warm(config: RunConfig, tokenizer) -> bool:
    """Whether every split of ``config`` already has a whole entry in its cache (no reading of data
    beyond fingerprinting it)."""
    root = default_cache_dir(config.data.cache_dir)
    fp = tokenizer_fingerprint(tokenizer)
    for role in ("train", "eval"):
        parts = split_key_parts(config, role, fp)
        if parts is not None and check_entry(root / cache_key(parts), cache_key(parts), full=False) is not None:
            return False
    return True


def prepare_features(
    config: RunConfig,
    tokenizer,
    dist: DistContext | None = None,
    *,
    roles: tuple[str, ...] = ("train", "eval"),
    report: Reporter = SILENT,
) -> dict[str, PreparedSplit]:
    """Open (or build, once per cache location) the feature cache entries of ``config``'s data.

    Every rank of a job calls this; exactly one process per cache location tokenizes, the others
    memory-map its result. ``report``: where the stages and the tokenizer's progress go (rank
    zero's reporter; silent by default).
    """
    data = config.data  # windows already checked when the config was built (DataConfig)
    cache = FeatureCache(
        default_cache_dir(data.cache_dir),
        dist,
        shared=data.cache_shared,
        wait_timeout=data.cache_wait_timeout,
    )
    tok_fp = tokenizer_fingerprint(tokenizer)
    prepared = {}

    for role in roles:
        source, split = _split_spec(config, role)
        if source is None:
            continue
        started = time.perf_counter()
        parts = split_key_parts(config, role, tok_fp)
        key = cache_key(parts)

        def build(source=source, split=split, role=role, parts=parts) -> Built:
            report.status(f"{role}: reading and validating {source}")
            loaded = load_source(source, split, strict=data.strict)
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
