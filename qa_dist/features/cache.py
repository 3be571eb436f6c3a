"""Content-addressed feature cache, built once per cache location and memory-mapped by every rank.

What an entry is on disk, and how one is published: ``entries``. On load the builder verifies
every checksum; a partial or corrupted entry is moved aside and rebuilt with a warning.

Who builds: with a cache directory shared by all nodes, global rank 0, and local rank 0 of every
other node helps it with the shards (``shards``), so the build time falls with the number of nodes;
with a node-local one, local rank 0 of each node (``data.cache_shared``: ``shared``, ``local`` or
``auto``, which probes the directory). Each builder runs a pool of ``data.preprocess_workers``
processes (``parallel``). The others wait on a signal file rather than inside a collective, so a long build
cannot trip a collective timeout; the builder's error, if any, is raised on every rank.

A read-only cache directory serves its whole entries (a cache prepared once and mounted read-only
on the compute nodes): nothing is written to read one. A missing or damaged entry there is an
error, as is a full disk during a build; both name the directory and leave nothing under the key.
Ranks whose cache directory is read-only cannot leave signal files, so they exchange the builder's
outcome in a collective instead (no build can happen there, only the verification of checksums).

Builders of one key are serialised across jobs by ``flock`` on ``.locks/<key>``, waiting at most
``wait_timeout`` seconds. On a filesystem whose ``flock`` does not work (some NFS setups) the build
goes ahead without the lock, with a warning, and builders of one key may overlap. That costs at most
duplicate work, never a wrong entry nor a failed build: each builder writes its own temporary folder
and removes only those proved abandoned (``builders``); publishing is an atomic rename whose loser
keeps the winner's entry once its checksums hold; a damaged entry another builder has already moved
aside or replaced is left to it.

A signal file that is not a builder's outcome is a one-line ``CacheError`` naming it: signals are renamed
into place whole (``atomic_write``), so a damaged one is not a torn read worth waiting out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from qa_dist.errors import DataError, QaDistError
from qa_dist.features.builders import open_lock, remove_stale
from qa_dist.features.entries import (  # noqa: F401  (the cache's API: callers import them from here)
    _MAX_JSON_BYTES,
    CACHE_FORMAT,
    MANIFEST,
    Built,
    CacheEntry,
    ShardedBuild,
    _reason,
    check_entry,
    publish_shards,
    publish_tables,
    read_manifest,
)
from qa_dist.features.shards import NO_FLOCK, ShardArea
from qa_dist.runtime.dist import DistContext
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.jsonfile import read_json

log = logging.getLogger(__name__)

_SIGNALS = ".signals"


class CacheError(QaDistError):
    """The cache directory is unusable, or waiting for another process's build timed out."""


def default_cache_dir(configured: str) -> Path:
    if "QA_DIST_CACHE" in os.environ and configured == "~/.cache/qa-dist/features":
        return Path(os.environ["QA_DIST_CACHE"]).expanduser()
    return Path(configured).expanduser()


