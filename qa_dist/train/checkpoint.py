"""Checkpoints that are complete only when every rank has written its part, verified before a
resume, and exact resume.

A checkpoint is a directory ``checkpoints/step-NNNNNNNN`` holding what ``accelerator.save_state``
writes (model as safetensors, or DeepSpeed's shards; the optimizer) and qa-dist's own state as
JSON: ``trainer_state.json``, ``scheduler.json`` (the LR scheduler's ``state_dict``) and
``rng_state_<rank>.json`` (Python, NumPy and torch generators of every rank). Accelerate's pickled
files are not kept: the scheduler is not registered with Accelerate (it would be saved as
``custom_checkpoint_0.pkl`` and loaded with ``weights_only=False``) and each rank deletes its
``random_states_<rank>.pkl``.

``COMPLETE`` is written last, by rank zero, after every rank finished writing: JSON with the size
and sha256 of every file of the checkpoint. A resume verifies them and falls back to the newest
intact checkpoint (``resume=auto``). Rank zero hashes every rank's files, so the run directory
must be on a filesystem every node sees (as Accelerate and resuming need anyway); a save where it
does not see every rank's files is an error.

Checksums guard against damage, not against someone who can write the run directory (they can
rewrite ``COMPLETE`` too). Against that, a resume never unpickles arbitrary objects: every
``torch.load`` during ``load_state`` is forced to ``weights_only=True`` with a minimal allowlist
(see ``safe_torch_load``), and checkpoints holding pickles that qa-dist does not write are refused.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import logging
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from qa_dist.dist import max_over_ranks
from qa_dist.errors import ConfigError
from qa_dist.fsutil import atomic_write

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
SCHEDULER = "scheduler.json"
MANIFEST_FORMAT = "qa-dist-checkpoint/1"

_REFUSED_PICKLES = ("custom_checkpoint_*.pkl", "random_states_*.pkl", "scheduler*.bin", "sampler*.bin")
"""Pickled files Accelerate would load that qa-dist never writes: a checkpoint holding one is refused."""


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
    best_metric: str | None = None
    """``train.keep_best`` as it was when ``best_value`` was reached at ``best_step``."""
    best_value: float | None = None
    best_step: int | None = None
    eval_pending: bool = False
    """A preemption stopped this step's evaluation: the resumed run evaluates the step first."""


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose marker says every rank finished writing, oldest first (not yet verified)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists() and (p / STATE).exists()]
    return sorted(found, key=_step_of)


def read_state(checkpoint: Path) -> TrainState:
    return TrainState(**json.loads((Path(checkpoint) / STATE).read_text()))


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


# --- loading without unpickling code -----------------------------------------------------------


def _allowed_globals() -> list:
    """What DeepSpeed's ZeRO optimizer shards hold besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``): plain data classes and an enum."""
    allowed = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return allowed


_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch",
    "torch.serialization",
    "pathlib",
    "collections",
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """For the ``.metadata`` file of a torch.distributed.checkpoint directory (FSDP's sharded
    state), which torch reads with plain ``pickle.load``: only the data classes and enums of
    torch.distributed.checkpoint, torch's sizes, dtypes, layouts and memory formats, paths."""

    def find_class(self, module: str, name: str):
        if module not in _DCP_MODULES:  # refused before anything is imported
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} in a checkpoint's metadata")
        found = super().find_class(module, name)
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem") and (
            (isinstance(found, type) and dataclasses.is_dataclass(found)) or (isinstance(found, enum.EnumMeta))
        ):
            return found
        if module == "torch" and (
            found is torch.Size or isinstance(found, (torch.dtype, torch.layout, torch.memory_format))
        ):
            return found
        if (module, name) in {
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "Path"),
            ("collections", "OrderedDict"),
        }:
            return found
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} in a checkpoint's metadata")


class _RestrictedPickle:
    """Stands in for the ``pickle`` module where torch.distributed.checkpoint reads metadata."""

    dump = staticmethod(pickle.dump)
    dumps = staticmethod(pickle.dumps)
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file):
        return _DcpMetadataUnpickler(file).load()

    @staticmethod
    def loads(data: bytes):
        return _DcpMetadataUnpickler(io.BytesIO(data)).load()


