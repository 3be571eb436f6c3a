"""Windowed features for extractive QA: pure functions, no distributed code.

The windows are exactly those of the fast tokenizer's own overflow handling::

    tokenizer(question.lstrip(), context, truncation="only_second", max_length=L, stride=S,
              return_overflowing_tokens=True)

(question and context swapped with ``only_first`` for tokenizers that pad on the left), but each
distinct context is tokenized once and its windows are cut from that one encoding: a paragraph of
SQuAD carries about 4.6 questions, and tokenizing every question+context pair repeats the costly
part. Labels are computed for all examples at once with array operations.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qa_dist.config import DataConfig
from qa_dist.errors import DataError
from qa_dist.features.layout import PairLayout, WindowTokenizer, tokenize_texts
from qa_dist.features.offsets import OffsetMapping

FEATURE_BUILDER_VERSION = "3"  # 2: eval windows carry cls_index; 3: long contexts tokenized in pieces, sharded entries
"""Bump when the features built for the same inputs change; it is part of the cache key."""


def window_spans(n_context: int, budget: int, stride: int) -> list[tuple[int, int]]:
    """Context-token windows ``[start, stop)`` as the tokenizers library cuts overflowing tokens.

    ``budget`` is the number of context tokens a window holds. Consecutive windows share ``stride``
    tokens; the last window ends at the last token.
    """
    if n_context <= budget:
        return [(0, n_context)]
    step = budget - stride
    spans, start = [], 0
    while True:
        stop = min(start + budget, n_context)
        spans.append((start, stop))
        if stop == n_context:
            return spans
        start += step


def _answer_token_spans(
    example_ctx: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    ctx_token_base: np.ndarray,
    ctx_char_base: np.ndarray,
    token_starts: np.ndarray,
    token_ends: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """First and last context token overlapping each answer ``[start, end)``, or -1 where none does.

    Token offsets of all contexts are laid end to end on one character axis (each context shifted
    by ``ctx_char_base``), so one ``searchsorted`` labels every example at once.
    """
    g_start = starts + ctx_char_base[example_ctx]
    g_end = ends + ctx_char_base[example_ctx]
    if np.all(np.diff(token_starts) >= 0) and np.all(np.diff(token_ends) >= 0):
        first = np.searchsorted(token_ends, g_start, side="right")  # first token ending after start
        last = np.searchsorted(token_starts, g_end, side="left") - 1  # last token starting before end
    else:  # offsets that are not monotone: a slower exact scan per example
        first = np.empty(len(g_start), dtype=np.int64)
        last = np.empty(len(g_start), dtype=np.int64)
        for i, (c, s, e) in enumerate(zip(example_ctx, g_start, g_end, strict=True)):
            lo, hi = ctx_token_base[c], ctx_token_base[c + 1]
            hit = np.nonzero((token_starts[lo:hi] < e) & (token_ends[lo:hi] > s))[0]
            first[i], last[i] = (lo + hit[0], lo + hit[-1]) if len(hit) else (0, -1)
    base = ctx_token_base[example_ctx]
    limit = ctx_token_base[example_ctx + 1]
    ok = (first <= last) & (first >= base) & (last < limit)
    return np.where(ok, first - base, -1), np.where(ok, last - base, -1)


def _flat_offsets(ctx_offsets: list[list[tuple[int, int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every context's token offsets end to end: ``(token_base, char_start, char_end)``; context
    ``c`` owns tokens ``token_base[c]:token_base[c + 1]``."""
    lengths = np.fromiter((len(o) for o in ctx_offsets), dtype=np.int64, count=len(ctx_offsets))
    token_base = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if any(isinstance(o, np.ndarray) for o in ctx_offsets):  # a long context's, as an array already
        parts = [o if isinstance(o, np.ndarray) else np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in ctx_offsets]
        flat = np.concatenate(parts)
        return token_base, flat[:, 0], flat[:, 1]
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain.from_iterable(ctx_offsets)),
        dtype=np.int64,
        count=2 * int(token_base[-1]),
    ).reshape(-1, 2)
    return token_base, flat[:, 0], flat[:, 1]


