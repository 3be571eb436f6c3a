"""The scripts in examples/ run offline, each on tiny data in a few optimizer steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("custom_evaluator.py", ["--max-steps", "2", "--every", "1"], "trained 2 steps; last evaluated at step 2"),
        ("custom_tracker.py", ["--max-steps", "4"], "(the config, then steps [2, 4, 4]); eval/F1 "),
        ("hf_trainer.py", ["--max-steps", "2", "--questions", "16"], "evaluate squad_v2: exact"),
    ],
)
def test_example_runs(tmp_path, script, args, expected):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout, done.stdout[-3000:]
