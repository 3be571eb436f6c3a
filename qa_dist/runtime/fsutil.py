"""Writing files so that a reader never sees half of one: every file the project writes goes through here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file in the same directory,
    fsynced, then renamed over ``path``. Unique names matter: two processes writing the same file
    (ranks, a requeued job beside its predecessor) must not share one temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(partial: str | Path, final: str | Path) -> None:
    """Put the complete directory ``partial`` where ``final`` is: the old one is renamed aside
    first and removed after, so ``final`` is only ever a complete directory (or, for the moment
    between two renames, absent), never a half-written one."""
    import shutil

    partial, final = Path(partial), Path(final)
    old = final.with_name(final.name + ".old")
    recover_dir(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | Path) -> None:
    """Undo a ``replace_dir`` killed between its two renames: the previous complete directory, set
    aside as ``*.old``, goes back in place, so it is not lost before its replacement is ready."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.is_dir():
        old.rename(final)
