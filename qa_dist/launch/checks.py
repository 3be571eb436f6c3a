"""What ``qa-dist launch`` verifies before any work: every value it writes into a line or a script,
and the environment (cache directory, NVMe path, Hugging Face variables, tokenizer, data files)."""

from __future__ import annotations

import os
import sys
import tempfile
import typing
from pathlib import Path

from qa_dist.config import RunConfig
from qa_dist.features.cache import default_cache_dir
from qa_dist.launch.accelerate import Plan
from qa_dist.launch.quoting import check_printable, override_key
from qa_dist.models import load_tokenizer

if typing.TYPE_CHECKING:
    from qa_dist.launch.slurm import SlurmOptions


def check_launch_values(
    config_path: str,
    overrides: list[str],
    config: RunConfig,
    *,
    slurm: SlurmOptions,
) -> None:
    """Every value ``qa-dist launch`` writes into a script or a command line, checked before anything
    runs; a ConfigError names the key or flag."""
    check_printable("--config", str(config_path))
    for override in overrides:
        check_printable(f"override {override_key(override)!r}", override)
    check_printable("run_dir", str(config.run_dir))
    check_printable("run_dir (resolved)", str(Path(config.run_dir).resolve()))
    check_printable("the Python interpreter path (sys.executable)", sys.executable)
    check_printable("launch.head", config.launch.head)
    if config.launch.nvme_path is not None:
        check_printable("launch.nvme_path", config.launch.nvme_path)
    slurm.check()


def check_environment(config: RunConfig, plan: Plan, *, local: bool = True) -> list[str]:
    """Problems to fix before spending cluster time; empty when all is well. ``local``: the run
    starts on this machine (not through Slurm), so its NVMe directory must be here."""
    problems = []
    cache = Path(default_cache_dir(config.data.cache_dir))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # A fresh, uniquely named file (O_EXCL): a link planted under a guessable name is never written through.
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=cache)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        problems.append(f"data.cache_dir {cache}: not writable ({e})")
    nvme = config.launch.nvme_path
    if local and plan.strategy == "zero3_nvme" and nvme and not (Path(nvme).is_dir() and os.access(nvme, os.W_OK)):
        problems.append(f"launch.nvme_path {nvme}: not a writable directory on this machine")
    if plan.nodes > 1 and config.data.cache_shared == "local":
        problems.append("data.cache_shared=local with several nodes: every node builds its own cache")
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_CACHE"):
        value = os.environ.get(name)
        if value is not None and not Path(value).is_dir():
            problems.append(f"{name}={value}: no such directory (a misspelled path sends the job to the hub)")
    for name in os.environ:
        if name.startswith(("HF_", "HUGGINGFACE")) and name not in KNOWN_HF_VARIABLES:
            problems.append(f"environment variable {name} is not one Hugging Face reads (misspelled?)")
    try:
        load_tokenizer(config.model)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed: the launch stops on it
        problems.append(f"tokenizer of {config.model.name_or_path!r} cannot be loaded: {e}")
    for role, source in (("train", config.data.train), ("eval", config.data.eval)):
        if source and not source.startswith("sample:") and _looks_local(source) and not Path(source).exists():
            problems.append(f"data.{role}: {source} does not exist")
    return problems


KNOWN_HF_VARIABLES = {
    "HF_HOME",
    "HF_DATASETS_CACHE",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_XET_HIGH_PERFORMANCE",
    "HF_MODULES_CACHE",
    "HF_ASSETS_CACHE",
    "HF_TOKEN_PATH",
    "HF_DEBUG",
    "HF_HUB_VERBOSITY",
    "HF_DATASETS_TRUST_REMOTE_CODE",
    "HF_UPDATE_DOWNLOAD_COUNTS",
    "HF_HUB_DISABLE_SYMLINKS_WARNING",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_HUB_VERBOSITY",
    "HF_HUB_USER_AGENT_ORIGIN",
}


def _looks_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl", ".gz")) or source.startswith(("/", "./", "../"))
