"""The model's start/end logits as qa-dist's evaluation wants them, and the mixed-precision dtypes.

Shared by training (``qa_dist.train``) and evaluation (``qa_dist.eval``), which must not import
each other's internals."""

from __future__ import annotations

import torch

MIXED_PRECISION_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.mixed_precision`` to the autocast dtype (``"no"`` is absent: full precision)."""


def stack_logits(outputs) -> torch.Tensor:
    """``[2, windows, length]`` float32 logits (start, end) of a question-answering model's output."""
    return torch.stack([outputs.start_logits, outputs.end_logits]).float()