@contextlib.contextmanager
def safe_torch_load():
    """Every ``torch.load`` inside is ``weights_only=True`` whatever its caller asks: DeepSpeed loads
    its shards with ``weights_only=False``. Tensors, containers, numbers and ``_allowed_globals``
    load; anything else (a ``__reduce__`` that calls a function) is refused by torch. The
    ``.metadata`` of FSDP's sharded checkpoints (plain ``pickle.load`` in torch) goes through
    ``_DcpMetadataUnpickler``."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    # Imported here: torch.distributed.checkpoint takes 1.2-1.6 s to import, and only a resume needs it.
    from torch.distributed.checkpoint import filesystem as dcp_filesystem

    torch.load = load
    dcp_filesystem.pickle = _RestrictedPickle
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        torch.load = original
        dcp_filesystem.pickle = pickle


def _missing_on_main(path: Path, acc) -> str | None:
    if not acc.is_main_process:
        return None
    return next((rng_file(r) for r in range(acc.num_processes) if not (path / rng_file(r)).exists()), None)


def _broadcast(values: list, acc) -> None:
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

    def maybe_save(self, state: TrainState) -> Path | None:
        if self.every and state.step % self.every == 0 and self.last_saved != state.step:
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
            shutil.rmtree(path)  # an incomplete leftover of a killed save, or a damaged checkpoint
        acc.wait_for_everyone()
        acc.save_state(str(path))
        rank = acc.process_index
        (path / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # pickled; ours is JSON
        atomic_write(path / rng_file(rank), rng_state_json())
        # All ranks have returned from writing their shards before the marker exists.
        acc.wait_for_everyone()
        # Rank zero hashes every rank's files: it must see them. Every rank learns whether it does,
        # so that none is left waiting at the barrier below while rank zero raises.
        missing = [_missing_on_main(path, acc)]
        _broadcast(missing, acc)
        if missing[0]:
            raise ConfigError(
                f"checkpoint {path}: rank zero does not see {missing[0]}, which another rank wrote; "
                "run_dir must be on a filesystem shared by every node"
            )
        if acc.is_main_process:
            atomic_write(path / STATE, json.dumps(asdict(state)))
            if self.scheduler is not None:
                atomic_write(path / SCHEDULER, scheduler_state_json(self.scheduler))
            write_manifest(path, state.step)
            self._prune(path, keep_step=state.best_step)
        acc.wait_for_everyone()
        self.last_saved = state.step
        return path

    def _prune(self, newest: Path, keep_step: int | None = None) -> None:
        """Keep ``newest`` (just written and checksummed) and the ``keep - 1`` newest complete
        checkpoints before it. Checkpoints after it (found damaged at resume, left for a look)
        are not counted: they must never push out the only intact one. The checkpoint of
        ``keep_step`` (the best so far, ``train.keep_best``) is kept besides, and not counted."""
        older = [
            p
            for p in complete_checkpoints(self.root.parent)
            if _step_of(p) < _step_of(newest) and _step_of(p) != keep_step
        ]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.root.glob("step-*"):
            if not (partial / COMPLETE).exists() and _step_of(partial) < _step_of(newest):
                shutil.rmtree(partial, ignore_errors=True)

    def _choose(self, resume: str) -> tuple[Path | None, str | None]:
        """(checkpoint to load, or None; an error for every rank to raise, or None). Rank zero only."""
        if resume == "auto":
            found = complete_checkpoints(self.root.parent)
            problems = []
            for path in reversed(found):
                problem = verify(path)
                if problem is None:
                    return path, None
                log.warning("checkpoint %s is not intact: %s; trying an older one", path, problem)
                problems.append(f"{path.name}: {problem}")
            if problems:
                return None, (
                    f"resume=auto: no intact checkpoint in {self.root} ({'; '.join(problems)}); "
                    "use resume=never to start afresh"
                )
            return None, None
        path = Path(resume)
        if not (path / COMPLETE).exists():
            return None, f"resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
        problem = verify(path)
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
            path, error = self._choose(resume)
            choice = [None if path is None else str(path), error]
        _broadcast(choice, acc)  # rank zero's strings: every rank decides alike
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
                self.scheduler.load_state_dict(json.loads((path / SCHEDULER).read_text()))
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


# --- the best model ----------------------------------------------------------------------------

BEST_DIR = "best"
BEST_JSON = "best.json"


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
        """``export(out_dir)``: every rank calls it; it exports the model there and checks it."""
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.spec = spec
        self.mode, self.key = parse_keep_best(spec)
        self.checkpointer = checkpointer
        self.export = export

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
        _broadcast(decision, acc)
        value, error = decision
        if error is not None:
            raise ConfigError(error)
        if value is None:
            return False
        # The export first: should the run die before the checkpoint, the resumed run evaluates
        # this step again and exports the same model.
        partial = self.run_dir / (BEST_DIR + ".partial")
        if acc.is_main_process and partial.exists():
            shutil.rmtree(partial)
        acc.wait_for_everyone()
        self.export(partial)
        if acc.is_main_process:
            info = {"metric": self.key, "mode": self.mode, "value": value, "step": state.step}
            atomic_write(partial / BEST_JSON, json.dumps(info, indent=2))
            best, old = self.run_dir / BEST_DIR, self.run_dir / (BEST_DIR + ".old")
            if old.exists():
                shutil.rmtree(old)
            if best.exists():
                best.rename(old)
            partial.rename(best)
            shutil.rmtree(old, ignore_errors=True)
            log.warning("new best %s %.6g at step %d: exported to %s", self.key, value, state.step, best)
        acc.wait_for_everyone()
        state.best_metric, state.best_value, state.best_step = self.spec, value, state.step
        self.checkpointer.save(state)
        return True
