"""Rank zero's half of evaluation: span candidates to answers, n-best lists and null odds.

Pure numpy over all windows at once (sorting by example and score replaces the tutorials'
per-example Python loop); no distributed code. ``postprocess`` exposes it for logits in hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qa_dist.eval.candidates import Candidates, candidates_from_logits


class Predictions(NamedTuple):
    """What post-processing returns (unpacks as ``answers, nbest, null_odds``)."""

    answers: dict[str, str]
    """Question id to answer text ("" for no answer)."""
    nbest: dict[str, list[dict]]
    """Question id to its n best answers: text, start/end character offsets, score, log_prob, probability."""
    null_odds: dict[str, float]
    """Question id to null score minus best span score (SQuAD v2; empty otherwise)."""
    span_answers: dict[str, str] = {}
    """Question id to its best non-empty span, whatever the null score (for threshold tuning)."""


@dataclass(frozen=True)
class WindowOffsets:
    """Character offsets of every window's tokens, flat: window ``w`` owns ``base[w]:base[w + 1]``;
    -1 marks tokens outside the context."""

    base: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array) -> WindowOffsets:
        """From an ``offset_mapping`` column (list of [start, end] pairs or nulls), without Python loops."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        pairs = pc.list_flatten(column)
        base = column.offsets.to_numpy().astype(np.int64)
        base = base - base[0]

        def part(i: int) -> np.ndarray:
            return pc.fill_null(pc.list_element(pairs, i), -1).to_numpy(zero_copy_only=False).astype(np.int64)

        return cls(base=base, char_start=part(0), char_end=part(1))

    @classmethod
    def from_lists(cls, rows: list) -> WindowOffsets:
        return cls.from_arrow(pa.array([[None if p is None else list(p) for p in row] for row in rows]))

    def __len__(self) -> int:
        return len(self.base) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.base)

    def context_mask(self, windows: np.ndarray, width: int) -> np.ndarray:
        """bool ``[len(windows), width]``: which positions of each window are context tokens."""
        mask = np.zeros((len(windows), width), dtype=bool)
        for row, w in enumerate(windows):
            lo, hi = self.base[w], self.base[w + 1]
            n = min(hi - lo, width)
            mask[row, :n] = self.char_start[lo : lo + n] >= 0
        return mask


