"""Answer spans from start/end logits: pure tensor functions, no distributed code."""

from __future__ import annotations

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
    ``[windows, n]`` with ``n = min(n_best, length * max_answer_length)``. Slots a window has no valid
    span for hold score -inf. Only the ``length x max_answer_length`` band of the score matrix is
    built (13x less than the full ``length x length`` at 384 and 30), so this runs where the logits
    are, GPU or CPU.
    """
    windows, length = start_logits.shape
    band = max(1, min(max_answer_length, length))
    neg = torch.finfo(start_logits.dtype).min
    # ends[w, s, k] is the end logit at s + k: a strided view, no copy until the sum below.
    ends = F.pad(end_logits, (0, band - 1), value=neg).unfold(1, band, 1)
    end_ok = F.pad(context_mask, (0, band - 1), value=False).unfold(1, band, 1)
    scores = (start_logits[:, :, None] + ends).masked_fill(~(context_mask[:, :, None] & end_ok), float("-inf"))
    values, flat = scores.flatten(1).topk(min(n_best, length * band), dim=1)
    starts = flat // band
    return starts, starts + flat % band, values


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor, max_answer_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The single best valid span of each window (see ``top_spans``): (start, end, score), ``[windows]``."""
    s, e, v = top_spans(start_logits, end_logits, context_mask, 1, max_answer_length)
    return s[:, 0], e[:, 0], v[:, 0]
