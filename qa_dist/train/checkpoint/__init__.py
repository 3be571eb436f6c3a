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

from qa_dist.train.checkpoint.checkpointer import Checkpointer
from qa_dist.train.checkpoint.manifest import COMPLETE, complete_checkpoints, verify, write_manifest
from qa_dist.train.checkpoint.safe_load import safe_torch_load
from qa_dist.train.checkpoint.state import (
    STATE,
    TrainState,
    read_state,
    rng_state_json,
    scheduler_state_json,
    set_rng_state,
)

__all__ = [
    "COMPLETE",
    "STATE",
    "Checkpointer",
    "TrainState",
    "complete_checkpoints",
    "read_state",
    "rng_state_json",
    "safe_torch_load",
    "scheduler_state_json",
    "set_rng_state",
    "verify",
    "write_manifest",
]
