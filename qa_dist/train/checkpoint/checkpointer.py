"""The checkpointer: saves every ``checkpoint_every`` steps, prunes to ``keep_checkpoints``, and
restores the newest intact checkpoint (or a named one) on resume."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed

from qa_dist.errors import ConfigError
from qa_dist.runtime.dist import max_over_ranks
from qa_dist.runtime.faults import kill_point
from qa_dist.runtime.fsutil import atomic_write, remove_path, replace_dir
from qa_dist.runtime.jsonfile import Damaged
from qa_dist.train.checkpoint.manifest import (
    COMPLETE,
    aside_path,
    checkpoint_path,
    complete_checkpoints,
    foreign_folders,
    partial_path,
    recover_checkpoints,
    step_of,
    verify,
    write_manifest,
)
from qa_dist.train.checkpoint.safe_load import safe_torch_load
from qa_dist.train.checkpoint.state import (
    SCHEDULER,
    STATE,
    TrainState,
    read_scheduler_state,
    read_state,
    rng_file,
    rng_state_json,
    scheduler_state_json,
    set_rng_state,
)

log = logging.getLogger(__name__)


def _missing_on_main(path: Path, acc) -> str | None:
    if not acc.is_main_process:
        return None
    return next((rng_file(r) for r in range(acc.num_processes) if not (path / rng_file(r)).exists()), None)


def broadcast_from_main(values: list, acc) -> None:
    """Rank zero's ``values`` (strings, None) to every rank, in place. Every rank calls this."""
    if acc.num_processes > 1:
        torch.distributed.broadcast_object_list(values, src=0)


