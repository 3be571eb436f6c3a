"""Writing feature cache entries: the temporary folder of one build, who owns it and when it is
proved abandoned; the files written into it, and the bounded reader of the JSON read back.

An entry is built in ``<cache_dir>/.tmp-<key>-<host>-<pid>-<uuid>/`` and renamed into place. Where
``flock`` works, one builder at a time writes such folders for a key; where it does not (some NFS
setups), several may at once, and none of them may delete a folder that another live builder is
writing. So each folder holds ``.owner.json`` (its builder's host, pid, the process's start time and
the machine's boot id), and the builder touches that file every ``HEARTBEAT_SECONDS`` while it
writes. Another builder removes the folder only once it is proved abandoned (``is_stale``): its
owner's process is gone from this machine (by the owner file, or for want of one the host and pid
in the folder's name), or, for another machine's folder, nothing in it has changed for
``STALE_SECONDS``. A folder whose staleness is not proved is left alone: the worst that costs is a
folder that waits for a later builder to remove it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa

from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.jsonfile import finite, read_json

log = logging.getLogger(__name__)

OWNER = ".owner.json"
HEARTBEAT_SECONDS = 30.0
"""How often a builder touches its owner file (its mtime is the heartbeat) while it writes an entry."""
STALE_SECONDS = 600.0
"""A temporary folder in which nothing (owner file, folder, files) has changed for this long, twenty
heartbeats, is an abandoned build's. Long, because a wrong verdict deletes a live build while a late
one only leaves a folder behind a while longer: it covers a loaded NFS server that delays writes and
attributes, a process paused for a while, and some clock skew between hosts. The same bound judges a
folder without a readable owner file (an older qa-dist's leftover, or a build killed between making
the folder and writing the file): its files' mtimes move while a live builder writes them."""
_MAX_OWNER_BYTES = 1 << 16
_START_TIME_SLACK = 1.0
"""Seconds by which a process's start time may differ between two reads of it (psutil derives it
from clock ticks since boot); a larger difference is another process that was given the same pid."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_regular(path: Path, size: int, chunk: int = 1 << 22) -> str | None:
    """The sha256 of ``path`` if it is a regular file (not a link, FIFO or device: a directory others
    can write may hold any of them) of exactly ``size`` bytes; None otherwise. Never blocks on a FIFO
    nor reads past ``size``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return None
        h, left = hashlib.sha256(), size
        while left and (block := f.read(min(chunk, left))):
            h.update(block)
            left -= len(block)
        return h.hexdigest() if not left else None


def write_table(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # one record batch: numpy views over a column need no copy


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _boot_id() -> str | None:
    """This boot of this machine (Linux); None where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (None: no such process, or a zombie that will never write again)."""
    import psutil  # a dependency of accelerate

    try:
        process = psutil.Process(pid)
        started = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:  # (ZombieProcess is one too)
        return None
    except psutil.Error:  # (access denied) it exists: alive, start time unknown
        return float("nan")
    return started


def owner_record() -> dict:
    """What identifies this process as the owner of a temporary folder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()), "boot": _boot_id()}


def _is_number(value) -> bool:
    return finite(value) is not None


def read_owner(folder: Path) -> dict | None:
    """The folder's owner record, or None where it has no readable, well-formed one."""
    try:
        owner = read_json(folder / OWNER, limit=_MAX_OWNER_BYTES)
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("host"), str):
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
        return None
    return owner


def _on_this_machine(owner: dict) -> bool:
    """The owner ran on this machine, in this boot of it, so its pid can be looked up here. Two boot
    ids that differ under one host name are a reboot or two machines with one name: not provable."""
    if owner["host"] != socket.gethostname():
        return False
    boot, here = owner.get("boot"), _boot_id()
    return boot is None or here is None or boot == here


def _owner_alive(owner: dict) -> bool:
    started = _start_time(owner["pid"])
    if started is None:
        return False
    recorded = owner.get("started")
    if not _is_number(recorded) or started != started:  # unknown start time: the pid alone decides
        return True
    return abs(started - recorded) <= _START_TIME_SLACK