def _answerable(ex: dict) -> bool:
    """Whether a record has an answer to label: ``is_impossible`` where given (qa-dist's records),
    else whether it has any answer text (the rows of the hub's ``squad``/``squad_v2``, whose
    unanswerable questions have ``answers={"text": [], "answer_start": []}``)."""
    answers = ex.get("answers")
    return bool(answers and answers["text"]) and not ex.get("is_impossible", False)


def _first_answer_tokens(examples, example_ctx, flat_offsets, contexts) -> tuple[list[int], list[int]]:
    """First and last context token of each example's first answer (-1 when unanswerable)."""
    token_base, flat_start, flat_end = flat_offsets
    lengths = np.diff(token_base)
    char_base = np.concatenate([[0], np.cumsum([len(c) + 1 for c in contexts])])[:-1].astype(np.int64)
    shift = np.repeat(char_base, lengths)
    answerable = np.fromiter((_answerable(ex) for ex in examples), dtype=bool, count=len(examples))
    starts = np.fromiter(
        (ex["answers"]["answer_start"][0] if ok else 0 for ex, ok in zip(examples, answerable, strict=True)),
        dtype=np.int64,
        count=len(examples),
    )
    lengths_chars = np.fromiter(
        (len(ex["answers"]["text"][0]) if ok else 0 for ex, ok in zip(examples, answerable, strict=True)),
        dtype=np.int64,
        count=len(examples),
    )
    first, last = _answer_token_spans(
        example_ctx,
        starts,
        starts + lengths_chars,
        token_base,
        char_base,
        flat_start + shift,
        flat_end + shift,
    )
    return np.where(answerable, first, -1).tolist(), np.where(answerable, last, -1).tolist()


def _window_offsets(
    flat_offsets, window_ctx: list[int], window_span: list[tuple[int, int]], ctx_at: list[int], lengths: list[int]
) -> OffsetMapping:
    """The eval windows' offset mapping from where each window's context tokens sit, in array steps."""
    token_base, flat_start, flat_end = flat_offsets
    lengths_a = np.asarray(lengths, dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(lengths_a)]).astype(np.int64)
    span = np.asarray(window_span, dtype=np.int64).reshape(-1, 2)
    n = span[:, 1] - span[:, 0]
    src0 = token_base[np.asarray(window_ctx, dtype=np.int64)] + span[:, 0] if len(n) else n
    dst0 = base[:-1] + np.asarray(ctx_at, dtype=np.int64)
    within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    src, dst = np.repeat(src0, n) + within, np.repeat(dst0, n) + within
    char_start = np.full(int(base[-1]), -1, dtype=np.int32)
    char_end = np.full(int(base[-1]), -1, dtype=np.int32)
    char_start[dst], char_end[dst] = flat_start[src], flat_end[src]
    return OffsetMapping(base, char_start, char_end)


