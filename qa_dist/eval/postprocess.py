"""Rank zero's half of evaluation: span candidates to answers, n-best lists and null odds.

Pure numpy over all windows at once (sorting by example and score replaces the tutorials'
per-example Python loop); no distributed code. ``postprocess`` exposes it for logits in hand.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qa_dist.eval.candidates import Candidates
from qa_dist.eval.spans import window_candidates_cpu
from qa_dist.features import OffsetMapping


class Predictions(NamedTuple):
    """What post-processing returns (unpacks as ``answers, nbest, null_odds``)."""

    answers: dict[str, str]
    """Question id to answer text ("" for no answer)."""
    nbest: Mapping[str, list[dict]]
    """Question id to its n best answers: text, start/end character offsets, score, log_prob, probability."""
    null_odds: dict[str, float]
    """Question id to null score minus best span score (SQuAD v2; empty otherwise)."""
    span_answers: dict[str, str]
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
        base = column.offsets.to_numpy().astype(np.int64)
        pairs = column.values.slice(base[0], base[-1] - base[0])
        base = base - base[0]
        # A null pair has no values, so the flat values are the non-null pairs' numbers in order.
        validity = pairs.buffers()[0]
        if validity is None:
            present = np.ones(len(pairs), dtype=bool)
        else:
            bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
            present = bits[pairs.offset : pairs.offset + len(pairs)].astype(bool)
        if isinstance(pairs, pa.FixedSizeListArray):
            flat = pc.list_flatten(pairs).to_numpy(zero_copy_only=False)
        else:  # zero-copy: the pairs' numbers lie in order between their first and last offsets
            inner = pairs.offsets.to_numpy()
            flat = pairs.values.slice(inner[0], inner[-1] - inner[0]).to_numpy(zero_copy_only=False)
        if len(flat) != 2 * int(present.sum()) or (
            not isinstance(pairs, pa.FixedSizeListArray)
            and len(pairs)
            and pc.any(pc.not_equal(pc.list_value_length(pairs), 2)).as_py()
        ):
            raise ValueError("offset_mapping entries must be [start, end] pairs or None")
        # int32: half the memory traffic of int64, and contexts are far shorter than 2**31 characters
        char_start = np.full(len(pairs), -1, dtype=np.int32)
        char_end = np.full(len(pairs), -1, dtype=np.int32)
        char_start[present], char_end[present] = flat[0::2], flat[1::2]
        return cls(base=base, char_start=char_start, char_end=char_end)

    @classmethod
    def from_lists(cls, rows: Any) -> WindowOffsets:
        """From an ``offset_mapping`` of Python lists (one per window, of ``(start, end)`` pairs or
        None), in one conversion by pyarrow (faster than a per-pair list comprehension or two
        ``np.fromiter`` passes); an :class:`OffsetMapping` as it is."""
        if isinstance(rows, OffsetMapping):
            return cls.from_offset_mapping(rows)
        try:
            column = pa.array(rows, type=pa.list_(pa.list_(pa.int32())))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # e.g. rows of 2-d numpy arrays
            column = pa.array([[None if p is None else list(p) for p in row] for row in rows])
        return cls.from_arrow(column)

    @classmethod
    def from_offset_mapping(cls, offsets: OffsetMapping) -> WindowOffsets:
        """The arrays of :func:`qa_dist.build_eval_features`' offset mapping, shared, not copied."""
        return cls(base=offsets.base, char_start=offsets.char_start, char_end=offsets.char_end)

    def __len__(self) -> int:
        return len(self.base) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.base)

    def context_mask(self, windows: np.ndarray | None, width: int) -> np.ndarray:
        """bool ``[len(windows), width]``: which positions of each window are context tokens
        (``windows=None``: all of them)."""
        return _dense(self.char_start, self.base, width, windows, fill=-1) >= 0


def _dense(values: np.ndarray, base: np.ndarray, width: int, rows: np.ndarray | None = None, fill=0) -> np.ndarray:
    """``[len(rows), width]`` of ragged rows (row ``r`` is ``values[base[r]:base[r + 1]]``, ``base[0]``
    is 0), ``fill`` past each row's end; ``rows=None``: all of them, a reshape when every row is
    ``width`` long (padded features)."""
    lengths = np.diff(base)
    if rows is None:
        if len(lengths) and len(values) == len(lengths) * width and (lengths == width).all():
            return values.reshape(len(lengths), width)
        if len(values) == base[-1] and (lengths <= width).all():
            # Unpadded rows no longer than width: one scatter of every value to its place.
            out = np.full((len(lengths), width), fill, dtype=values.dtype)
            place = np.arange(len(values)) + np.repeat(np.arange(len(lengths)) * width - base[:-1], lengths)
            out.reshape(-1)[place] = values
            return out
        rows = np.arange(len(lengths))
    if len(values) == 0:
        return np.full((len(rows), width), fill, dtype=values.dtype)
    position = np.arange(width)[None, :]
    flat = np.minimum(base[rows, None] + position, len(values) - 1)
    return np.where(position < lengths[rows, None], values[flat], fill)


