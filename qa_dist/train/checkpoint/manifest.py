"""The ``COMPLETE`` marker: written last, by rank zero, once every rank has written its part,
with the size and sha256 of every file; ``verify`` checks a checkpoint against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qa_dist.runtime.fsutil import atomic_write
from qa_dist.train.checkpoint.state import SCHEDULER, STATE, read_state

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = "qa-dist-checkpoint/1"

_REFUSED_PICKLES = ("custom_checkpoint_*.pkl", "random_states_*.pkl", "scheduler*.bin", "sampler*.bin")
"""Pickled files Accelerate would load that qa-dist never writes: a checkpoint holding one is refused."""


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose marker says every rank finished writing, oldest first (not yet verified)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists() and (p / STATE).exists()]
    return sorted(found, key=step_of)


# --- checksums ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(checkpoint: Path) -> list[str]:
    return sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())


def write_manifest(checkpoint: Path, step: int) -> None:
    """The ``COMPLETE`` marker: size and sha256 of every other file of the checkpoint."""
    files = {
        name: {"size": (checkpoint / name).stat().st_size, "sha256": _sha256(checkpoint / name)}
        for name in _files(checkpoint)
        if name != COMPLETE
    }
    atomic_write(checkpoint / COMPLETE, json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}))


def _well_formed(name, entry) -> bool:
    """A relative path inside the checkpoint with a size and a digest."""
    if not isinstance(name, str) or not name:
        return False
    parts = Path(name).parts
    return (
        not Path(name).is_absolute()
        and ".." not in parts
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    )


def verify(checkpoint: Path) -> str | None:
    """What is wrong with ``checkpoint`` (None: intact). Reads every file."""
    checkpoint = Path(checkpoint)
    try:
        manifest = json.loads((checkpoint / COMPLETE).read_text())
    except FileNotFoundError:
        return f"no {COMPLETE} marker (an incomplete save)"
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{COMPLETE} holds no checksums (written by an older qa-dist, or damaged): unverifiable"
    expected = manifest.get("files")
    if not isinstance(expected, dict) or not all(_well_formed(name, entry) for name, entry in expected.items()):
        return f"{COMPLETE} is malformed"
    for name, entry in sorted(expected.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were written (truncated or overwritten)"
        if _sha256(path) != entry["sha256"]:
            return f"{name} fails its sha256 checksum (damaged)"
    extra = [name for name in _files(checkpoint) if name != COMPLETE and name not in expected]
    if extra:
        return f"{extra[0]} was not written with the checkpoint"
    refused = sorted(name for pattern in _REFUSED_PICKLES for name in (p.name for p in checkpoint.glob(pattern)))
    if refused:
        return f"{refused[0]} is a pickle qa-dist does not write (it is never loaded)"
    try:
        read_state(checkpoint)
        if (checkpoint / SCHEDULER).exists():
            json.loads((checkpoint / SCHEDULER).read_text())
    except (OSError, ValueError, TypeError) as e:
        return f"unreadable trainer or scheduler state ({e})"
    return None