def _rows(examples: Any) -> list:
    """Records as a list of dicts: a list as it is, a ``datasets.Dataset`` or ``pyarrow.Table``
    (the hub's ``squad``/``squad_v2``) converted once, any other iterable listed."""
    if isinstance(examples, list):
        return examples
    to_pylist = getattr(examples, "to_pylist", None) or getattr(examples, "to_list", None)
    if callable(to_pylist) and hasattr(examples, "column_names"):
        return to_pylist()
    return list(examples)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: building a million small lists of ints (which cannot
    form cycles) triggers it over and over, and it rescans them each time (25-30% of the build)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build(
    examples: Any,
    tokenizer,
    max_length: int,
    doc_stride: int,
    train: bool,
    progress: bool = False,
    source: str | None = None,
    first_index: int = 0,
) -> dict[str, list]:
    """The windows of ``examples``; ``first_index``: the index of the first of them in the whole
    split (a shard's examples are numbered as in the split, so shards concatenate)."""
    examples = _rows(examples)
    spec = WindowTokenizer.of(tokenizer)
    layout, with_types = spec.layout, spec.with_types

    # Tokenize each distinct context once, and every question.
    context_index: dict[str, int] = {}
    example_ctx_list = [context_index.setdefault(ex["context"], len(context_index)) for ex in examples]
    contexts = list(context_index)
    backend = spec.backend()
    ctx_ids, ctx_offsets = tokenize_texts(backend, contexts)
    q_ids, _ = tokenize_texts(backend, [ex["question"].lstrip() for ex in examples], offsets=False)
    flat_offsets = _flat_offsets(ctx_offsets)
    del ctx_offsets  # (the arrays hold them)
    if train:
        example_ctx = np.asarray(example_ctx_list, dtype=np.int64)
        tok_first, tok_last = _first_answer_tokens(examples, example_ctx, flat_offsets, contexts)

    pre, mid, post = list(layout.pre), list(layout.mid), list(layout.post)
    pre_t, mid_t, post_t = list(layout.pre_types), list(layout.mid_types), list(layout.post_types)
    first_t, second_t = layout.first_type, layout.second_type
    n_special = layout.num_special
    input_ids, attention_mask, token_type_ids, example_index = [], [], [], []
    start_positions, end_positions, example_id, cls_indices = [], [], [], []
    window_ctx, window_span, window_ctx_at = [], [], []  # where each eval window's context tokens sit

    rows = enumerate(examples)
    if progress:
        rows = tqdm(rows, total=len(examples), desc="windows", unit="ex", mininterval=0.5)
    for i, ex in rows:
        c = example_ctx_list[i]
        question, context_ids = q_ids[i], ctx_ids[c]
        budget = max_length - len(question) - n_special
        if len(question) + len(context_ids) + n_special > max_length and budget <= doc_stride:
            raise DataError(
                (f"{source}: " if source else "")
                + f"question {ex['id']!r}: the question takes {len(question)} tokens, leaving "
                f"{max(budget, 0)} context tokens per window, not more than doc_stride={doc_stride}; "
                "raise data.max_length or lower data.doc_stride"
            )
        for w0, w1 in window_spans(len(context_ids), budget, doc_stride):
            window = context_ids[w0:w1]
            if layout.context_first:
                first, second, ctx_at = window, question, len(pre)
            else:
                first, second, ctx_at = question, window, len(pre) + len(question) + len(mid)
            ids = pre + first + mid + second + post
            input_ids.append(ids)
            attention_mask.append([1] * len(ids))
            if with_types:
                token_type_ids.append(pre_t + [first_t] * len(first) + mid_t + [second_t] * len(second) + post_t)
            example_index.append(first_index + i)
            if train:
                s, e = tok_first[i], tok_last[i]
                if s >= w0 and e < w1:  # (s is -1 when there is no answer; w0 >= 0)
                    start_positions.append(ctx_at + s - w0)
                    end_positions.append(ctx_at + e - w0)
                else:
                    cls_index = _cls_index(layout, len(first), len(second))
                    start_positions.append(cls_index)
                    end_positions.append(cls_index)
            else:
                window_ctx.append(c)
                window_span.append((w0, w1))
                window_ctx_at.append(ctx_at)
                example_id.append(ex["id"])
                cls_indices.append(_cls_index(layout, len(first), len(second)))

    cols: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_types:
        cols["token_type_ids"] = token_type_ids
    if train:
        cols["start_positions"], cols["end_positions"] = start_positions, end_positions
    else:
        lengths = [len(ids) for ids in input_ids]
        cols["offset_mapping"] = _window_offsets(flat_offsets, window_ctx, window_span, window_ctx_at, lengths)
        cols["example_id"], cols["cls_index"] = example_id, cls_indices
    cols["example_index"] = example_index
    return cols