def _reason(error: Exception) -> str:
    """One line: for a file torch's weights-only unpickler refused, the global it refused."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f"it would call {refused.group(1)}" if refused else "not plain tensors and data"
        return f"refused to unpickle a file ({what}): only trusted checkpoints can be resumed"
    lines = text.strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# --- the checkpointer --------------------------------------------------------------------------


class Checkpointer:
    """Saves ``accelerator.save_state`` checkpoints plus the trainer, scheduler and RNG state as
    JSON; verifies them on resume; owns the policy."""

    def __init__(self, accelerator, run_dir: Path, every: int, keep: int, scheduler=None) -> None:
        self.accelerator = accelerator
        self.root = Path(run_dir) / "checkpoints"
        self.every = every
        self.keep = keep
        self.scheduler = scheduler
        self.last_saved: int | None = None
        """Step of the checkpoint this run last wrote or resumed from."""
        self._warned_foreign = False

    def maybe_save(self, state: TrainState) -> Path | None:
        if self.every and state.step % self.every == 0 and self.last_saved != state.step:
            return self.save(state)
        return None

    def ensure_saved(self, state: TrainState) -> None:
        """Save unless the newest checkpoint already is this step (the end of training)."""
        if self.last_saved != state.step:
            self.save(state)

    def save(self, state: TrainState) -> Path:
        """Every rank calls this. The checkpoint is written under a hidden name and renamed into
        place once complete: a re-save of a step (the best keeper's, after an evaluation of a
        checkpointed step) never removes the intact checkpoint before its replacement is whole."""
        acc = self.accelerator
        path = checkpoint_path(self.root, state.step)

        def make_partial() -> str:
            recover_checkpoints(self.root)
            made = partial_path(path, uuid.uuid4().hex[:12])
            remove_path(made)  # (whatever else was put there)
            made.mkdir(parents=True)
            return str(made)

        partial = Path(self._on_main_then_agree(make_partial, f"checkpoint {path}"))
        kill_point("checkpoint:before-weights")
        acc.save_state(str(partial))
        rank = acc.process_index
        (partial / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # pickled; ours is JSON
        kill_point("checkpoint:between-files")
        atomic_write(partial / rng_file(rank), rng_state_json())
        # All ranks have returned from writing their shards before the marker exists.
        acc.wait_for_everyone()
        # Rank zero hashes every rank's files: it must see them. Every rank learns whether it does,
        # so that none is left waiting at the barrier below while rank zero raises.
        missing = [_missing_on_main(partial, acc)]
        broadcast_from_main(missing, acc)
        if missing[0]:
            raise ConfigError(
                f"checkpoint {path}: rank zero does not see {missing[0]}, which another rank wrote; "
                "run_dir must be on a filesystem shared by every node"
            )

        def complete() -> None:
            atomic_write(partial / STATE, json.dumps(asdict(state)))
            if self.scheduler is not None:
                atomic_write(partial / SCHEDULER, scheduler_state_json(self.scheduler))
            kill_point("checkpoint:before-complete")
            write_manifest(partial, state.step)
            kill_point("checkpoint:before-rename")
            replace_dir(partial, path, aside=aside_path(path), kill_at="checkpoint:between-renames")
            self._prune(path, keep_step=state.best_step)

        self._on_main_then_agree(complete, f"checkpoint {path}")
        self.last_saved = state.step
        return path

    def _on_main_then_agree(self, work, what: str):
        """``work()`` on rank zero, its result (a string or None) to every rank; every rank also
        learns whether it failed (a full disk, a folder it may not write) and raises alike, so that
        none waits in a collective that rank zero never reaches. Every rank calls this; no rank
        goes past it before rank zero's ``work`` is done."""
        acc = self.accelerator
        outcome = [None, None]  # [result, error]
        if acc.is_main_process:
            try:
                outcome[0] = work()
            except OSError as e:
                outcome[1] = f"{what}: {e.strerror or type(e).__name__}" + (f" ({e.filename})" if e.filename else "")
        broadcast_from_main(outcome, acc)
        if outcome[1]:
            raise ConfigError(outcome[1])
        return outcome[0]

    def _warn_foreign(self) -> None:
        """Once a run: the ``step-*`` folders that are not checkpoints, which it leaves alone."""
        if self._warned_foreign or not (foreign := foreign_folders(self.root.parent)):
            return
        self._warned_foreign = True
        log.warning(
            "%s: %s: not checkpoints (only step-<digits> folders are); skipped, never deleted",
            self.root,
            ", ".join(p.name for p in foreign),
        )

    def _prune(self, newest: Path, keep_step: int | None = None) -> None:
        """Keep ``newest`` (just written and checksummed) and the ``keep - 1`` newest complete
        checkpoints before it. Checkpoints after it (found damaged at resume, left for a look)
        are not counted: they must never push out the only intact one. The checkpoint of
        ``keep_step`` (the best so far, ``train.keep_best``) is kept besides, and not counted.
        Only folders named ``step-<digits>`` are checkpoints; nothing else is touched."""
        self._warn_foreign()
        step = step_of(newest)
        older = [p for p in complete_checkpoints(self.root.parent) if step_of(p) < step and step_of(p) != keep_step]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob("step-*"):
            # a save of an older qa-dist killed before its marker (saves now write under a hidden name)
            older_step = step_of(leftover) is not None and step_of(leftover) < step
            if older_step and leftover.is_dir() and not (leftover / COMPLETE).exists():
                shutil.rmtree(leftover, ignore_errors=True)
        for partial in self.root.glob(".step-*.partial-*"):
            shutil.rmtree(partial, ignore_errors=True)  # killed saves' leftovers: this run holds the lock

    def _problem(self, path: Path) -> str | None:
        """``verify``, and whether the scheduler state fits this run's scheduler."""
        problem = verify(path)
        if problem is None and self.scheduler is not None and (path / SCHEDULER).exists():
            try:
                read_scheduler_state(self.scheduler, path / SCHEDULER)
            except (OSError, Damaged) as e:
                problem = f"unreadable trainer or scheduler state ({e})"
        return problem

    def _choose(self, resume: str) -> tuple[Path | None, str | None]:
        """(checkpoint to load, or None; an error for every rank to raise, or None). Rank zero only."""
        if resume == "auto":
            recover_checkpoints(self.root)
            self._warn_foreign()
            found = complete_checkpoints(self.root.parent)
            problems = []
            for path in reversed(found):
                problem = self._problem(path)
                if problem is None:
                    return path, None
                log.warning("checkpoint %s is not intact: %s; trying an older one", path, problem)
                problems.append(f"{path.name}: {problem}")
            if problems:
                return None, (
                    f"resume=auto: no intact checkpoint in {self.root} ({'; '.join(problems)}); "
                    "use resume=never to start afresh"
                )
            if leftovers := sorted(p.name for p in self.root.glob("*step-*") if p not in found):
                log.warning(
                    "resume=auto: starting from step 0: no complete checkpoint in %s, which holds %s",
                    self.root,
                    ", ".join(leftovers),
                )
            return None, None
        path = Path(resume)
        if not (path / COMPLETE).exists():
            return None, f"resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
        problem = self._problem(path)
        if problem is not None:
            return None, f"resume: checkpoint {path} is not intact: {problem}"
        return path, None

    def restore(self, resume: str) -> TrainState | None:
        """Load the checkpoint that ``resume`` names (``auto``: newest intact one; ``never``). Every
        rank calls this; rank zero verifies and every rank follows its choice."""
        acc = self.accelerator
        if resume == "never":
            if acc.is_main_process and complete_checkpoints(self.root.parent):
                log.warning(
                    "%s holds checkpoints; starting afresh (resume=never). Use resume=auto to continue.",
                    self.root,
                )
            return None
        choice = [None, None]
        if acc.is_main_process:
            try:
                path, error = self._choose(resume)
            except OSError as e:  # (permissions) every rank raises it, none waits for rank zero
                path, error = None, f"resume: {self.root}: {e.strerror or type(e).__name__} ({e.filename})"
            choice = [None if path is None else str(path), error]
        broadcast_from_main(choice, acc)  # rank zero's strings: every rank decides alike
        path, error = choice
        if error is not None:
            raise ConfigError(error)
        if path is None:
            return None
        path = Path(path)
        error = None
        try:
            with safe_torch_load():
                acc.load_state(str(path), load_kwargs={"weights_only": True})
            if self.scheduler is not None:
                self.scheduler.load_state_dict(read_scheduler_state(self.scheduler, path / SCHEDULER))
            rng = path / rng_file(acc.process_index)
            if rng.exists():
                set_rng_state(rng.read_text())
            else:
                log.warning("%s has no %s (another world size?): the resume is not bit-exact", path, rng.name)
        except Exception as e:  # a file torch refuses to unpickle, or one that does not fit the model
            error = f"resume: cannot load checkpoint {path}: {_reason(e)}"
        # Ranks load different shards (DeepSpeed): all learn whether any failed, and stop together
        # rather than leave the others waiting in the first collective of training.
        if max_over_ranks(int(error is not None), acc.device):
            raise ConfigError(error or f"resume: another rank could not load checkpoint {path} (see its error)")
        state = read_state(path)
        self.last_saved = state.step
        log.warning("resumed from %s (step %d)", path, state.step)
        return state