def _dense_mask(column: Any, width: int) -> np.ndarray:
    """bool ``[rows, width]`` from a list column of 0/1 (an attention mask), False past each row's end."""
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        base = column.offsets.to_numpy().astype(np.int64)
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(bool)
        return _dense(values, base - base[0], width)
    lengths = np.fromiter(map(len, column), dtype=np.int64, count=len(column))
    if all(map(all, column)):
        # No zero anywhere (unpadded windows, as build_eval_features makes them): a row's real
        # tokens are its first len(row). One C-level scan instead of converting every value.
        return np.arange(width)[None, :] < lengths[:, None]
    values = np.fromiter(itertools.chain.from_iterable(column), dtype=bool, count=int(lengths.sum()))
    return _dense(values, np.concatenate([[0], np.cumsum(lengths)]), width)


class NBestLists(Mapping):
    """Question id to its n-best list, built on access from the decoded arrays (building 20 dicts
    for each of 12k questions costs more than the rest of post-processing; most callers only
    write them once, or never look)."""

    def __init__(self, ids, contexts, bounds, char_start, char_end, score, log_prob, null, n_best: int) -> None:
        self._ids, self._n_best = ids, n_best
        self._index = {qid: e for e, qid in enumerate(ids)}
        self._contexts, self._bounds = contexts, bounds
        self._arrays = (char_start, char_end, score, log_prob)
        self._null = null  # example -> (score, log_prob), or None (not SQuAD v2)

    def __getitem__(self, qid: str) -> list[dict]:
        e = self._index[qid]
        lo, hi = self._bounds[e], self._bounds[e + 1]
        starts, ends, scores, log_probs = (a[lo:hi].tolist() for a in self._arrays)
        context = self._contexts[e]
        entries = [
            {"text": context[a:b], "start": a, "end": b, "score": sc, "log_prob": lp}
            for a, b, sc, lp in zip(starts, ends, scores, log_probs, strict=True)
        ]
        if self._null is not None and self._null[e] is not None:
            null_score, null_log_prob = self._null[e]
            position = next((k for k, x in enumerate(entries) if x["score"] < null_score), len(entries))
            null_entry = {"text": "", "start": -1, "end": -1, "score": null_score, "log_prob": null_log_prob}
            entries.insert(position, null_entry)
            del entries[self._n_best :]
        if entries:
            top = entries[0]["score"]
            weights = [math.exp(x["score"] - top) for x in entries]
            total = sum(weights)
            for x, weight in zip(entries, weights, strict=True):
                x["probability"] = weight / total
        return entries

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def _ranked_rows(score: np.ndarray, window_example: np.ndarray, num_examples: int):
    """All valid candidates, sorted by (example, score descending): each row's window and score,
    the order, and each sorted row's example."""
    num_windows, n = len(window_example), (score.shape[1] if score.ndim == 2 else 0)
    row_window = np.repeat(np.arange(num_windows), n)
    row_score = score.ravel()
    valid = np.flatnonzero(np.isfinite(row_score))
    if num_windows and np.all(window_example[1:] >= window_example[:-1]):
        # Windows come grouped by example (as every feature builder makes them) and each window's
        # candidates are sorted already: only examples with several windows need sorting.
        sort = valid
        row_example = window_example[row_window[sort]]  # (sorting inside a group keeps it)
        windows_of = np.bincount(window_example, minlength=num_examples)
        multi = np.flatnonzero(windows_of[row_example] > 1)
        if len(multi):
            sub = multi[np.lexsort((-row_score[sort[multi]], row_example[multi]))]
            sort = sort.copy()
            sort[multi] = sort[sub]
    else:
        sort = valid[np.lexsort((-row_score[valid], window_example[row_window[valid]]))]
        row_example = window_example[row_window[sort]]
    return row_window, row_score, sort, row_example


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
    window = candidates.window
    if len(window) and (window.min() < 0 or window.max() >= num_windows):
        raise ValueError(f"candidates name windows outside 0..{num_windows - 1}")
    keep = np.full(num_windows, -1, dtype=np.int64)
    keep[window] = np.arange(len(window))  # one row per window (a repeated window is padding, the same again)
    if (keep < 0).any():
        raise ValueError(f"candidates cover {int((keep >= 0).sum())} distinct windows of {num_windows}")
    score, null = candidates.score[keep], candidates.null[keep].astype(np.float64)
    start, end = candidates.start[keep].astype(np.int64), candidates.end[keep].astype(np.int64)
    log_norm = candidates.log_norm[keep].astype(np.float64)
    window_example = np.asarray(window_example, dtype=np.int64)

    # Each example's null score: the minimum over its windows, and which window gave it.
    null_order = np.lexsort((null, window_example))
    ex_sorted = window_example[null_order]
    firsts = np.flatnonzero(np.r_[True, ex_sorted[1:] != ex_sorted[:-1]]) if num_windows else np.zeros(0, int)
    null_window = np.full(num_examples, -1, dtype=np.int64)
    null_window[ex_sorted[firsts]] = null_order[firsts]

    row_window, row_score, sort, row_example = _ranked_rows(score, window_example, num_examples)
    group_first = np.searchsorted(row_example, row_example, side="left")
    top = sort[np.arange(len(sort)) - group_first < n_best_size]
    top_window, top_example = row_window[top], window_example[row_window[top]]
    top_score = row_score[top].astype(np.float64)
    top_log_prob = top_score - log_norm[top_window]
    char_start = offsets.char_start[offsets.base[top_window] + start.ravel()[top]]
    char_end = offsets.char_end[offsets.base[top_window] + end.ravel()[top]]
    bounds = np.searchsorted(top_example, np.arange(num_examples + 1), side="left")

    # The best span of each example (its first row), as Python values for the loop below.
    has_span = bounds[1:] > bounds[:-1]
    best_row = np.minimum(bounds[:-1], max(len(top) - 1, 0))
    best_start = char_start[best_row].tolist() if len(top) else [0] * num_examples
    best_end = char_end[best_row].tolist() if len(top) else [0] * num_examples
    span_answers = {
        qid: contexts[e][best_start[e] : best_end[e]] if ok else ""
        for e, (qid, ok) in enumerate(zip(example_ids, has_span.tolist(), strict=True))
    }
    null_entries = None
    if version_2_with_negative:
        example_null = np.where(null_window >= 0, null[np.maximum(null_window, 0)], np.inf)
        best_score = np.where(has_span, top_score[best_row] if len(top) else -np.inf, -np.inf)
        odds = example_null - best_score  # +inf when an example has no valid span at all
        null_odds = dict(zip(example_ids, odds.tolist(), strict=True))
        empty = (odds > null_score_diff_threshold).tolist()
        answers = {qid: "" if no else span_answers[qid] for qid, no in zip(example_ids, empty, strict=True)}
        null_log_prob = example_null - log_norm[np.maximum(null_window, 0)]
        null_entries = [
            (a, b) if w >= 0 else None
            for a, b, w in zip(example_null.tolist(), null_log_prob.tolist(), null_window.tolist(), strict=True)
        ]
    else:
        null_odds, answers = {}, dict(span_answers)
    nbest = NBestLists(
        example_ids, contexts, bounds, char_start, char_end, top_score, top_log_prob, null_entries, n_best_size
    )
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
    if isinstance(data, Mapping):  # (a dict of columns, or a tokenizer's BatchEncoding)
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
        if isinstance(offset_column, (pa.ChunkedArray, pa.Array))
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

    start_logits = np.asarray(start_logits.float() if isinstance(start_logits, torch.Tensor) else start_logits)
    end_logits = np.asarray(end_logits.float() if isinstance(end_logits, torch.Tensor) else end_logits)
    if start_logits.ndim != 2 or start_logits.shape[0] != len(offsets) or end_logits.shape != start_logits.shape:
        raise ValueError(f"logits of shape {start_logits.shape} / {end_logits.shape} for {len(offsets)} features")
    width = start_logits.shape[1]
    attention = _column(features, "attention_mask")
    # The tutorials' features are padded: normalise over real tokens only.
    real = (
        _dense_mask(attention, width)
        if attention is not None
        else np.arange(width)[None, :] < np.minimum(offsets.lengths, width)[:, None]
    )
    # Every window in one call: the kernel is per window and stops at each one's last context token.
    start, end, score, null, log_norm = window_candidates_cpu(
        start_logits, end_logits, offsets.context_mask(None, width), real, cls, n_best_size, max_answer_length
    )
    candidates = Candidates(np.arange(len(offsets)), start, end, score, null, log_norm)
    return decode(
        candidates,
        offsets,
        window_example,
        ids,
        contexts,
        n_best_size=n_best_size,
        version_2_with_negative=version_2_with_negative,
        null_score_diff_threshold=null_score_diff_threshold,
    )
