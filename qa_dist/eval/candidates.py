"""What each rank keeps of its evaluation windows: the n best valid spans, the null score and the
window's log-normaliser, a few hundred bytes per window instead of its full logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qa_dist.eval.spans import top_spans, window_candidates_cpu


@dataclass(frozen=True)
class Candidates:
    """Span candidates of a set of windows, row ``i`` describing window ``window[i]``."""

    window: np.ndarray
    """int64 ``[W]``: global window index (the row of the features table)."""
    start: np.ndarray
    """int16 ``[W, n]``: start token of each candidate, best first."""
    end: np.ndarray
    """int16 ``[W, n]``: end token (inclusive)."""
    score: np.ndarray
    """float32 ``[W, n]``: start + end logit; -inf marks a slot without a valid span."""
    null: np.ndarray
    """float32 ``[W]``: start + end logit at the window's CLS position (the no-answer score)."""
    log_norm: np.ndarray
    """float32 ``[W]``: logsumexp of the start logits plus that of the end logits over the window's
    real tokens, so ``score - log_norm`` is a log-probability comparable across windows."""

    def __len__(self) -> int:
        return len(self.window)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.window, self.start, self.end, self.score, self.null, self.log_norm))

    @classmethod
    def concat(cls, parts: list[Candidates]) -> Candidates:
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            return cls.empty()
        fields = ("window", "start", "end", "score", "null", "log_norm")
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})

    @classmethod
    def empty(cls, n: int = 1) -> Candidates:
        return cls(
            window=np.zeros(0, np.int64),
            start=np.zeros((0, n), np.int16),
            end=np.zeros((0, n), np.int16),
            score=np.zeros((0, n), np.float32),
            null=np.zeros(0, np.float32),
            log_norm=np.zeros(0, np.float32),
        )


@torch.no_grad()
def candidates_from_logits(
    window: np.ndarray,
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    cls_index: torch.Tensor,
    *,
    n_best: int,
    max_answer_length: int,
) -> Candidates:
    """Candidates of one batch, computed on the logits' device (on the CPU by a compiled kernel);
    only the result moves to the CPU.

    ``window``: the batch's global window indices; logits and masks ``[B, L]``; ``cls_index`` ``[B]``.
    """
    if start_logits.shape[1] >= 2**15:
        raise ValueError("windows longer than 32767 tokens do not fit the int16 candidate positions")
    if start_logits.device.type == "cpu":
        start, end, score, null, log_norm = window_candidates_cpu(
            start_logits.float().numpy(),
            end_logits.float().numpy(),
            context_mask.numpy(),
            attention_mask.bool().numpy(),
            cls_index.numpy(),
            n_best,
            max_answer_length,
        )
        return Candidates(np.asarray(window, dtype=np.int64), start, end, score, null, log_norm)
    return _candidates_torch(
        window, start_logits, end_logits, context_mask, attention_mask, cls_index, n_best, max_answer_length
    )


def _candidates_torch(
    window: np.ndarray,
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    cls_index: torch.Tensor,
    n_best: int,
    max_answer_length: int,
) -> Candidates:
    """``candidates_from_logits`` in tensor operations, for logits on an accelerator."""
    start_logits, end_logits = start_logits.float(), end_logits.float()
    rows = torch.arange(len(cls_index), device=start_logits.device)
    null = start_logits[rows, cls_index] + end_logits[rows, cls_index]
    # Spans end at the last context token: the positions after it (question or padding) need no search.
    in_context = context_mask.any(dim=0).nonzero()
    width = int(in_context[-1]) + 1 if len(in_context) else 1
    starts, ends, scores = top_spans(
        start_logits[:, :width], end_logits[:, :width], context_mask[:, :width], n_best, max_answer_length
    )
    # Padding after the batch's last real token needs no normalising either.
    real = attention_mask.bool()
    in_window = real.any(dim=0).nonzero()
    width = int(in_window[-1]) + 1 if len(in_window) else 1
    start_logits, end_logits, real = start_logits[:, :width], end_logits[:, :width], real[:, :width]
    if not bool(real.all()):
        start_logits = start_logits.masked_fill(~real, float("-inf"))
        end_logits = end_logits.masked_fill(~real, float("-inf"))
    log_norm = torch.logsumexp(start_logits, dim=1) + torch.logsumexp(end_logits, dim=1)
    return Candidates(
        window=np.asarray(window, dtype=np.int64),
        start=starts.to(torch.int16).cpu().numpy(),
        end=ends.to(torch.int16).cpu().numpy(),
        score=scores.cpu().numpy().astype(np.float32),
        null=null.cpu().numpy().astype(np.float32),
        log_norm=log_norm.cpu().numpy().astype(np.float32),
    )
