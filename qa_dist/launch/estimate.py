"""The memory model behind ``--strategy auto``: bytes per GPU of weights, gradients, optimizer state,
gathered units and activations for each strategy, and the cheapest strategy that fits."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from qa_dist.config import LaunchConfig
from qa_dist.errors import ConfigError
from qa_dist.models import resolve_model_path

STRATEGY_CHOICES: tuple[str, ...] = typing.get_args(typing.get_type_hints(LaunchConfig)["strategy"])
"""What ``launch.strategy`` (and ``qa-dist launch --strategy``) accepts: the config's Literal."""


STRATEGIES = tuple(s for s in STRATEGY_CHOICES if s not in ("auto", "single"))
"""The strategies with configs of their own (auto picks one of them; single is DDP on one process)."""


AUTO_ORDER = ("ddp", "zero2", "fsdp", "zero3", "zero3_offload")
"""Cheapest first, in communication and speed, among what fits:

- DDP: one all-reduce of the gradients per step, nothing gathered.
- ZeRO-2: the same volume (a reduce-scatter of the gradients and an all-gather of the updated
  16-bit weights) with the optimizer state and gradients sharded; the weights stay whole.
- FSDP (FSDP2, full sharding) before ZeRO-3: both shard everything and move 1.5x DDP's volume
  (weights all-gathered in the forward and again in the backward, gradients reduce-scattered);
  FSDP2 does it with one all-gather per wrapped layer in PyTorch's own collectives, without
  DeepSpeed's per-submodule hooks and engine, and is at least as fast. Its estimate is a little higher (it holds whole
  units unsharded, and the root unit, embeddings included, for the whole step), so ZeRO-3, which
  gathers finer pieces, still comes next for the margin where FSDP does not fit.
- ZeRO-3 with offload to host memory last: the optimizer step runs on the CPU.

zero3_nvme is never chosen automatically: its GPU memory is zero3_offload's (it only moves the
host's share to NVMe), so it fits exactly where zero3_offload does; ask for it when host memory
is what runs out."""


GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of the model."""

    parameters: int
    hidden: int
    layers: int
    heads: int
    layer_parameters: int = 0
    """Parameters of the largest unit FSDP wraps on its own (a transformer layer, or the embeddings
    where the model's ``_no_split_modules`` names them, as BERT's does); 0: 12h^2 + 13h, one layer."""
    root_parameters: int = -1
    """Parameters in no such unit (FSDP's root unit: the QA head, and the embeddings when they are
    not a unit); -1: ``parameters`` minus ``layers`` standard layers."""

    @property
    def layer_size(self) -> int:
        return self.layer_parameters or 12 * self.hidden**2 + 13 * self.hidden

    @property
    def root_size(self) -> int:
        if self.root_parameters >= 0:
            return self.root_parameters
        return max(0, self.parameters - self.layers * self.layer_size)


def model_shape(name_or_path: str) -> ModelShape:
    """Parameter count and sizes from the model's config alone (the model is built on the meta
    device: no weights are read or allocated). The units are the modules of the model's
    ``_no_split_modules`` classes, which FSDP's transformer wrap policy wraps one by one."""
    # torch and transformers only here and in gpus_available: a launch that names its strategy and
    # GPUs plans without them (seconds saved on a login node).
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot read the config of {name_or_path!r}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForQuestionAnswering.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    unit_classes = set(getattr(model, "_no_split_modules", None) or ())
    units = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in unit_classes]
    return ModelShape(
        parameters=total,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        layer_parameters=max(units, default=0),
        root_parameters=total - sum(units) if units else -1,
    )


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool = False) -> float:
    """Activations kept for the backward pass of one micro-batch in 16-bit precision (Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer Models"): per layer
    ``s*b*h*(34 + 5*a*s/h)`` bytes without recomputation. With gradient checkpointing (full
    recomputation) each layer keeps only its input, ``2*s*b*h`` bytes, and one layer at a time
    holds its full activations again while it is recomputed in the backward pass."""
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    full_layer = s * b * h * (34 + 5 * a * s / h)
    if checkpointing:
        return shape.layers * 2 * s * b * h + full_layer
    return shape.layers * full_layer


def state_bytes(strategy: str, parameters: int, gpus: int) -> tuple[float, float]:
    """(device, host) bytes per GPU of weights, gradients and AdamW state under mixed precision:
    16 bytes per parameter (2 weights + 2 gradients + 4 fp32 master + 8 Adam moments; under
    Accelerate's autocast DDP and FSDP keep fp32 weights and gradients instead: 4 + 4 + 8, the same 16).
    DDP adds 4 more: its reducer copies the fp32 gradients into flat buckets for the all-reduce
    (``gradient_as_bucket_view`` is off by default), so 20 bytes per parameter."""
    p, n = float(parameters), max(gpus, 1)
    if strategy == "ddp":
        return 20 * p, 0.0
    if strategy == "zero2":  # optimizer state and gradients sharded, 16-bit weights replicated
        return 2 * p + 14 * p / n, 0.0
    if strategy in ("zero3", "fsdp"):  # everything sharded (FSDP: fp32 weights + fp32 gradients + Adam)
        return 16 * p / n, 0.0
    if strategy in ("zero3_offload", "zero3_nvme"):
        # shards of 16-bit weights and gradients stay; the rest on the host (or, zero3_nvme, on NVMe)
        return 4 * p / n, (12 * p / n if strategy == "zero3_offload" else 0.0)
    raise ConfigError(f"unknown strategy {strategy!r}: {', '.join(STRATEGIES)}")