def decode(
    candidates: Candidates,
    offsets: WindowOffsets,
    window_example: np.ndarray,
    example_ids: list[str],
    contexts: list[str],
    *,
    n_best_size: int = 20,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> Predictions:
    """Answers from the candidates of every window.

    Per example: its n best spans over all its windows by start + end logit; for SQuAD v2 its null
    score is the minimum over its windows, and the answer is empty when null score minus best span
    score exceeds the threshold. Duplicate windows (sampler padding) are dropped by window index;
    a window without candidates is an error, not a silent gap.
    """
    num_windows, num_examples = len(offsets), len(example_ids)
    order = np.argsort(candidates.window, kind="stable")
    windows, first = np.unique(candidates.window[order], return_index=True)
    if len(windows) != num_windows or (num_windows and (windows[0] != 0 or windows[-1] != num_windows - 1)):
        raise ValueError(f"candidates cover {len(windows)} distinct windows of {num_windows}")
    keep = order[first]
    score, null = candidates.score[keep], candidates.null[keep]
    start, end = candidates.start[keep].astype(np.int64), candidates.end[keep].astype(np.int64)
    log_norm = candidates.log_norm[keep]
    window_example = np.asarray(window_example, dtype=np.int64)
    n = score.shape[1] if score.ndim == 2 else 0

    # Each example's null score: the minimum over its windows, and which window gave it.
    null_order = np.lexsort((null, window_example))
    ex_sorted = window_example[null_order]
    firsts = np.flatnonzero(np.r_[True, ex_sorted[1:] != ex_sorted[:-1]])
    null_window = np.full(num_examples, -1, dtype=np.int64)
    null_window[ex_sorted[firsts]] = null_order[firsts]

    # All valid candidates, sorted by (example, score descending); keep each example's first n.
    row_window = np.repeat(np.arange(num_windows), n)
    row_score = score.ravel()
    valid = np.flatnonzero(np.isfinite(row_score))
    row_example = window_example[row_window[valid]]
    sort = valid[np.lexsort((-row_score[valid], row_example))]
    row_example = window_example[row_window[sort]]
    group_first = np.searchsorted(row_example, row_example, side="left")
    top = sort[np.arange(len(sort)) - group_first < n_best_size]
    top_window, top_example = row_window[top], window_example[row_window[top]]
    top_score = row_score[top].astype(np.float64)
    top_log_prob = top_score - log_norm[top_window]
    char_start = offsets.char_start[offsets.base[top_window] + start.ravel()[top]]
    char_end = offsets.char_end[offsets.base[top_window] + end.ravel()[top]]
    bounds = np.searchsorted(top_example, np.arange(num_examples + 1), side="left")

    answers, nbest, null_odds, span_answers = {}, {}, {}, {}
    for e, qid in enumerate(example_ids):
        context = contexts[e]
        lo, hi = bounds[e], bounds[e + 1]
        entries = [
            {
                "text": context[char_start[i] : char_end[i]],
                "start": int(char_start[i]),
                "end": int(char_end[i]),
                "score": float(top_score[i]),
                "log_prob": float(top_log_prob[i]),
            }
            for i in range(lo, hi)
        ]
        best = entries[0] if entries else None
        span_answers[qid] = best["text"] if best else ""
        if version_2_with_negative and null_window[e] >= 0:
            w = null_window[e]
            null_score = float(null[w])
            null_entry = {
                "text": "",
                "start": -1,
                "end": -1,
                "score": null_score,
                "log_prob": null_score - float(log_norm[w]),
            }
            position = next((k for k, x in enumerate(entries) if x["score"] < null_score), len(entries))
            entries.insert(position, null_entry)
            del entries[n_best_size:]
            odds = null_score - best["score"] if best else math.inf
            null_odds[qid] = odds
            answers[qid] = "" if odds > null_score_diff_threshold else best["text"]
        else:
            answers[qid] = best["text"] if best else ""
        if entries:
            top_s = entries[0]["score"]
            weights = [math.exp(x["score"] - top_s) for x in entries]
            total = sum(weights)
            for x, weight in zip(entries, weights, strict=True):
                x["probability"] = weight / total
        nbest[qid] = entries
    return Predictions(answers, nbest, null_odds, span_answers)


def _table(data: Any) -> pa.Table | list[dict] | dict:
    """An Arrow table for datasets.Dataset / pyarrow input; lists and dicts pass through."""
    if isinstance(data, pa.Table):
        return data
    inner = getattr(data, "data", None)  # datasets.Dataset -> its Arrow table
    if inner is not None and hasattr(inner, "table"):
        table = inner.table
        indices = getattr(data, "_indices", None)
        return data.flatten_indices().data.table if indices is not None else table
    return data


def _column(data: Any, name: str) -> list | pa.ChunkedArray | None:
    if isinstance(data, pa.Table):
        return data.column(name) if name in data.column_names else None
    if isinstance(data, dict):
        return data.get(name)
    return [row[name] for row in data] if data and name in data[0] else None


def _values(data: Any, name: str, what: str) -> list:
    column = _column(data, name)
    if column is None:
        raise ValueError(f"{what} need a {name!r} column")
    return column.to_pylist() if isinstance(column, pa.ChunkedArray) else list(column)


def postprocess(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
    batch_size: int = 512,
) -> Predictions:
    """Answers from logits in hand, as the Hugging Face QA tutorials' post-processing gives them,
    with exact n-best spans.

    ``examples``: records (or a ``datasets.Dataset``) with ``id`` and ``context``. ``features``: the
    evaluation windows with ``offset_mapping`` (None outside the context) and ``example_id``, and
    optionally ``cls_index`` (else position 0). Logits: ``[windows, length]`` arrays or tensors,
    padded windows allowed. Returns ``Predictions(answers, nbest, null_odds, span_answers)``.
    """
    examples, features = _table(examples), _table(features)
    ids = [str(x) for x in _values(examples, "id", "examples")]
    contexts = _values(examples, "context", "examples")
    feature_ids = _values(features, "example_id", "features")
    offset_column = _column(features, "offset_mapping")
    if offset_column is None:
        raise ValueError("features need an 'offset_mapping' column")
    offsets = (
        WindowOffsets.from_arrow(offset_column)
        if isinstance(offset_column, pa.ChunkedArray)
        else WindowOffsets.from_lists(offset_column)
    )
    index = {qid: i for i, qid in enumerate(ids)}
    try:
        window_example = np.fromiter((index[str(q)] for q in feature_ids), dtype=np.int64, count=len(feature_ids))
    except KeyError as e:
        raise ValueError(f"feature example_id {e.args[0]!r} is not among the examples' ids") from None
    cls = _column(features, "cls_index")
    cls = np.zeros(len(offsets), np.int64) if cls is None else np.asarray(cls, dtype=np.int64)
    if len(feature_ids) != len(offsets):
        raise ValueError(f"features have {len(feature_ids)} example_ids but {len(offsets)} offset mappings")

    start_logits, end_logits = torch.as_tensor(np.asarray(start_logits)), torch.as_tensor(np.asarray(end_logits))
    if start_logits.shape[0] != len(offsets) or end_logits.shape != start_logits.shape:
        raise ValueError(
            f"logits of shape {tuple(start_logits.shape)} / {tuple(end_logits.shape)} for {len(offsets)} features"
        )
    width, lengths = start_logits.shape[1], offsets.lengths
    parts = []
    for lo in range(0, len(offsets), batch_size):
        windows = np.arange(lo, min(lo + batch_size, len(offsets)))
        real = torch.from_numpy(np.arange(width)[None, :] < lengths[windows, None])
        parts.append(
            candidates_from_logits(
                windows,
                start_logits[windows],
                end_logits[windows],
                torch.from_numpy(offsets.context_mask(windows, width)),
                real,
                torch.from_numpy(cls[windows]),
                n_best=n_best_size,
                max_answer_length=max_answer_length,
            )
        )
    return decode(
        Candidates.concat(parts),
        offsets,
        window_example,
        ids,
        contexts,
        n_best_size=n_best_size,
        version_2_with_negative=version_2_with_negative,
        null_score_diff_threshold=null_score_diff_threshold,
    )
