"""The Arrow tables a feature cache entry stores: windows (``features``) and examples (``examples``).

Kept apart from ``prepare`` so that a pool worker building shards imports pyarrow and this, not the
data readers, the model code or torch."""

from __future__ import annotations

import pyarrow as pa

FEATURE_TYPES = {
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


def features_table(columns: dict[str, list]) -> pa.Table:
    return pa.table({name: pa.array(values, type=FEATURE_TYPES[name]) for name, values in columns.items()})


def examples_table(examples: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(examples, schema=EXAMPLE_SCHEMA)