def gathered_bytes(strategy: str, shape: ModelShape) -> float:
    """Weights held unsharded at a time by the strategies that shard them (16-bit copies).

    ZeRO-3 (and its offload variants) gathers one submodule at a time and prefetches about the
    next one: two units' weights. FSDP2 all-gathers whole units: the one it computes and the one it
    prefetches, plus that unit's unsharded 16-bit gradient before the reduce-scatter; and its root
    unit (what no wrapped unit holds) stays unsharded for the whole step (FSDP2 does not reshard
    the root after the forward). The largest unit stands for every unit: a little high, never low."""
    if strategy == "fsdp":
        return 2 * shape.root_size + 3 * 2 * shape.layer_size
    if strategy.startswith("zero3"):
        return 2 * 2 * shape.layer_size
    return 0.0


@dataclass(frozen=True)
class Estimate:
    strategy: str
    device_gib: float
    host_gib: float
    fits: bool
    checkpointing: bool = False


def estimate(
    shape: ModelShape,
    strategy: str,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    gpu_gib: float,
    checkpointing: bool = False,
) -> Estimate:
    device, host = state_bytes(strategy, shape.parameters, gpus)
    device += gathered_bytes(strategy, shape)
    device += activation_bytes(shape, micro_batch, seq_len, checkpointing)
    device_gib = device / GIB + 1.5  # CUDA context, allocator slack, communication buffers
    return Estimate(strategy, device_gib, host / GIB, device_gib <= 0.9 * gpu_gib, checkpointing)


@dataclass(frozen=True)
class Choice:
    """What ``--strategy auto`` settled on, and every estimate it made on the way."""

    strategy: str
    checkpointing: bool
    estimates: list[Estimate]


def describe(shape: ModelShape, choice: Choice, gpus: int, micro_batch: int, seq_len: int, gpu_gib: float) -> str:
    """The estimate behind ``--strategy auto``, as printed."""
    lines = [
        f"strategy auto: {shape.parameters / 1e6:,.0f}M parameters, micro-batch {micro_batch} x {seq_len} "
        f"tokens, {gpus} GPUs of {gpu_gib:.0f} GiB (90% usable):"
    ]
    for e in choice.estimates:
        host = f", host {e.host_gib:.1f} GiB" if e.host_gib else ""
        chosen = e.strategy == choice.strategy and e.checkpointing == choice.checkpointing
        mark = "<- chosen" if chosen else ("fits" if e.fits else "does not fit")
        name = e.strategy + (" + checkpointing" if e.checkpointing else "")
        lines.append(f"  {name:30s} {e.device_gib:7.1f} GiB per GPU{host}   {mark}")
    if choice.checkpointing:
        lines.append(
            "  gradient checkpointing on (activations recomputed in the backward pass, about a third more compute): "
            "the run gets train.gradient_checkpointing=true"
        )
    return "\n".join(lines)


def choose_strategy(
    shape: ModelShape,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    gpu_gib: float,
    *,
    checkpointing: bool = False,
) -> Choice:
    """The cheapest strategy that fits, in ``AUTO_ORDER``, first without gradient checkpointing
    (unless the config already turns it on), then with it; a ConfigError proposing a smaller
    micro-batch (with the accumulation that keeps the batch) when nothing fits even then."""
    estimates: list[Estimate] = []
    for with_checkpointing in (True,) if checkpointing else (False, True):
        tried = [estimate(shape, s, gpus, micro_batch, seq_len, gpu_gib, with_checkpointing) for s in AUTO_ORDER]
        estimates += tried
        chosen = next((e for e in tried if e.fits), None)
        if chosen is not None:
            return Choice(chosen.strategy, with_checkpointing, estimates)
    smaller = next(
        (
            b
            for b in range(micro_batch - 1, 0, -1)
            if any(estimate(shape, s, gpus, b, seq_len, gpu_gib, True).fits for s in AUTO_ORDER)
        ),
        None,
    )
    proposal = (
        f"lower train.per_device_batch_size to {smaller} (with gradient checkpointing; raise "
        f"train.gradient_accumulation_steps by {-(-micro_batch // smaller)}x to keep the batch) or add GPUs"
        if smaller
        else "even one window per GPU does not fit: add GPUs, shorten data.max_length, or use strategy zero3_nvme"
    )
    raise ConfigError(
        f"no strategy fits {shape.parameters / 1e6:,.0f}M parameters in {gpu_gib:.0f} GiB per GPU at micro-batch "
        f"{micro_batch} x {seq_len} tokens, even with gradient checkpointing; {proposal}"
    )


def gpus_available() -> tuple[int, float]:
    """(visible GPUs, memory of the first in GiB); (0, 0) without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0.0
    return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GIB
