"""Checkpoints from a run directory others can write: a resume never unpickles code, verifies
checksums, falls back to the newest intact checkpoint, and says clearly when there is none.

One single-process run of 4 steps (checkpoints at steps 2 and 4) is trained once; every test damages
a copy of it and resumes with ``resume=auto`` (or an explicit path) in a fresh process."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_run_overrides
from safetensors.torch import load_file

from qa_dist.train.checkpoint import COMPLETE, STATE, Checkpointer

REPO = Path(__file__).resolve().parents[2]
NEWEST, OLDER = "step-00000004", "step-00000002"


def _args(tiny_model, cache_dir, run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "qa_dist",
        "train",
        "--config",
        str(REPO / "configs" / "runs" / "cpu_sample_en.yaml"),
        *small_run_overrides(
            tiny_model, run_dir, cache_dir, "data.eval=null", "train.max_steps=4", "train.checkpoint_every=2", *extra
        ),
    ]


def _run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """(run directory with checkpoints at steps 2 and 4, cache directory, the exported weights)."""
    base = tmp_path_factory.mktemp("trained")
    done = _run(_args(tiny_model, base / "cache", base / "run"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in (base / "run" / "checkpoints").iterdir()) == [OLDER, NEWEST]
    return base / "run", base / "cache", load_file(str(base / "run" / "model" / "model.safetensors"))


@pytest.fixture
def run_dir(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    shutil.rmtree(copy / "model")
    return copy


def _resume(trained, run_dir, tiny_model, resume="resume=auto"):
    return _run(_args(tiny_model, trained[1], run_dir, resume))


def _one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    return line


def _forge_manifest(checkpoint: Path) -> None:
    """What someone who can write the run directory can do: checksums that match their files."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE):
        data = path.read_bytes()
        files[path.relative_to(checkpoint).as_posix()] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": "qa-dist-checkpoint/1", "step": int(checkpoint.name.split("-")[1]), "files": files}
    (checkpoint / COMPLETE).write_text(json.dumps(manifest))


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the harmless stand-in for os.system."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rng_file(checkpoint: Path) -> Path:
    """Rank zero's random-generator state, whatever the checkpoint format calls it."""
    return next(p for p in checkpoint.iterdir() if p.name.startswith(("rng_state_0", "random_states_0")))


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(trained, run_dir, tiny_model, tmp_path, name):
    """The scheduler pickle Accelerate loads with weights_only=False, the RNG pickle, the optimizer
    file: replaced in every checkpoint by a pickle whose __reduce__ creates a file, with checksums
    to match. The resume refuses in one line and the file is never created."""
    marker = tmp_path / "code-ran"
    for checkpoint in (run_dir / "checkpoints").iterdir():
        torch.save({"state": _CreatesFile(marker)}, checkpoint / name)
        _forge_manifest(checkpoint)
    done = _resume(trained, run_dir, tiny_model)
    assert not marker.exists()
    line = _one_line_error(done)
    assert NEWEST in line and (name in line or "refused to unpickle" in line), line


