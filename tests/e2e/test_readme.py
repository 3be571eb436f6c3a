"""The README runs as written: every shell and Python block, in order, from a fresh directory,
offline, on what qa-dist ships. A block that cannot run here says why, in a marker line before it:
``<!-- docs-test: skip: REASON -->``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(
    r"(?:<!-- docs-test: skip: (?P<skip>[^\n]*?) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S
)


def blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) of every fenced bash and python block."""
    return [(m["lang"], m["body"], m["skip"]) for m in FENCE.finditer(path.read_text(encoding="utf-8"))]


def test_every_block_is_run_or_says_why_not():
    found = blocks(REPO / "README.md")
    assert len(found) >= 5
    assert all(skip is None or len(skip) > 10 for _, _, skip in found)  # a reason, not a bare marker
    assert sum(skip is None for _, _, skip in found) >= 4


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_readme_runs_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "qa_dist" / "configs")
    activate = tmp_path / ".venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')  # this interpreter's scripts
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env |= {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    ran = []
    for lang, code, skip in blocks(REPO / "README.md"):
        if skip:
            continue
        # One shell session, as a reader's: the virtual environment the first block activates stays active.
        shell = f". {activate}\n{code}"
        cmd = ["bash", "-euo", "pipefail", "-c", shell] if lang == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1500)
        assert done.returncode == 0, f"README block failed:\n{code}\n{done.stderr[-3000:]}"
        ran.append((code, done))
    quickstart = next(done for code, done in ran if "cpu_quickstart_en.yaml" in code)
    assert "== run summary" in quickstart.stderr and "best eval F1" in quickstart.stderr
    # The quickstart recipe trains until it answers: not "no answer" to every answerable question.
    assert "answers no answerable question" not in quickstart.stderr
    answers = [done.stdout for code, done in ran if "pipeline(" in code]
    assert answers and "'answer'" in answers[0]
