"""The CPU span search, compiled with numba: per window, the n best valid spans, the null score and
the log-normaliser in one pass (``qa_dist.eval.spans.window_candidates_cpu`` is the entry point).

The tensor version (``qa_dist.eval.spans.top_spans``) makes about ten passes over every window plus two
top-k selections, which on the CPU cost more than everything else in post-processing together.
Written by hand because no library selects the n best spans of a band; checked against brute force
and against ``top_spans`` in the tests.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def window_candidates(start, end, context, real, cls, n_best, band, out_start, out_end, out_score, out_null, out_norm):
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
        # The best valid end in [k, k + band) (k counted from lo), by blocks of ``band`` (van Herk /
        # Gil-Werman): the max of a suffix of k's block and a prefix of the next block. (Block loops,
        # not k % band: the integer divisions per token took a quarter of the kernel's time.)
        ends = np.empty(m, np.float32)
        for k in range(m):
            ends[k] = e[lo + k] if ctx[lo + k] else neg
        prefix, suffix = np.empty(m, np.float32), np.empty(m, np.float32)
        for b0 in range(0, m, band):
            b1 = min(b0 + band, m)
            prefix[b0] = ends[b0]
            for k in range(b0 + 1, b1):
                prefix[k] = max(prefix[k - 1], ends[k])
            suffix[b1 - 1] = ends[b1 - 1]
            for k in range(b1 - 2, b0 - 1, -1):
                suffix[k] = max(suffix[k + 1], ends[k])
        # bound[k] = start + the best end from k bounds every span from k. As in ``top_spans``, the
        # n-th largest bound (tau) is at most the n-th best span score, so only starts whose bound
        # reaches tau are expanded: about n of them, best bound first, so that the n-th best span
        # so far rises fast and prunes the rest early.
        bound = np.empty(m, np.float32)
        top_bound, top_start = np.full(n_best, neg, np.float32), np.zeros(n_best, np.int64)
        block_start, block_end = 0, min(band, m)
        for k in range(m):
            if k == block_end:
                block_start, block_end = k, min(k + band, m)
            if k == block_start or block_end == m:
                window_max = suffix[k]  # the window is k's whole block, or runs to the end inside it
            else:
                window_max = max(suffix[k], prefix[min(k + band - 1, m - 1)])
            v = s[lo + k] + window_max if ctx[lo + k] else neg
            bound[k] = v
            if v > top_bound[n_best - 1]:
                q = n_best - 1
                while q > 0 and top_bound[q - 1] < v:
                    top_bound[q], top_start[q] = top_bound[q - 1], top_start[q - 1]
                    q -= 1
                top_bound[q], top_start[q] = v, k
        tau = top_bound[n_best - 1]
        for r in range(n_best):
            k = top_start[r]
            if top_bound[r] == neg or top_bound[r] <= best[n_best - 1]:
                break  # (sorted: no later start can do better)
            _expand(s, ends, lo, k, min(k + band, m), best, bs, be)
            bound[k] = neg  # expanded
        for k in range(m):  # starts tied at tau that did not fit the top n
            if bound[k] >= tau and bound[k] > best[n_best - 1]:
                _expand(s, ends, lo, k, min(k + band, m), best, bs, be)


@numba.njit(cache=True, nogil=True, inline="always")
def _expand(s, ends, lo, k, stop, best, bs, be):
    """Offer the spans from start ``lo + k`` to the sorted n best (ties keep the earlier offer first)."""
    n_best = len(best)
    for j in range(k, stop):
        v = s[lo + k] + ends[j]
        if v > best[n_best - 1]:
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
