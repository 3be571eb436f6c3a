"""Loading a checkpoint without unpickling code: every ``torch.load`` during ``load_state`` is
forced to ``weights_only=True`` with a minimal allowlist."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import pickle

import torch
import torch.distributed

# --- loading without unpickling code -----------------------------------------------------------


def _allowed_globals() -> list:
    """What DeepSpeed's ZeRO optimizer shards hold besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``): plain data classes and an enum."""
    allowed = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return allowed


_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch",
    "torch.serialization",
    "pathlib",
    "collections",
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """For the ``.metadata`` file of a torch.distributed.checkpoint directory (FSDP's sharded
    state), which torch reads with plain ``pickle.load``: only the data classes and enums of
    torch.distributed.checkpoint, torch's sizes, dtypes, layouts and memory formats, paths."""

    def find_class(self, module: str, name: str):
        if module not in _DCP_MODULES:  # refused before anything is imported
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} in a checkpoint's metadata")
        found = super().find_class(module, name)
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem") and (
            (isinstance(found, type) and dataclasses.is_dataclass(found)) or (isinstance(found, enum.EnumMeta))
        ):
            return found
        if module == "torch" and (
            found is torch.Size or isinstance(found, (torch.dtype, torch.layout, torch.memory_format))
        ):
            return found
        if (module, name) in {
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "Path"),
            ("collections", "OrderedDict"),
        }:
            return found
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} in a checkpoint's metadata")


class _RestrictedPickle:
    """Stands in for the ``pickle`` module where torch.distributed.checkpoint reads metadata."""

    dump = staticmethod(pickle.dump)
    dumps = staticmethod(pickle.dumps)
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file):
        return _DcpMetadataUnpickler(file).load()

    @staticmethod
    def loads(data: bytes):
        return _DcpMetadataUnpickler(io.BytesIO(data)).load()


@contextlib.contextmanager
def safe_torch_load():
    """Every ``torch.load`` inside is ``weights_only=True`` whatever its caller asks: DeepSpeed loads
    its shards with ``weights_only=False``. Tensors, containers, numbers and ``_allowed_globals``
    load; anything else (a ``__reduce__`` that calls a function) is refused by torch. The
    ``.metadata`` of FSDP's sharded checkpoints (plain ``pickle.load`` in torch) goes through
    ``_DcpMetadataUnpickler``."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    # Imported here: torch.distributed.checkpoint takes 1.2-1.6 s to import, and only a resume needs it.
    from torch.distributed.checkpoint import filesystem as dcp_filesystem

    torch.load = load
    dcp_filesystem.pickle = _RestrictedPickle
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        torch.load = original
        dcp_filesystem.pickle = pickle