def _newest_mtime(folder: Path) -> float | None:
    """The newest mtime of the folder and what is in it (None: the folder is gone)."""
    try:
        newest = folder.lstat().st_mtime
        with os.scandir(folder) as entries:
            for item in entries:
                with contextlib.suppress(OSError):
                    newest = max(newest, item.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return None
    return newest


def _named_owner(folder: Path) -> dict | None:
    """The host and pid in the folder's name (``.tmp-<key>-<host>-<pid>-<tag>``, also what older
    qa-dist versions wrote): all a folder tells of its owner when it was killed before its owner
    file was written."""
    _, _, rest = folder.name.removeprefix(".tmp-").partition("-")
    parts = rest.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit() or not 0 < int(parts[1]) < 1 << 31:
        return None
    return {"host": parts[0], "pid": int(parts[1])}


def is_stale(folder: Path, now: float | None = None) -> bool:
    """Whether ``folder`` is proved abandoned: its owner's process is gone from this machine, or
    (another machine's folder) nothing in it has changed for ``STALE_SECONDS``. Without a readable
    owner file, the host and pid in its name say whose it is, with no start time (a pid given to a
    later process reads as alive: never a wrong removal)."""
    owner = read_owner(folder)
    if owner is not None and _on_this_machine(owner):
        return not _owner_alive(owner)
    named = _named_owner(folder) if owner is None else None
    if named is not None and named["host"] == socket.gethostname() and not _owner_alive(named):
        return True
    newest = _newest_mtime(folder)
    now = time.time() if now is None else now
    return newest is not None and now - newest > STALE_SECONDS


def remove_stale(root: Path, key: str) -> list[Path]:
    """Remove the abandoned temporary folders of ``key``'s builds; those of live builders stay."""
    removed = []
    for folder in root.glob(f".tmp-{key}-*"):
        if folder.is_dir() and not folder.is_symlink() and is_stale(folder):
            log.info("%s: removing the temporary folder of an abandoned feature cache build", folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class BuildFolder:
    """The temporary folder one build writes its entry into, owned by this process.

    ``with BuildFolder(root, key) as folder``: makes it with its owner file and keeps the heartbeat
    while the block runs; ``folder.seal()`` before renaming it into place (the owner file does not go
    into the entry); on leaving the block, whatever is still at ``folder.path`` is removed.
    """

    def __init__(self, root: Path, key: str, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.path = root / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BuildFolder:
        self.path.mkdir()
        try:
            atomic_write(self.path / OWNER, json.dumps(owner_record()) + "\n")  # never through a link
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._thread = threading.Thread(target=self._beat, name="qa-dist-cache-build", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):
                os.utime(self.path / OWNER, follow_symlinks=False)

    def seal(self) -> None:
        """Stop the heartbeat and remove the owner file: the folder is complete, about to be renamed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        (self.path / OWNER).unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self.seal()
        shutil.rmtree(self.path, ignore_errors=True)  # (nothing there once it was renamed into place)


def open_lock(path: Path):
    """The lock file, never opened through a link (O_NOFOLLOW): one planted at its name is removed
    (no lock qa-dist makes is a link) and the file opened again; a lock another builder has just
    made is never removed."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    for _ in range(3):
        try:
            return os.fdopen(os.open(path, flags, 0o666), "a+")
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            with contextlib.suppress(FileNotFoundError):
                if path.is_symlink():
                    path.unlink()
    raise OSError(errno.ELOOP, "a link keeps being planted at the lock file", str(path))


# --- what an entry's manifest must look like ------------------------------------------------

COUNTS = ("num_examples", "num_features")
"""Counts every entry's manifest carries (from ``Built.info``), read as ints (``PreparedSplit``,
``qa-dist launch``): a manifest without them as non-negative ints is damaged."""


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_name(name: str) -> bool:
    """A file name directly inside the entry: no separator, no ``..``, nothing the OS refuses."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # (a lone surrogate, which JSON allows)
        return False
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name and len(encoded) <= 255


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def manifest_shape_problem(manifest) -> str | None:
    """What is wrong with the shape of a manifest (not its key): None if it is one the cache wrote."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not an object"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its 'files' is not a table of file names to sizes and checksums"
    for name, meta in files.items():
        if not _plain_name(name):
            return f"{_short(name)} is not a file name inside the entry"
        if not isinstance(meta, dict) or not is_count(meta.get("bytes")) or not isinstance(meta.get("sha256"), str):
            return f"files[{_short(name)}] is not a byte count and a sha256"
    tables = manifest.get("tables", {})
    if not isinstance(tables, dict) or not all(
        isinstance(names, list) and names and all(isinstance(n, str) and n in files for n in names)
        for names in tables.values()
    ):
        return "its 'tables' is not a table of names to lists of its files"
    bad = [count for count in COUNTS if not is_count(manifest.get(count))]
    return f"{', '.join(bad)} not a count" if bad else None
