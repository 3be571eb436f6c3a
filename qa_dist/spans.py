"""Answer spans from start/end logits: pure tensor functions, no distributed code."""

from __future__ import annotations

import numba
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


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor, max_answer_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The single best valid span of each window (see ``top_spans``): (start, end, score), ``[windows]``."""
    s, e, v = top_spans(start_logits, end_logits, context_mask, 1, max_answer_length)
    return s[:, 0], e[:, 0], v[:, 0]


# On the CPU the same search runs as one compiled pass per window (numba): the tensor version above
# makes about ten passes over every window plus two top-k selections, which on the CPU cost more
# than everything else in post-processing together. Written by hand because no library selects
# the n best spans of a band; checked against brute force and against ``top_spans`` in the tests.
@numba.njit(parallel=True, cache=True, nogil=True)
def _window_candidates(start, end, context, real, cls, n_best, band, out_start, out_end, out_score, out_null, out_norm):
    windows, length = start.shape
    neg = np.float32(-np.inf)
    for w in numba.prange(windows):
        s, e, ctx, r = start[w], end[w], context[w], real[w]
        out_null[w] = s[cls[w]] + e[cls[w]]
        best, bs, be = out_score[w], out_start[w], out_end[w]
        best[:] = neg
        bs[:] = 0
        be[:] = 0
        lo, hi = _true_range(r)
        top_s, top_e = neg, neg
        for i in range(lo, hi):
            if r[i]:
                top_s, top_e = max(top_s, s[i]), max(top_e, e[i])
        sum_s, sum_e = 0.0, 0.0
        for i in range(lo, hi):
            if r[i]:
                sum_s += np.exp(s[i] - top_s)
                sum_e += np.exp(e[i] - top_e)
        out_norm[w] = top_s + np.log(sum_s) + top_e + np.log(sum_e) if hi > lo else neg

        lo, hi = _true_range(ctx)
        m = hi - lo
        if m == 0:
            continue
        # window_max[k]: the best valid end in [k, k + band) (k counted from lo), by blocks of
        # ``band`` (van Herk / Gil-Werman): the max of a suffix of one block and a prefix of the next.
        ends = np.empty(m, np.float32)
        for k in range(m):
            ends[k] = e[lo + k] if ctx[lo + k] else neg
        prefix, suffix = np.empty(m, np.float32), np.empty(m, np.float32)
        for k in range(m):
            prefix[k] = ends[k] if k % band == 0 else max(prefix[k - 1], ends[k])
        for k in range(m - 1, -1, -1):
            suffix[k] = ends[k] if (k + 1) % band == 0 or k == m - 1 else max(suffix[k + 1], ends[k])
        # bound[k] = start + the best end from k bounds every span from k. As in ``top_spans``, the
        # n-th largest bound (tau) is at most the n-th best span score, so only starts whose bound
        # reaches tau are expanded: about n of them. ``best`` holds the n largest so far, sorted.
        bound = np.empty(m, np.float32)
        for k in range(m):
            last = min(k + band, m) - 1
            window_max = suffix[k] if last // band == k // band else max(suffix[k], prefix[last])
            v = s[lo + k] + window_max if ctx[lo + k] else neg
            bound[k] = v
            if v > best[n_best - 1]:
                q = n_best - 1
                while q > 0 and best[q - 1] < v:
                    best[q] = best[q - 1]
                    q -= 1
                best[q] = v
        tau = best[n_best - 1]
        best[:] = neg
        for k in range(m):
            if bound[k] < tau or bound[k] <= best[n_best - 1]:
                continue  # (ties at tau are expanded, as in ``top_spans``)
            for j in range(k, min(k + band, m)):
                v = s[lo + k] + ends[j]
                if v > best[n_best - 1]:  # ties keep the earlier span first
                    q = n_best - 1
                    while q > 0 and best[q - 1] < v:
                        best[q], bs[q], be[q] = best[q - 1], bs[q - 1], be[q - 1]
                        q -= 1
                    best[q], bs[q], be[q] = v, lo + k, lo + j


@numba.njit(cache=True, nogil=True)
def _true_range(mask):
    """(first True, last True + 1) of a bool row; (0, 0) if none."""
    lo, hi = 0, len(mask)
    while lo < hi and not mask[lo]:
        lo += 1
    while hi > lo and not mask[hi - 1]:
        hi -= 1
    return lo, hi


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
    null score at ``cls_index`` and the log-normaliser over ``real_mask`` tokens.

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
        _window_candidates(
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
