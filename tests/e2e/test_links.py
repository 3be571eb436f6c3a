"""No write through a link (issue 27 item 5). Anyone who can write a run directory can plant a
symbolic link where qa-dist will write (a script, a run record, an export's or a checkpoint's
temporary folder, an evaluation's predictions), pointing at a file of the user's, such as
``~/.bashrc``. qa-dist writes every such file to a temporary file renamed over the path, and every
folder fresh: the link is replaced, its target untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, small_run_overrides

RECIPE = REPO / "qa_dist" / "configs" / "runs" / "cpu_sample_en.yaml"
SETTINGS = [
    "train.max_steps=2",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=1",
    "train.keep_best=eval/f1",
]


def _qa_dist(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env
    )


def _plant(path: Path, victims: Path, *, folder: bool = False) -> Path:
    """Replace ``path`` by a link to a file (or folder) of the victim's; returns the target."""
    target = victims / f"victim-{len(list(victims.iterdir()))}"
    if folder:
        target.mkdir()
        (target / "keep").write_text("the victim's\n")
    else:
        target.write_text("the victim's\n")
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return target


def _untouched(target: Path) -> bool:
    if target.is_dir():
        return [p.name for p in target.iterdir()] == ["keep"] and (target / "keep").read_text() == "the victim's\n"
    return target.read_text() == "the victim's\n"


@pytest.mark.slow
def test_no_file_of_a_run_or_its_scripts_is_written_through_a_planted_link(tmp_path, tiny_model):
    run_dir, victims = tmp_path / "run", tmp_path / "victims"
    victims.mkdir()
    overrides = small_run_overrides(tiny_model, run_dir, tmp_path / "cache", *SETTINGS, "eval.every=1")
    first = _qa_dist("train", "--config", str(RECIPE), *overrides)
    assert first.returncode == 0, first.stderr[-3000:]

    # Every file the run wrote outside the folders it replaces whole, and those folders' names.
    whole = ("checkpoints", "model", "best")
    files = [
        p
        for p in run_dir.rglob("*")
        if p.is_file() and p.relative_to(run_dir).parts[0] not in whole and p.name != ".qa-dist.lock"
    ]
    assert {"config.yaml", "export_check.json", "metrics.json", "predictions.json"} <= {p.name for p in files}
    planted = {p: _plant(p, victims) for p in files}
    folders = [
        run_dir / "model.partial",
        run_dir / "best.partial",
        run_dir / "checkpoints" / "step-00000002",  # the step's own name, where the re-save renames to
    ]
    planted |= {p: _plant(p, victims, folder=True) for p in folders}
    planted[run_dir / ".qa-dist.lock"] = _plant(run_dir / ".qa-dist.lock", victims)

    again = _qa_dist("train", "--config", str(RECIPE), *overrides, "resume=never")
    assert again.returncode == 0, again.stderr[-3000:]
    written = _qa_dist("launch", "--config", str(RECIPE), "--slurm", "--cpu", "--dry-run", *overrides)
    assert written.returncode == 0, written.stderr[-3000:]
    scripts = [run_dir / "slurm" / "train.sbatch", run_dir / "launch" / "accelerate.yaml"]
    for path in scripts:
        planted[path] = _plant(path, victims)
    written = _qa_dist("launch", "--config", str(RECIPE), "--slurm", "--cpu", "--dry-run", *overrides)
    assert written.returncode == 0, written.stderr[-3000:]

    touched = [str(p.relative_to(run_dir)) for p, target in planted.items() if not _untouched(target)]
    assert touched == [], touched
    rewritten = [p for p in [*files, *scripts] if p.exists()]
    assert rewritten and not any(p.is_symlink() for p in rewritten)
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / "model").is_symlink()
