"""``qa-dist demo``, the README's main job, end to end through the command line (Chinese only: the
English half fine-tunes MiniLM for minutes; its pieces are the same commands)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_cli import REPO

from qa_dist import load_examples


def test_demo_runs_the_whole_pipeline_offline(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "demo", "--lang", "zh", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run = out / "zh"
    evals = sorted((run / "eval").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    metrics = json.loads((evals[-1] / "metrics.json").read_text())
    assert metrics["metric"] == "cmrc" and metrics["raw"]["TOTAL"] == 144
    predictions = json.loads((evals[-1] / "predictions.json").read_text())
    assert predictions.keys() == {e["id"] for e in load_examples("sample:zh-dev")}
    assert (run / "model" / "model.safetensors").exists() and (out / "cache").is_dir()
    assert list(run.glob("wandb/offline-run-*"))  # the offline wandb run
    # The summary table, and four questions answered through pipeline("question-answering").
    assert "== summary" in done.stdout and f"{metrics['raw']['F1']:6.1f}" in done.stdout
    assert done.stdout.count("  Q: ") == 4 and done.stdout.count("answer: ") == 4
