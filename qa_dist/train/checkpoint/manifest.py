"""The ``COMPLETE`` marker: written last, by rank zero, once every rank has written its part,
with the size and sha256 of every file; ``verify`` checks a checkpoint against it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from pathlib import Path

from qa_dist.runtime.fsutil import atomic_write, recover_dir, remove_path
from qa_dist.runtime.jsonfile import Damaged, read_json
from qa_dist.train.checkpoint.state import SCHEDULER, STATE, read_state

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = "qa-dist-checkpoint/1"

_REFUSED_PICKLES = ("custom_checkpoint_*.pkl", "random_states_*.pkl", "scheduler*.bin", "sampler*.bin")
"""Pickled files Accelerate would load that qa-dist never writes: a checkpoint holding one is refused."""


CHECKPOINT_NAME = re.compile(r"step-([0-9]+)")
"""The only folder names that are checkpoints. Anything else under ``checkpoints/`` (a user's
``step-00000002.bak``, a script's ``step-latest``) is not qa-dist's: never read, never deleted."""


def step_of(checkpoint: Path) -> int | None:
    """The step a checkpoint folder's name gives, or None where the name is not a checkpoint's."""
    match = CHECKPOINT_NAME.fullmatch(Path(checkpoint).name)
    return int(match.group(1)) if match else None


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def partial_path(checkpoint: Path, nonce: str) -> Path:
    """Where a save writes before the checkpoint is complete: hidden, so that no listing of
    ``step-*`` ever sees a half-written checkpoint under its step's name, and new for each save
    (``nonce``, rank zero's, broadcast), so that a node whose shared-filesystem client still caches
    the name of the previous save of this step (renamed into place seconds ago) cannot write into it."""
    return checkpoint.with_name(f".{checkpoint.name}.partial-{nonce}")


def aside_path(checkpoint: Path) -> Path:
    """Where a re-save of the same step sets the intact checkpoint while the new one takes its name."""
    return checkpoint.with_name(f".{checkpoint.name}.old")


def recover_checkpoints(root: Path) -> None:
    """Undo a re-save killed between its two renames (``replace_dir``): the intact checkpoint
    set aside goes back under its name; one superseded by its complete replacement goes. Whatever
    else holds the name (not an intact checkpoint) is moved aside for a look, never deleted in
    place of the intact one."""
    for aside in Path(root).glob(".step-*.old"):
        final = aside.with_name(aside.name[1 : -len(".old")])
        if step_of(final) is None or aside.is_symlink() or not aside.is_dir():
            continue
        try:
            if final.is_dir() and not final.is_symlink() and verify(final) is None:
                remove_path(aside)
                continue
            if final.exists() or final.is_symlink():
                damaged = final.with_name(f".{final.name}.damaged-{uuid.uuid4().hex[:8]}")
                log.warning(
                    "%s is not an intact checkpoint: moved to %s; %s goes back", final, damaged.name, aside.name
                )
                final.rename(damaged)
            recover_dir(final, aside=aside)
        except OSError as e:  # (permissions) the checkpoint set aside stays where it is, for a look
            log.warning("cannot put %s back in place of %s: %s", aside, final.name, e.strerror or e)


def foreign_folders(run_dir: Path) -> list[Path]:
    """``checkpoints/step-*`` entries whose name is not a checkpoint's: left alone, and named."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if step_of(p) is None)


def _complete(checkpoint: Path) -> bool:
    try:
        return checkpoint.is_dir() and (checkpoint / COMPLETE).is_file() and (checkpoint / STATE).is_file()
    except OSError:  # (a folder this user may not read) not one to resume from
        return False


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose marker says every rank finished writing, oldest first (not yet verified)."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if step_of(p) is not None and _complete(p)), key=step_of)


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
    if not isinstance(name, str) or not name or "\x00" in name:
        return False
    parts = Path(name).parts
    return (
        not Path(name).is_absolute()
        and ".." not in parts
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and not isinstance(entry.get("size"), bool)
        and isinstance(entry.get("sha256"), str)
    )


def verify(checkpoint: Path) -> str | None:
    """What is wrong with ``checkpoint`` (None: intact). Reads every file."""
    try:
        return _verify(Path(checkpoint))
    except OSError as e:  # a file or folder this user may not read, a name too long for the filesystem
        return f"unreadable: {e.strerror or type(e).__name__}" + (f" ({Path(e.filename).name})" if e.filename else "")


def _verify(checkpoint: Path) -> str | None:
    try:
        manifest = read_json(checkpoint / COMPLETE)
    except FileNotFoundError:
        return f"no {COMPLETE} marker (an incomplete save)"
    except Damaged as e:
        return f"{COMPLETE} holds no checksums (written by an older qa-dist, or damaged: {e}): unverifiable"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{COMPLETE} holds no checksums (written by an older qa-dist, or damaged): unverifiable"
    expected = manifest.get("files")
    if not isinstance(expected, dict) or not all(_well_formed(name, entry) for name, entry in expected.items()):
        return f"{COMPLETE} is malformed"
    for name, entry in sorted(expected.items()):
        path = checkpoint / name
        if path.is_symlink():
            return f"{name} is a symbolic link (a checkpoint holds none)"
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
        state = read_state(checkpoint)
        if (checkpoint / SCHEDULER).exists() and not isinstance(read_json(checkpoint / SCHEDULER), dict):
            raise Damaged(f"{SCHEDULER} is not an object")
    except (OSError, Damaged) as e:
        return f"unreadable trainer or scheduler state ({e})"
    if manifest.get("step") != state.step or step_of(checkpoint) not in (None, state.step):
        return f"{COMPLETE}, {STATE} and the folder's name disagree on the step"
    return None
