"""Answer spans from start/end logits: pure tensor functions, no distributed code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _window_max(x: torch.Tensor, band: int) -> torch.Tensor:
    """``out[:, i] = max(x[:, i : i + band])`` for ``[rows, length]``; positions past the end count as -inf."""
    padded = F.pad(x, (0, band - 1), value=float("-inf"))
    return F.max_pool1d(padded[:, None, :], kernel_size=band, stride=1)[:, 0]


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
    end_valid = end_logits.masked_fill(~context_mask, neg)
    bound = (start_logits + _window_max(end_valid, band)).masked_fill(~context_mask, neg)
    n = min(n_best, length)
    best_bounds, starts = bound.topk(n, dim=1)
    tau = best_bounds[:, -1:]
    # (a window with fewer than n valid starts has tau = -inf: it needs just its valid ones)
    needed = int(((bound >= tau) & (bound > neg)).sum(dim=1).max()) if windows else n
    if needed > n:  # ties at tau: take every start whose bound reaches it
        starts = bound.topk(needed, dim=1).indices  # [W, C]
    ends = starts[:, :, None] + torch.arange(band, device=starts.device)  # [W, C, band]
    inside = ends < length
    ends_c = ends.clamp(max=length - 1)
    rows = torch.arange(windows, device=starts.device)[:, None, None]
    scores = start_logits.gather(1, starts)[:, :, None] + end_valid[rows, ends_c]
    scores = scores.masked_fill(~inside | ~context_mask.gather(1, starts)[:, :, None], neg)
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
