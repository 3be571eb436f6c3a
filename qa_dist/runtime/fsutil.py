"""Writing files so that a reader never sees half of one: every file the project writes goes through here."""

from __future__ import annotations

import contextlib
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


def remove_path(path: str | Path) -> None:
    """Remove whatever is at ``path``: a link itself (never what it points to), a file, a folder."""
    import shutil

    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def replace_dir(
    partial: str | Path, final: str | Path, *, aside: str | Path | None = None, kill_at: str | None = None
) -> None:
    """Put the complete directory ``partial`` where ``final`` is: the old one is renamed aside
    (to ``aside``, default ``<final>.old``) first and removed after, so ``final`` is only ever a
    complete directory (or, for the moment between two renames, absent), never a half-written one.
    ``kill_at``: the fault tests' name for the moment between the renames."""
    from qa_dist.runtime.faults import kill_point

    partial, final = Path(partial), Path(final)
    old = Path(aside) if aside is not None else final.with_name(final.name + ".old")
    recover_dir(final, aside=old)
    remove_path(old)
    if final.exists() or final.is_symlink():
        final.rename(old)
    if kill_at:
        kill_point(kill_at)
    partial.rename(final)
    with contextlib.suppress(OSError):  # the new directory is in place; a leftover is only space
        remove_path(old)


def recover_dir(final: str | Path, *, aside: str | Path | None = None) -> None:
    """Undo a ``replace_dir`` killed between its two renames: the previous complete directory, set
    aside (``aside``, default ``<final>.old``), goes back in place, so it is not lost before its
    replacement is ready."""
    final = Path(final)
    old = Path(aside) if aside is not None else final.with_name(final.name + ".old")
    if not final.exists() and not final.is_symlink() and old.is_dir() and not old.is_symlink():
        old.rename(final)
