"""Where training is (``TrainState``) and the state qa-dist writes as JSON rather than pickles: the
LR scheduler's ``state_dict`` and every rank's random generators."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from qa_dist.runtime.jsonfile import Damaged, dataclass_from_json, read_json

STATE = "trainer_state.json"
SCHEDULER = "scheduler.json"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


@dataclass
class TrainState:
    """Where training is: enough, with the Accelerate state, to continue bit for bit."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    micro_step: int = 0
    """Micro-batches of ``epoch`` already consumed."""
    wandb_run_id: str | None = None
    best_f1: float | None = None
    """Best eval F1 logged so far, and its step (the run summary's; rank zero's tracker keeps them)."""
    best_f1_step: int | None = None
    best_has_ans_f1: float | None = None
    """F1 on the answerable questions at ``best_f1_step``, where the metric reports it."""
    best_metric: str | None = None
    """``train.keep_best`` as it was when ``best_value`` was reached at ``best_step``."""
    best_value: float | None = None
    best_step: int | None = None
    eval_pending: bool = False
    """A preemption stopped this step's evaluation: the resumed run evaluates the step first."""


def read_state(checkpoint: Path) -> TrainState:
    """The trainer state of ``checkpoint``; ``Damaged`` when the file is not one qa-dist wrote
    (FileNotFoundError when there is none)."""
    state = dataclass_from_json(TrainState, read_json(Path(checkpoint) / STATE), what=STATE)
    for name in ("step", "epoch", "micro_step"):
        if getattr(state, name) < 0:
            raise Damaged(f"{STATE}: {name} is negative")
    return state


# --- state as JSON -----------------------------------------------------------------------------


def _exact_json(value) -> str:
    """JSON of ``value`` that reads back equal (lists, dicts with str keys, str/int/float/bool/None)."""
    text = json.dumps(value)
    if json.loads(text) != value:
        raise TypeError(f"state does not survive a JSON round trip: {value!r}")
    return text


def scheduler_state_json(scheduler) -> str:
    """The LR scheduler's ``state_dict``: for LambdaLR, numbers and lists, plus ``lr_lambdas``
    entries that are None or the ``__dict__`` of callable objects ({} for functools.partial)."""
    return _exact_json(scheduler.state_dict())


def _same_shape(value, like) -> bool:
    if isinstance(like, dict):
        return (
            isinstance(value, dict)
            and value.keys() == like.keys()
            and all(_same_shape(value[k], like[k]) for k in like)
        )
    if isinstance(like, list):
        return isinstance(value, list) and len(value) == len(like) and all(map(_same_shape, value, like))
    if like is None or isinstance(like, (bool, str)):
        return type(value) is type(like)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_scheduler_state(scheduler, path: Path) -> dict:
    """``scheduler.json``, once it proves to have the keys and types of ``scheduler``'s own state
    (``Damaged`` otherwise): ``load_state_dict`` sets whatever it is given as attributes, and a
    wrong one would fail steps later, in the middle of training."""
    value = read_json(path)
    if not _same_shape(value, json.loads(scheduler_state_json(scheduler))):
        raise Damaged(f"{path.name} does not hold this LR scheduler's state (other keys or types)")
    return value


def _tensor_b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _b64_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state_json() -> str:
    """This process's random generators, exactly."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()]
    return _exact_json(state)


def set_rng_state(text: str) -> None:
    state = json.loads(text)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_tensor(s) for s in state["cuda"]])
