"""Features: the windows a model reads, built once into a shared, content-addressed cache.

``windows`` cuts question/context windows and their labels (pure functions), ``layout`` reads a
tokenizer's pair template, ``offsets`` holds the windows' offset mappings compactly, ``cache`` stores
built features as memory-mapped Arrow entries, ``prepare`` builds or verifies them for a run, and
``batches`` plans the batches training and evaluation read."""

from __future__ import annotations

from qa_dist.features.layout import PairLayout, pair_layout
from qa_dist.features.offsets import OffsetMapping
from qa_dist.features.windows import FEATURE_BUILDER_VERSION, build_eval_features, build_train_features, window_spans

__all__ = [
    "FEATURE_BUILDER_VERSION",
    "OffsetMapping",
    "PairLayout",
    "build_eval_features",
    "build_train_features",
    "pair_layout",
    "window_spans",
]