def _cls_index(layout: PairLayout, n_first: int, n_second: int) -> int:
    """Position of the CLS token (where unanswerable windows point), wherever the template puts it."""
    cls = layout.cls_token_id
    if cls is not None:
        if cls in layout.pre:
            return layout.pre.index(cls)
        if cls in layout.mid:
            return len(layout.pre) + n_first + layout.mid.index(cls)
        if cls in layout.post:
            return len(layout.pre) + n_first + len(layout.mid) + n_second + layout.post.index(cls)
    return 0


def build_columns(
    examples: Any,
    tokenizer,
    max_length: int,
    doc_stride: int,
    train: bool,
    source: str | None = None,
    first_index: int = 0,
) -> dict[str, Any]:
    """The windows of ``examples`` in this process (a pool worker's task, or one process's build)."""
    with _gc_paused():
        return _build(examples, tokenizer, max_length, doc_stride, train, source=source, first_index=first_index)


def _windows(examples, tokenizer, max_length, doc_stride, train, *, progress, source, num_proc) -> dict[str, Any]:
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}")
    if num_proc == 1:
        with _gc_paused():
            return _build(examples, tokenizer, max_length, doc_stride, train, progress=progress, source=source)
    from qa_dist.features.parallel import WindowJob, build_in_pool  # (imports this module)

    job = WindowJob(WindowTokenizer.of(tokenizer), max_length, doc_stride, train, source)
    return build_in_pool(job, _rows(examples), num_proc)


def build_train_features(
    examples: Any,
    tokenizer,
    max_length: int = DataConfig.max_length,
    doc_stride: int = DataConfig.doc_stride,
    *,
    progress: bool = False,
    source: str | None = None,
    num_proc: int = 1,
) -> dict[str, list]:
    """Training windows with labels.

    ``examples``: records with ``id``, ``question``, ``context`` and ``answers``
    (``{"text": [...], "answer_start": [...]}``), as :func:`qa_dist.load_examples` gives them, or the
    hub's ``squad`` / ``squad_v2`` rows (a ``datasets.Dataset`` or a list of its rows): a record
    without answer text, or with ``is_impossible`` true, is unanswerable. Columns: ``input_ids``, ``attention_mask``, ``token_type_ids`` (where the tokenizer makes
    them), ``start_positions``, ``end_positions``, ``example_index``. Labels follow each example's
    first answer: the first and last tokens that overlap its characters. A window that does not
    hold the whole answer, and every window of an unanswerable question, points at the CLS token.
    Features are unpadded. ``source`` (the data file) is named in errors about an example.
    ``num_proc``: processes that build, as ``datasets.map`` takes it; the columns are those of one.
    """
    return _windows(
        examples, tokenizer, max_length, doc_stride, True, progress=progress, source=source, num_proc=num_proc
    )


def build_eval_features(
    examples: Any,
    tokenizer,
    max_length: int = DataConfig.max_length,
    doc_stride: int = DataConfig.doc_stride,
    *,
    progress: bool = False,
    source: str | None = None,
    num_proc: int = 1,
) -> dict[str, Any]:
    """Evaluation windows: ``input_ids``, ``attention_mask``, ``token_type_ids`` (where made),
    ``offset_mapping`` (character spans of context tokens, None elsewhere), ``example_index``,
    ``example_id``, ``cls_index`` (where the null answer is scored). Unpadded. ``examples``,
    ``source`` and ``num_proc`` as for :func:`build_train_features` (answers not needed).

    ``offset_mapping`` is an :class:`OffsetMapping`: indexed like a list of lists
    (``features["offset_mapping"][i][k]`` is a ``(start, end)`` tuple or None), held as flat arrays,
    so that :func:`qa_dist.postprocess` and ``pyarrow`` read it without a Python loop; the other
    columns are lists."""
    return _windows(
        examples, tokenizer, max_length, doc_stride, False, progress=progress, source=source, num_proc=num_proc
    )
