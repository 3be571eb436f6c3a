"""The model's start/end logits on one batch, as evaluation code wants them."""

from __future__ import annotations

import torch

from qa_dist.models import stack_logits

LABELS = ("start_positions", "end_positions")


@torch.no_grad()
def batch_logits(accelerator, model, batch: dict) -> torch.Tensor:
    """``[2, windows, length]`` float logits on the model's device, in eval mode (restored afterwards).
    Every rank calls this: under ZeRO-3 the forward gathers parameters collectively."""
    was_training = model.training
    model.eval()
    try:
        with accelerator.autocast():
            out = model(**{k: v.to(accelerator.device) for k, v in batch.items() if k not in LABELS})
    finally:
        model.train(was_training)
    return stack_logits(out)
