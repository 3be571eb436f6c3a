"""Chinese data end to end: the shipped Chinese recipe as it is, and Chinese data with unanswerable
questions (SQuAD v2 style, as DuReader-checklist and the Chinese tutorials ship it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qa_dist import load_examples

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "runs" / "cpu_sample_zh.yaml"


def qa_dist(*args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


def _with_unanswerable(source: str, path: Path, every: int = 3) -> Path:
    """The shipped Chinese sample as flat JSONL where every ``every``-th question is asked of another
    paragraph (so it really has no answer there) with empty answers."""
    examples = load_examples(source)
    contexts = sorted({ex["context"] for ex in examples})
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            record = {k: ex[k] for k in ("id", "title", "context", "question", "answers")}
            if i % every == 0:
                record["context"] = next(c for c in contexts[i % len(contexts) :] + contexts if c != ex["context"])
                record["answers"] = {"text": [], "answer_start": []}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def zh_v2(tmp_path_factory):
    root = tmp_path_factory.mktemp("zh-v2")
    return (
        _with_unanswerable("sample:zh-train", root / "train.jsonl"),
        _with_unanswerable("sample:zh-dev", root / "dev.jsonl"),
    )


@pytest.mark.slow
def test_chinese_unanswerable_questions_train_evaluate_and_export(tmp_path, zh_v2):
    train, dev = zh_v2
    run_dir = tmp_path / "run"
    done = qa_dist(
        "train",
        "--config",
        str(RECIPE),
        f"data.train={train}",
        f"data.eval={dev}",
        f"run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=6",
        "logging.log_every=3",
        "eval.tune_threshold=true",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"training on 1 process\(es\) .*: [0-9.]+M parameters", done.stderr)
    assert (run_dir / "model" / "model.safetensors").is_file()
    check = json.loads((run_dir / "export_check.json").read_text())
    assert check["max_abs_diff"] <= check["tolerance"] * check["scale"]
    out = run_dir / "eval" / "step_6"
    metrics = json.loads((out / "metrics.json").read_text())
    raw = metrics["raw"]
    dev_examples = load_examples(str(dev))
    unanswerable = sum(1 for ex in dev_examples if ex["is_impossible"])
    assert metrics["metric"] == "cmrc"
    assert raw["TOTAL"] == len(dev_examples) and raw["NoAns_total"] == unanswerable > 0
    assert raw["HasAns_total"] == len(dev_examples) - unanswerable
    assert {"best_F1", "best_F1_thresh", "best_EM", "best_EM_thresh"} <= set(raw)
    null_odds = json.loads((out / "null_odds.json").read_text())
    assert set(null_odds) == {ex["id"] for ex in dev_examples}
    tuned = metrics["tuned"]
    assert "threshold" in tuned and tuned["F1"] >= raw["F1"] - 1e-9 and tuned["NoAns_total"] == unanswerable


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_shipped_chinese_recipe_trains_through_accelerate_launch(tmp_path):
    # The recipe's model is a tokenizer directory and model.init: scratch (it failed with
    # "Unrecognized model" before).
    run_dir = tmp_path / "run"
    done = qa_dist(
        "launch",
        "--config",
        str(RECIPE),
        "--cpu",
        f"run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=4",
        "train.per_device_batch_size=8",
        "eval.per_device_batch_size=32",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stderr
    assert (run_dir / "model" / "model.safetensors").is_file()
    metrics = json.loads((run_dir / "eval" / "step_4" / "metrics.json").read_text())
    assert metrics["metric"] == "cmrc" and "NoAns_total" not in metrics["raw"]  # CMRC2018: all answerable


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, command):
    done = qa_dist(
        command,
        "--config",
        str(RECIPE),
        "model.init=pretrained",  # a tokenizer directory, no weights
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("qa-dist: error: model.name_or_path: cannot load a question answering model from")
    assert "'sample:zh-char-tokenizer'" in lines[0]
