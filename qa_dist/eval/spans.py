"""Answer spans from start/end logits: pure functions, no distributed code."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def top_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor,
    n_best: int,
    max_answer_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n_best`` best valid spans of each window, exactly: among every (start, end) with both
    tokens in the context, ``end >= start`` and ``end - start + 1 <= max_answer_length``, by
    start + end logit, best first.

    Shapes: logits and ``context_mask`` are ``[windows, length]``; returns (start, end, score), each
    ``[windows, n_best]``. Slots a window has no valid span for hold score -inf.

    Exact without scoring every span: ``bound[s]``, the best span starting at ``s``, bounds every span
    from ``s``. The ``n_best`` largest bounds are the scores of ``n_best`` distinct valid spans, so
    the n-th best span scores at least the n-th largest bound ``tau``, and every span of the n best
    starts at some ``s`` with ``bound[s] >= tau``. Only those starts (``n_best`` of them, more on
    ties) are expanded over the answer-length band: about ``n_best x max_answer_length`` scores per
    window instead of ``length x max_answer_length``, on whatever device the logits are.
    """
    windows, length = start_logits.shape
    band = max(1, min(max_answer_length, length))
    neg = float("-inf")
    # ends[:, s] = the band of valid end logits from s on ([windows, length, band], a view; -inf past the end)
    end_valid = F.pad(end_logits.masked_fill(~context_mask, neg), (0, band - 1), value=neg)
    ends = end_valid.unfold(1, band, 1)
    window_max = F.max_pool1d(end_valid[:, None, :], kernel_size=band, stride=1)[:, 0]
    bound = (start_logits + window_max).masked_fill(~context_mask, neg)
    n = min(n_best, length)
    best_bounds, starts = bound.topk(n, dim=1)
    tau = best_bounds[:, -1:]
    # (a window with fewer than n valid starts has tau = -inf: it needs just its valid ones)
    needed = int(((bound >= tau) & (bound > neg)).sum(dim=1).max()) if windows else n
    if needed > n:  # ties at tau: take every start whose bound reaches it
        best_bounds, starts = bound.topk(needed, dim=1)  # [W, C]
    # A start outside the context has bound -inf, and so do all its spans.
    start_valid = start_logits.gather(1, starts).masked_fill(best_bounds == neg, neg)
    scores = start_valid[:, :, None] + ends.gather(1, starts[:, :, None].expand(-1, -1, band))  # [W, C, band]
    k = min(n_best, scores.shape[1] * band)
    values, flat = scores.flatten(1).topk(k, dim=1)
    best_start = starts.gather(1, flat // band)
    best_end = best_start + flat % band
    if k < n_best:  # fewer spans than asked for in this length: pad with empty slots
        pad = n_best - k
        values = F.pad(values, (0, pad), value=neg)
        best_start, best_end = F.pad(best_start, (0, pad)), F.pad(best_end, (0, pad))
    return best_start, best_end, values


def window_candidates_cpu(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    context_mask: np.ndarray,
    real_mask: np.ndarray,
    cls_index: np.ndarray,
    n_best: int,
    max_answer_length: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per window on the CPU: the ``n_best`` best valid spans exactly (as ``top_spans``), the
    null score at ``cls_index`` and the log-normaliser over ``real_mask`` tokens, in one compiled
    pass per window (``qa_dist.eval.span_kernel``).

    Returns (start int16, end int16, score float32 ``[windows, n_best]``, null float32, log_norm
    float32 ``[windows]``); slots without a valid span hold score -inf.
    """
    start = np.ascontiguousarray(start_logits, dtype=np.float32)
    end = np.ascontiguousarray(end_logits, dtype=np.float32)
    windows, length = start.shape
    if n_best < 1:
        raise ValueError(f"n_best must be at least 1, got {n_best}")
    if end.shape != start.shape or context_mask.shape != start.shape or real_mask.shape != start.shape:
        raise ValueError("logits and masks must share one [windows, length] shape")
    out_start, out_end = np.zeros((windows, n_best), np.int16), np.zeros((windows, n_best), np.int16)
    out_score = np.empty((windows, n_best), np.float32)
    out_null, out_norm = np.empty(windows, np.float32), np.empty(windows, np.float32)
    if windows and length:
        # Imported here: importing numba costs about 0.3 s, in every process that imports qa_dist,
        # and most of them never post-process on the CPU.
        from qa_dist.eval.span_kernel import window_candidates

        window_candidates(
            start,
            end,
            np.ascontiguousarray(context_mask, dtype=np.bool_),
            np.ascontiguousarray(real_mask, dtype=np.bool_),
            np.ascontiguousarray(cls_index, dtype=np.int64),
            n_best,
            max(1, min(max_answer_length, length)),
            out_start,
            out_end,
            out_score,
            out_null,
            out_norm,
        )
    else:
        out_score[:] = -np.inf
    return out_start, out_end, out_score, out_null, out_norm
