"""A table of sample predictions at the end of training (the full evaluation is the evaluator's)."""

from __future__ import annotations

import numpy as np
import torch

from qa_dist.spans import best_spans
from qa_dist.train.inference import batch_logits


@torch.no_grad()
def log_sample_predictions(
    acc, model, eval_entry, tokenizer, tracker, step: int, *, count: int = 8, max_answer_length: int = 30
) -> None:
    """Predict the best span of the first ``count`` evaluation windows and log them as a table.
    Every rank runs the forward (ZeRO-3 gathers parameters collectively); the tracker logs on rank
    zero only."""
    from qa_dist.train.batches import FeatureColumns

    features = eval_entry.table("features")
    count = min(count, features.num_rows)
    columns = FeatureColumns.from_table(features)
    batch = columns.batch(np.arange(count), tokenizer.pad_token_id or 0)
    logits = batch_logits(acc, model, batch)
    offsets = features.column("offset_mapping").slice(0, count).to_pylist()
    width = batch["input_ids"].shape[1]
    mask = torch.tensor([[j < len(row) and row[j] is not None for j in range(width)] for row in offsets])
    starts, ends, scores = best_spans(logits[0], logits[1], mask, max_answer_length)
    examples = eval_entry.table("examples")
    index = features.column("example_index").slice(0, count).to_pylist()
    rows = []
    for w in range(count):
        example = examples.slice(index[w], 1).to_pylist()[0]
        s, e = int(starts[w]), int(ends[w])
        answer = example["context"][offsets[w][s][0] : offsets[w][e][1]] if torch.isfinite(scores[w]) else ""
        rows.append(
            [
                example["id"],
                example["question"],
                answer,
                float(scores[w]),
                " | ".join(example["answers"]["text"]) or "(unanswerable)",
            ]
        )
    tracker.log_table("sample_predictions", ["id", "question", "predicted", "score", "gold"], rows, step)