def test_flipped_bytes_fall_back_to_the_older_checkpoint(trained, run_dir, tiny_model):
    """Flipped bytes in the newest model.safetensors: a warning naming the file, the resume from the
    older checkpoint, and the same weights bit for bit as the run that was never damaged."""
    weights = run_dir / "checkpoints" / NEWEST / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in (len(data) // 2, len(data) - 100):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = _resume(trained, run_dir, tiny_model)
    assert done.returncode == 0, done.stderr[-4000:]
    warning = next(line for line in done.stderr.splitlines() if NEWEST in line and "not intact" in line)
    assert "model.safetensors" in warning and "checksum" in warning
    assert f"resumed from {run_dir / 'checkpoints' / OLDER} (step 2)" in done.stderr
    resumed = load_file(str(run_dir / "model" / "model.safetensors"))
    assert resumed.keys() == trained[2].keys()
    assert all(torch.equal(resumed[k], trained[2][k]) for k in resumed)


def test_a_garbage_rng_state_is_detected(trained, run_dir, tiny_model):
    """Before: Accelerate skipped an unreadable RNG file without a word and the resume was no
    longer exact. Now the checksum catches it and the older checkpoint is used."""
    rng = _rng_file(run_dir / "checkpoints" / NEWEST)
    rng.write_bytes(os.urandom(rng.stat().st_size))
    done = _resume(trained, run_dir, tiny_model)
    assert done.returncode == 0, done.stderr[-4000:]
    warning = next(line for line in done.stderr.splitlines() if NEWEST in line and "not intact" in line)
    assert rng.name in warning
    assert f"resumed from {run_dir / 'checkpoints' / OLDER}" in done.stderr


def test_a_truncated_file_falls_back_without_a_traceback(trained, run_dir, tiny_model):
    optimizer = run_dir / "checkpoints" / NEWEST / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    done = _resume(trained, run_dir, tiny_model)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    warning = next(line for line in done.stderr.splitlines() if NEWEST in line and "not intact" in line)
    assert "optimizer.bin" in warning and "truncated" in warning
    assert f"resumed from {run_dir / 'checkpoints' / OLDER}" in done.stderr


def test_no_intact_checkpoint_is_one_line_error(trained, run_dir, tiny_model):
    """Newest: a marker of the old plain-text kind (unverifiable: refused); older: truncated."""
    (run_dir / "checkpoints" / NEWEST / COMPLETE).write_text("all ranks finished writing\n")
    weights = run_dir / "checkpoints" / OLDER / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    line = _one_line_error(_resume(trained, run_dir, tiny_model))
    assert "no intact checkpoint" in line and NEWEST in line and OLDER in line
    assert "unverifiable" in line and "model.safetensors" in line


def test_an_explicit_damaged_checkpoint_is_an_error(trained, run_dir, tiny_model):
    checkpoint = run_dir / "checkpoints" / NEWEST
    (checkpoint / STATE).write_text(json.dumps({"step": 4, "epoch": 0, "micro_step": 99}))
    line = _one_line_error(_resume(trained, run_dir, tiny_model, f"resume={checkpoint}"))
    assert str(checkpoint) in line and STATE in line


def test_pruning_never_deletes_the_only_intact_checkpoint(tmp_path):
    """A resume fell back from a damaged step 30 to step 20 and saved step 25 with keep=1: step 25,
    the only intact one, stays (the old rule kept the newest by step: the damaged 30)."""
    root = tmp_path / "checkpoints"
    for step in (20, 25, 30):
        path = root / f"step-{step:08d}"
        path.mkdir(parents=True)
        (path / STATE).write_text("{}")
        (path / COMPLETE).write_text("{}")
    Checkpointer(None, tmp_path, every=5, keep=1)._prune(root / "step-00000025")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000025", "step-00000030"]


def test_scheduler_and_rng_state_survive_json_exactly():
    """The state that replaced Accelerate's pickles reads back equal: the same learning rates and
    the same random numbers afterwards (what a bit-exact resume needs)."""
    import random

    import numpy as np
    from transformers import get_scheduler

    from qa_dist.train.checkpoint import rng_state_json, scheduler_state_json, set_rng_state

    def schedule():
        model = torch.nn.Linear(3, 3)
        groups = [{"params": [model.weight], "weight_decay": 0.01}, {"params": [model.bias], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=2e-3)
        return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=3, num_training_steps=17)

    optimizer, scheduler = schedule()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    saved = scheduler_state_json(scheduler)
    optimizer2, scheduler2 = schedule()
    scheduler2.load_state_dict(json.loads(saved))
    assert scheduler2.state_dict() == scheduler.state_dict()
    for _ in range(4):
        scheduler.step()
        scheduler2.step()
        assert scheduler2.get_last_lr() == scheduler.get_last_lr()

    np.random.normal()  # a cached Gaussian in NumPy's state
    random.gauss(0, 1)
    state = rng_state_json()
    first = (random.random(), random.gauss(0, 1), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), random.gauss(0, 1), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == first


def test_fsdp_sharded_checkpoint_metadata_is_read_without_unpickling_code(tmp_path):
    """FSDP's sharded checkpoints (torch.distributed.checkpoint) keep a ``.metadata`` that torch
    reads with plain pickle.load. Inside safe_torch_load a real one still loads, and one whose
    __reduce__ would call a function is refused without calling it."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from qa_dist.train.checkpoint import safe_torch_load

    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    with safe_torch_load():
        metadata = FileSystemReader(str(tmp_path / "dcp")).read_metadata()
    assert "model.weight" in metadata.state_dict_metadata

    marker = tmp_path / "code-ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_CreatesFile(marker)))
    with safe_torch_load(), pytest.raises(pickle.UnpicklingError, match="io.open|builtins.open"):
        FileSystemReader(str(tmp_path / "dcp")).read_metadata()
    assert not marker.exists()
    import torch.distributed.checkpoint.filesystem as filesystem

    assert filesystem.pickle is pickle  # torch's own again outside


@pytest.mark.multiprocess
def test_two_ranks_fall_back_together(tmp_path, tiny_model):
    """2 processes (gloo): rank zero verifies, finds the newest checkpoint damaged, and both ranks
    resume from the older one and finish (no rank loads what the other refused)."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ]
    run_dir = tmp_path / "run"
    first = _run([*launch, *_args(tiny_model, tmp_path / "cache", run_dir)[1:]])
    assert first.returncode == 0, first.stderr[-4000:]
    (run_dir / "checkpoints" / NEWEST / "rng_state_1.json").write_text("{}")  # rank 1's file
    done = _run([*launch, *_args(tiny_model, tmp_path / "cache", run_dir, "resume=auto")[1:]])
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count(f"resumed from {run_dir / 'checkpoints' / OLDER} (step 2)") == 2  # each rank
    assert "rng_state_1.json" in next(line for line in done.stderr.splitlines() if "not intact" in line)
    assert f"resumed from {run_dir / 'checkpoints' / NEWEST}" not in done.stderr
