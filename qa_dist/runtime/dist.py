"""The one place that talks to torch.distributed; everything else receives a DistContext.

torch and accelerate are imported inside the functions that use them: the data side (the cache,
``qa-dist launch`` planning on a login node) holds a DistContext without paying for torch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from qa_dist.errors import QaDistError
from qa_dist.runtime.threads import plan_threads

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # config sits beside dist, below everything; dist only reads the section
    from qa_dist.config import TrainConfig


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job, and the few collectives the library needs."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order. Every rank calls this."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: Any) -> list | None:
        """Every rank's ``obj``, in rank order, on rank zero only (None elsewhere). Every rank calls
        this. Plain torch.distributed, not Accelerate's gather, which fails under DeepSpeed on gloo
        (``ProcessGroupGloo::allgather: invalid output tensor list``)."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        """Every rank calls this."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return default


def current_context(init: bool = False) -> DistContext:
    """The DistContext of this process.

    Uses the initialised default process group when there is one. With ``init`` and a launcher's
    environment (``WORLD_SIZE`` > 1, as torchrun and ``accelerate launch`` set it), it initialises
    the group itself: gloo on CPU, NCCL when there are GPUs.
    """
    import torch
    import torch.distributed as dist

    if init:
        plan_threads()  # evaluate and prepare under a launcher: the node's processes share its cores
    world = _env_int("WORLD_SIZE", default=1)
    if init and world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world)


def make_accelerator(
    *,
    gradient_accumulation_steps: int,
    mixed_precision: str,
    timeout_seconds: float,
    log_with=None,
    project_dir: str | None = None,
    compile: bool = False,
):
    """An Accelerator that really spans every process the launcher started.

    On a machine without GPUs a plain ``Accelerator()`` under torchrun reports one process on every
    rank and each trains alone, silently; ``cpu=True`` gives gloo multi-process. Under DeepSpeed on
    CPU, Accelerate's own state is wrong unless the process group is made with gloo explicitly.
    Both were seen on a CPU-only machine (docs/training.md, "On CPU"); the world size is checked here.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    plan_threads()  # before the first evaluation starts numba's pool
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    gpu = torch.cuda.is_available()
    launched = _env_int("WORLD_SIZE", default=1)
    pg_kwargs = {"timeout": timedelta(seconds=timeout_seconds)}
    if not gpu and launched > 1:
        pg_kwargs["backend"] = "gloo"  # (in one plain process it would make Accelerate expect a group)
    accelerator = Accelerator(
        cpu=not gpu and not deepspeed and not fsdp,
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(**pg_kwargs)],
        log_with=log_with,
        project_dir=project_dir,
        # torch.compile through Accelerate: it compiles after wrapping (DDP, FSDP) or asks the
        # DeepSpeed engine to (the export drops the compile wrapper's names). "no", not None: None
        # lets an accelerate config or ACCELERATE_DYNAMO_BACKEND compile a run that said compile=false.
        dynamo_backend="inductor" if compile else "no",
    )
    import torch.distributed as dist

    actual = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if accelerator.num_processes != launched or actual != launched:
        raise QaDistError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes} "
            f"(process group: {actual}); each would train alone. Check the accelerate config."
        )
    if accelerator.is_main_process:
        for warning in launch_warnings(launched, gpu):
            log.warning(warning)
    return accelerator


def _requested_processes() -> int | None:
    """``--num_processes`` of the ``accelerate launch`` that started this process, if one did."""
    import psutil  # a dependency of accelerate

    try:
        cmd = psutil.Process().parent().cmdline()
    except (psutil.Error, AttributeError):
        return None
    if not any("accelerate" in part for part in cmd[:3]):
        return None
    for i, part in enumerate(cmd):
        value = part.split("=", 1)[1] if part.startswith("--num_processes=") else None
        if part == "--num_processes" and i + 1 < len(cmd):
            value = cmd[i + 1]
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def launch_warnings(world: int, gpu: bool) -> list[str]:
    """What a user who typed the launch line by hand should hear before a run that is not the one
    they asked for: one process where ``accelerate launch`` was asked for more (``--cpu`` alone
    starts one), and, on the CPU, more processes on this machine than cores."""
    from qa_dist.runtime.threads import available_cores

    warnings = []
    requested = _requested_processes()
    if world == 1 and requested and requested > 1:
        warnings.append(
            f"accelerate launch asked for {requested} processes, but this run has 1 (accelerate launch --cpu starts "
            "one): use qa-dist launch, or accelerate launch --config_file configs/accelerate/cpu_ddp.yaml"
        )
    local = _env_int("LOCAL_WORLD_SIZE", default=1)
    if not gpu and local > (cores := available_cores()):
        warnings.append(
            f"{local} training processes on {cores} cores: each waits for the others' cores (oversubscribed); "
            f"use at most {cores}"
        )
    return warnings


def fill_deepspeed_config(accelerator, train: TrainConfig) -> None:
    """Values Accelerate would take from a prepared dataloader (ours is not) or fill with defaults."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = train.per_device_batch_size
    ds["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    ds["train_batch_size"] = train.per_device_batch_size * train.gradient_accumulation_steps * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = train.max_grad_norm


def enable_tf32() -> None:
    """fp32 matrix multiplications and cuDNN convolutions on TF32 tensor cores (Ampere and later;
    no effect on older GPUs, on the CPU, or inside bf16/fp16 autocast)."""
    import torch

    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def to_device(batch: dict, device, pin_memory: bool = False) -> dict:
    """A batch of CPU tensors on ``device``. With ``pin_memory`` (CUDA only) each tensor is copied
    into page-locked memory first and sent without blocking, so the host does not wait for the
    copy; elsewhere a plain ``.to``."""
    if pin_memory and getattr(device, "type", str(device)).startswith("cuda"):
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _all_reduce(values: list[float], op: str, device=None) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def max_over_ranks(value: int, device=None) -> int:
    """The largest ``value`` over all ranks. Every rank calls this."""
    return int(_all_reduce([value], "MAX", device)[0])


def sum_over_ranks(values: list[float], device=None) -> list[float]:
    """Element-wise sums over all ranks, in one collective. Every rank calls this."""
    return _all_reduce(values, "SUM", device)


def context_of(accelerator) -> DistContext:
    """The DistContext of an Accelerator's processes."""
    return DistContext(
        rank=accelerator.process_index,
        local_rank=accelerator.local_process_index,
        world_size=accelerator.num_processes,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", default=accelerator.num_processes),
    )
