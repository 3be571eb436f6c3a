"""The one place that talks to torch.distributed; everything else receives a DistContext."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


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

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Every rank calls this; all return rank ``src``'s object."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

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
    return DistContext(
        rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world
    )