def cache_key(parts: dict) -> str:
    """Key of a cache entry: a hash of everything the features depend on (and nothing else)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class FeatureCache:
    """Open or build entries in one cache directory on behalf of one process of a job."""

    def __init__(
        self,
        cache_dir: str | Path,
        dist: DistContext | None = None,
        *,
        shared: str = "auto",
        wait_timeout: float = 7200.0,
    ) -> None:
        self.root = Path(cache_dir).expanduser()
        self.dist = dist or DistContext()
        self.shared_mode = shared
        self.wait_timeout = wait_timeout
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"{self.root}: cannot create the cache directory ({_reason(e)})") from None
        # A read-only directory still serves whole entries; building in it is the error (_ensure).
        self.writable = os.access(self.root, os.W_OK)

    # -- who builds ----------------------------------------------------------------------------

    def _roles(self, nonce: str) -> tuple[bool, bool]:
        """(whether this process builds, whether the cache location is one for all nodes)."""
        d = self.dist
        if not d.is_distributed:
            return True, True
        shared = self.shared_mode == "shared"
        if self.shared_mode == "auto":
            if d.num_nodes == 1:
                shared = True
            else:
                # Global rank 0 drops a file; whoever sees it shares its filesystem. A wrong answer
                # (a slow NFS) costs a duplicate build, never a wrong entry: publishing is atomic.
                probe = self.root / f".probe-{nonce}"
                if d.rank == 0:
                    with contextlib.suppress(OSError):  # read-only: no probe, so each node on its own
                        probe.touch()
                d.barrier()  # the probe exists before anyone looks
                shared = probe.exists()
                d.barrier()  # everyone has looked before it goes
                if d.rank == 0:
                    probe.unlink(missing_ok=True)
        return (d.rank == 0 if shared else d.local_rank == 0), shared

    # -- public --------------------------------------------------------------------------------

    def open_or_build(self, key: str, build: Callable[[], Built], *, description: str = "") -> CacheEntry:
        """Return the entry for ``key``, building it in exactly one process per cache location.

        Every rank of the job must call this with the same key, in the same order.
        """
        d = self.dist
        # Collective at the start, when every rank is here anyway: a run-wide name for the signal,
        # and a check that all ranks want the same entry (a rank waiting for a key nobody builds
        # would wait forever).
        gathered = d.all_gather((uuid.uuid4().hex, key, self.writable))
        nonce, keys = gathered[0][0], [k for _, k, _ in gathered]
        if len(set(keys)) > 1:
            raise CacheError(f"ranks computed different feature cache keys {keys}: their data or tokenizer differ")
        # Signal files need a writable directory everywhere; otherwise the outcome goes through a
        # collective, which is safe because a read-only directory only ever verifies an entry.
        by_file = all(writable for _, _, writable in gathered)
        builder, shared = self._roles(nonce)
        signal = self.root / _SIGNALS / f"{nonce}-{key}.json"
        built_here = False
        outcome, outcomes, error = None, [], None
        if builder:
            try:
                built_here = self._ensure(key, build, description)
                outcome = {"status": "ok"}
            except QaDistError as e:
                outcome, error = {"status": "error", "type": type(e).__name__, "message": str(e)}, e
            except BaseException as e:
                message = f"the process building the feature cache failed: {e!r}"
                outcome, error = {"status": "error", "type": "RuntimeError", "message": message}, e
            finally:
                if d.is_distributed and by_file:
                    self._signal(signal, outcome)
                elif d.is_distributed:
                    outcomes = d.all_gather(outcome)
        elif by_file:
            try:
                if shared and d.local_rank == 0 and not callable(build):
                    self._help(key, build)
                self._wait_for(signal, key)
            except BaseException as e:  # (any: this rank still reaches the gather below)
                error = e
        else:
            outcomes = d.all_gather(None)
        entry = self.root / key
        if error is None:
            try:
                _raise_outcome(next((o for o in outcomes if o is not None and o["status"] != "ok"), {"status": "ok"}))
                if problem := check_entry(entry, key, full=False):
                    raise CacheError(f"{entry}: cache entry is not usable after the build: {problem}")
            except QaDistError as e:
                error = e
        # Every rank learns whether any failed (a waiter's timeout or a damaged signal, one node's
        # build, an entry one NFS client does not see yet) and raises with it: none is left in a
        # collective the others never reach. Also: every rank has read the signal before it goes.
        failures = d.all_gather(_as_outcome(error)) if d.is_distributed else [_as_outcome(error)]
        if error is not None:
            raise error
        _raise_outcome(next((o for o in failures if o is not None), {"status": "ok"}))
        if builder and d.is_distributed and by_file:
            signal.unlink(missing_ok=True)
        return CacheEntry(key=key, path=entry, manifest=read_manifest(entry) or {}, built_here=built_here)

    # -- builder side --------------------------------------------------------------------------

    def _help(self, key: str, build: ShardedBuild) -> None:
        """On another node than the builder's, on the shared directory: build the shards nobody
        holds, so that the build time falls with the number of nodes. The builder publishes."""
        if check_entry(self.root / key, key, full=False) is None:
            return
        try:
            build.run(ShardArea(self.root, key), finish=False)
        except Exception as e:  # noqa: BLE001  (the builder's outcome, in the signal, is what counts)
            # The builder may have published and removed the shards meanwhile; if not, it builds
            # what this node left, or meets the same error (bad data) and signals it to every rank.
            if check_entry(self.root / key, key, full=False) is not None:
                log.warning(
                    "feature cache: this node stopped helping to build entry %s: %s", key, str(e).splitlines()[0]
                )

    def _ensure(self, key: str, build: Callable[[], Built] | ShardedBuild, description: str) -> bool:
        entry = self.root / key
        problem = check_entry(entry, key, full=True)
        if problem is None:
            return False
        if not self.writable:
            state = "missing" if problem == "missing" else f"damaged ({problem})"
            raise CacheError(
                f"{self.root}: cache directory is not writable, and cache entry {key} is {state}: "
                "it cannot be built here; run `qa-dist prepare` where the directory is writable, or "
                "set data.cache_dir to a writable directory"
            )
        with self._lock(key):
            # Another job may have published while this one waited for the lock.
            problem = check_entry(entry, key, full=True)
            if problem is None:
                return False
            if problem != "missing" and not self._move_aside(key, problem):
                return False  # another builder (no flock) replaced the damaged entry meanwhile
            remove_stale(self.root, key)  # abandoned builds' folders; never a live builder's
            try:
                if callable(build):
                    publish_tables(self.root, key, build(), description)
                else:
                    publish_shards(self.root, key, build, description)
            except OSError as e:
                raise CacheError(
                    f"{self.root}: cannot write feature cache entry {key} ({_reason(e)}); nothing was "
                    "published: free space there or set data.cache_dir elsewhere"
                ) from None
        return True

    def _move_aside(self, key: str, problem: str) -> bool:
        """Move the damaged entry out of the way (False: a whole one is there now). Without flock,
        another builder may have moved it already, or published a whole entry in its place: what
        was moved is checked again, and goes back if it is whole (a damaged entry never is)."""
        entry, aside = self.root / key, self.root / f".corrupt-{key}-{uuid.uuid4().hex[:8]}"
        try:
            entry.rename(aside)
        except FileNotFoundError:  # another builder moved it aside
            return check_entry(entry, key, full=True) is not None
        except OSError as e:
            raise CacheError(f"{self.root}: cannot move damaged cache entry {key} aside ({_reason(e)})") from None
        if check_entry(aside, key, full=True) is None:  # another builder's, published meanwhile
            with contextlib.suppress(OSError):  # (fails where yet another whole entry is in place)
                aside.rename(entry)
        else:
            log.warning("feature cache entry %s is damaged (%s): moved aside to %s and rebuilt", entry, problem, aside)
        shutil.rmtree(aside, ignore_errors=True)
        with contextlib.suppress(OSError):
            aside.unlink()  # (a damaged "entry" that was a file, not a folder)
        return check_entry(entry, key, full=True) is not None

    @contextlib.contextmanager
    def _lock(self, key: str):
        """Hold ``.locks/<key>``, waiting at most ``wait_timeout`` seconds for another builder."""
        lock_path = self.root / ".locks" / key
        try:
            lock_path.parent.mkdir(exist_ok=True)
            f = open_lock(lock_path)
        except OSError as e:
            hint = (
                "; every user of a shared cache directory needs write access to it and its .locks folder"
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                else ""
            )
            raise CacheError(
                f"{lock_path}: cannot create the lock file of the feature cache ({_reason(e)}){hint}"
            ) from None
        with f:
            locked = self._acquire(f, key, lock_path)
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _acquire(self, f, key: str, lock_path: Path) -> bool:
        """Take the lock (False: this filesystem has no working flock; go on without it)."""
        deadline = time.monotonic() + self.wait_timeout
        delay = 0.05
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in NO_FLOCK:
                    raise CacheError(f"{lock_path}: cannot lock ({_reason(e)})") from None
                log.warning(
                    "%s: flock does not work on this filesystem (%s): building without the lock; "
                    "another job building the same entry at the same time only duplicates work",
                    lock_path,
                    _reason(e),
                )
                return False
            if time.monotonic() > deadline:
                raise CacheError(self._timeout_message(key))
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _timeout_message(self, key: str) -> str:
        return (
            f"{self.root}: waited {self.wait_timeout:.0f} s for another process to build "
            f"cache entry {key}. If data.cache_dir is not one filesystem for all nodes, set "
            "data.cache_shared=local; otherwise raise data.cache_wait_timeout or run "
            "`qa-dist prepare` before the job"
        )

    def _signal(self, signal: Path, outcome: dict) -> None:
        try:
            atomic_write(signal, json.dumps(outcome))
        except OSError as e:  # (a full disk) the other ranks will time out waiting
            message = (
                f"{self.root}: cannot write the signal that tells the other ranks the build is done ({_reason(e)})"
            )
            if outcome is not None and outcome["status"] == "ok":
                raise CacheError(message) from None
            log.error(message)  # the builder's own error, being raised, says more

    # -- waiting side --------------------------------------------------------------------------

    def _wait_for(self, signal: Path, key: str) -> None:
        deadline = time.monotonic() + self.wait_timeout
        delay = 0.05
        while not signal.exists():
            if time.monotonic() > deadline:
                raise CacheError(self._timeout_message(key))
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        _raise_outcome(read_outcome(signal))


def read_outcome(signal: Path) -> dict:
    """The builder's outcome in ``signal``; a one-line CacheError naming it when it holds anything else."""
    try:
        outcome = read_json(signal, limit=_MAX_JSON_BYTES)
    except (OSError, ValueError) as e:
        reason = _reason(e) if isinstance(e, OSError) else str(e)
        raise CacheError(f"{signal}: damaged signal file of the feature cache build ({reason})") from None
    if isinstance(outcome, dict) and (
        outcome.get("status") == "ok"
        or (
            outcome.get("status") == "error"
            and isinstance(outcome.get("type"), str)
            and isinstance(outcome.get("message"), str)
        )
    ):
        return outcome
    raise CacheError(f"{signal}: damaged signal file of the feature cache build (not a build's outcome)")


def _as_outcome(error: BaseException | None) -> dict | None:
    if error is None:
        return None
    kind = type(error).__name__ if isinstance(error, QaDistError) else "RuntimeError"
    return {"status": "error", "type": kind, "message": f"another rank: {error}"}


def _raise_outcome(outcome: dict) -> None:
    """Raise the builder's error on a waiting rank (nothing when it succeeded)."""
    if outcome["status"] != "ok":
        error = DataError if outcome["type"] == "DataError" else CacheError
        raise error(outcome["message"])
