"""``train.keep_best``: each improvement of the chosen evaluation metric is checkpointed (never
pruned) and exported to ``run_dir/best/`` with ``best.json``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from qa_dist.errors import ConfigError
from qa_dist.runtime.jsonfile import Damaged, dataclass_from_json, read_json
from qa_dist.train.checkpoint import Checkpointer, TrainState
from qa_dist.train.checkpoint.checkpointer import broadcast_from_main

log = logging.getLogger(__name__)

# --- the best model ----------------------------------------------------------------------------

BEST_DIR = "best"
BEST_JSON = "best.json"


@dataclass(frozen=True)
class BestRecord:
    """``best.json``: which metric, its direction, the best value and its step."""

    metric: str
    mode: str
    value: float
    step: int


def read_best(run_dir: Path) -> BestRecord | None:
    """``run_dir/best/best.json`` (None where there is none); ``Damaged`` for anything but what
    qa-dist writes there."""
    try:
        value = read_json(Path(run_dir) / BEST_DIR / BEST_JSON)
    except FileNotFoundError:
        return None
    if isinstance(value, dict) and set(value) != {"metric", "mode", "value", "step"}:
        raise Damaged(f"{BEST_JSON} has keys {sorted(map(str, value))[:6]}, not metric, mode, value, step")
    record = dataclass_from_json(BestRecord, value, what=BEST_JSON)
    if record.mode not in ("max", "min") or record.step < 0:
        raise Damaged(f"{BEST_JSON}: mode {record.mode!r} or step {record.step} is not one qa-dist writes")
    return record


def parse_keep_best(spec: str) -> tuple[str, str]:
    """``eval/f1`` -> (max, eval/f1); ``min:eval/loss`` -> (min, eval/loss)."""
    mode, sep, key = spec.partition(":")
    return (mode, key) if sep and mode in ("max", "min") else ("max", spec)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class BestKeeper:
    """``train.keep_best``: after each evaluation, when the metric improved on the best so far (kept
    in the trainer state, so a resumed run remembers it), export the model to ``run_dir/best/``
    (verified like the final export, with ``best.json``: metric, value, step) and checkpoint this
    step; the checkpointer never prunes the best step's checkpoint."""

    def __init__(self, accelerator, run_dir: Path, spec: str, checkpointer: Checkpointer, export) -> None:
        """``export(out_dir, files=...)``: every rank calls it; it exports the model there with the
        given files beside it, verified, or raises."""
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.spec = spec
        self.mode, self.key = parse_keep_best(spec)
        self.checkpointer = checkpointer
        self.export = export

    def check_resumed(self, state: TrainState) -> None:
        """Rank zero, after a resume: say so when ``best/`` does not hold the best the trainer state
        remembers (damaged, replaced, or lost to a kill between the export and its checkpoint). The
        state decides; the next improvement exports again."""
        if not self.accelerator.is_main_process or state.best_metric != self.spec:
            return
        path = self.run_dir / BEST_DIR / BEST_JSON
        try:
            record = read_best(self.run_dir)
        except Damaged as e:
            log.warning("%s is damaged (%s): best/ is not the best model of step %s", path, e, state.best_step)
            return
        if record is None or (record.step, record.metric) != (state.best_step, self.key):
            found = "missing" if record is None else f"for {record.metric} at step {record.step}"
            log.warning(
                "%s is %s, the checkpoint's best is %s at step %s; the next improvement exports it again",
                path,
                found,
                self.key,
                state.best_step,
            )

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return value == value  # not NaN
        return value > best if self.mode == "max" else value < best

    def update(self, metrics: dict | None, state: TrainState) -> bool:
        """Every rank calls this after an evaluation, with rank zero's metrics (None elsewhere, and
        when the evaluation was stopped); rank zero decides for all. True: a new best was kept."""
        acc = self.accelerator
        decision = [None, None]  # [new best value, error]
        if acc.is_main_process and metrics is not None:
            value = metrics.get(self.key)
            if not _number(value):
                available = sorted(k for k, v in metrics.items() if _number(v))
                decision[1] = (
                    f"train.keep_best: {self.key!r} is not a metric of this evaluation; available: "
                    + ", ".join(available)
                )
            else:
                best = state.best_value if state.best_metric == self.spec else None
                if self._better(float(value), best):
                    decision[0] = float(value)
        broadcast_from_main(decision, acc)
        value, error = decision
        if error is not None:
            raise ConfigError(error)
        if value is None:
            return False
        # The export first: should the run die before the checkpoint, the resumed run evaluates
        # this step again and exports the same model. best/ and best.json are put in place
        # together, and only once the export is verified.
        info = {"metric": self.key, "mode": self.mode, "value": value, "step": state.step}
        self.export(self.run_dir / BEST_DIR, files={BEST_JSON: json.dumps(info, indent=2)})
        if acc.is_main_process:
            log.warning(
                "new best %s %.6g at step %d: exported to %s", self.key, value, state.step, self.run_dir / BEST_DIR
            )
        acc.wait_for_everyone()
        state.best_metric, state.best_value, state.best_step = self.spec, value, state.step
        self.checkpointer.save(state)
        return True
