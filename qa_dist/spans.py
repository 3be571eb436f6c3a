"""Answer spans from start/end logits: pure tensor functions, no distributed code."""

from __future__ import annotations

import torch


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor, max_answer_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best valid span of each window, exactly: over every (start, end) with both tokens in the
    context, ``end >= start`` and ``end - start + 1 <= max_answer_length``, by start + end logit.

    Shapes: logits and ``context_mask`` are ``[windows, length]``. Returns (start, end, score);
    a window without a context token gets score -inf.
    """
    scores = start_logits[:, :, None] + end_logits[:, None, :]
    length = scores.shape[-1]
    i = torch.arange(length, device=scores.device)
    band = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_answer_length)
    valid = band[None] & context_mask[:, :, None] & context_mask[:, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    flat = scores.flatten(1).max(dim=1)
    return flat.indices // length, flat.indices % length, flat.values
