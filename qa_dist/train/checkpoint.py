"""Checkpoints that are complete only when every rank has written its part, and exact resume."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"


@dataclass
class TrainState:
    """Where training is: enough, with the Accelerate state, to continue bit for bit."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    micro_step: int = 0
    """Micro-batches of ``epoch`` already consumed."""
    wandb_run_id: str | None = None


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose marker says every rank finished writing, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists() and (p / STATE).exists()]
    return sorted(found, key=_step_of)


def read_state(checkpoint: Path) -> TrainState:
    return TrainState(**json.loads((Path(checkpoint) / STATE).read_text()))


class Checkpointer:
    """Saves ``accelerator.save_state`` checkpoints plus the trainer state; owns the policy."""

    def __init__(self, accelerator, run_dir: Path, every: int, keep: int) -> None:
        self.accelerator = accelerator
        self.root = Path(run_dir) / "checkpoints"
        self.every = every
        self.keep = keep
        self.last_saved: int | None = None
        """Step of the checkpoint this run last wrote or resumed from."""

    def maybe_save(self, state: TrainState) -> Path | None:
        if self.every and state.step % self.every == 0:
            return self.save(state)
        return None

    def ensure_saved(self, state: TrainState) -> None:
        """Save unless the newest checkpoint already is this step (the end of training)."""
        if self.last_saved != state.step:
            self.save(state)

    def save(self, state: TrainState) -> Path:
        """Every rank calls this."""
        acc = self.accelerator
        path = self.root / f"step-{state.step:08d}"
        if acc.is_main_process and path.exists():
            shutil.rmtree(path)  # an incomplete leftover of a killed save at this step
        acc.wait_for_everyone()
        acc.save_state(str(path))
        # All ranks have returned from writing their shards before the marker exists.
        acc.wait_for_everyone()
        if acc.is_main_process:
            (path / STATE).write_text(json.dumps(asdict(state)))
            (path / COMPLETE).write_text("all ranks finished writing\n")
            self._prune(path)
        acc.wait_for_everyone()
        self.last_saved = state.step
        return path

    def _prune(self, newest: Path) -> None:
        complete = complete_checkpoints(self.root.parent)
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.root.glob("step-*"):
            if not (partial / COMPLETE).exists() and _step_of(partial) < _step_of(newest):
                shutil.rmtree(partial, ignore_errors=True)

    def restore(self, resume: str) -> TrainState | None:
        """Load the checkpoint that ``resume`` names (``auto``: newest complete one; ``never``)."""
        if resume == "never":
            if complete_checkpoints(self.root.parent):
                log.warning(
                    "%s holds checkpoints; starting afresh (resume=never). Use resume=auto to continue.",
                    self.root,
                )
            return None
        if resume == "auto":
            found = complete_checkpoints(self.root.parent)
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / COMPLETE).exists():
                from qa_dist.errors import ConfigError

                raise ConfigError(f"resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
        self.accelerator.load_state(str(path))
        state = read_state(path)
        self.last_saved = state.step
        log.warning("resumed from %s (step %d)", path, state.step)
        return state
