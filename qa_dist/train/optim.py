"""AdamW with the usual weight-decay exemptions, and the learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from qa_dist.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights; none on biases and normalisation weights (LayerNorm, RMSNorm)."""
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = (
            isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        )
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or is_norm:
                no_decay.add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def use_fused_adamw(config: TrainConfig, device_type: str, sharded: bool) -> bool:
    """AdamW's fused kernel on CUDA and on the CPU (where the Trainer picks it too, and where it steps
    several times faster than the default foreach kernel), and not where
    DeepSpeed or FSDP own the parameters (ZeRO steps its own flat partitions, possibly offloaded;
    FSDP2's parameters are DTensors): there the default implementation is kept."""
    return config.fused_adamw and device_type in ("cuda", "cpu") and not sharded


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, *, device_type: str = "cpu", sharded: bool = False
) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. ``device_type`` is where the parameters will train (the model is
    still on the CPU when this is built; Accelerate moves the same parameters afterwards, and the
    fused kernel only checks their device at the first step); ``sharded``: DeepSpeed or FSDP."""
    fused = use_fused_adamw(config, device_type, sharded)
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, **({"fused": True} if fused else {})
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Stepped once per optimizer step by the loop: not passed to Accelerate, whose wrapper steps a
    scheduler once per process for every optimizer step."""
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.scheduler]
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
