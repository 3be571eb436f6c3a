"""Gathered evaluation through the CLI: 1, 2 and 3 processes (gloo) give identical prediction files
and metrics on real data; predict answers questions without gold answers; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import CMRC_DEV, REPO, SQUAD20_DEV, subset_nested

FILES = ("predictions.json", "nbest_predictions.json", "null_odds.json")


def _evaluate(tmp_path, model, data, nproc: int, *extra):
    out = tmp_path / f"out{nproc}"
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    cmd = [
        *launcher,
        "-m",
        "qa_dist",
        "evaluate",
        "--quiet",
        "--output",
        str(out),
        f"model={model}",
        f"data.eval={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}",
        "data.max_length=128",
        "data.doc_stride=48",
        "eval.per_device_batch_size=8",  # many batches: uneven shards and padding rounds with 3
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    return done, out


def _metrics(out) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


@pytest.mark.multiprocess
def test_one_two_and_three_processes_give_identical_predictions_and_metrics(tmp_path, tiny_model):
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(subset_nested(SQUAD20_DEV, 30)))
    results = {}
    for nproc in (1, 2, 3):
        done, out = _evaluate(tmp_path, tiny_model, data, nproc, "eval.tune_threshold=true")
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = out
    first = results[1]
    metrics = _metrics(first)
    assert metrics["metric"] == "squad_v2" and metrics["raw"]["total"] == metrics["questions"] > 100
    assert metrics["raw"]["missing"] == 0
    assert "threshold" in metrics["tuned"] and metrics["tuned"]["f1"] >= metrics["raw"]["f1"]
    # Candidates, not logits: window index, 20 x (start, end, score), null score, normaliser.
    assert metrics["gathered_bytes_per_window"] == 8 + 20 * (2 + 2 + 4) + 4 + 4 <= 2 * 384 * 4 / 10
    predictions = json.loads((first / "predictions.json").read_text())
    assert len(predictions) == metrics["questions"]
    for nproc in (2, 3):
        for name in FILES:
            assert (results[nproc] / name).read_bytes() == (first / name).read_bytes(), (nproc, name)
        assert _metrics(results[nproc]) == metrics
    # The official-format files score the same through qa-dist score.
    scored = subprocess.run(
        [sys.executable, "-m", "qa_dist", "score", "--data", str(data), "--predictions", str(first / FILES[0])]
        + ["--na-probs", str(first / "null_odds.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert json.loads(scored.stdout) == metrics["raw"]


@pytest.mark.multiprocess
def test_chinese_evaluation_uses_cmrc_metrics_and_agrees_across_process_counts(tmp_path, tiny_model):
    data = tmp_path / "cmrc.json"
    data.write_text(json.dumps(subset_nested(CMRC_DEV, 12), ensure_ascii=False))
    outs = []
    for nproc in (1, 2):
        done, out = _evaluate(tmp_path, tiny_model, data, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(out)
    metrics = _metrics(outs[0])
    assert metrics["metric"] == "cmrc" and set(metrics["raw"]) >= {"F1", "EM", "AVERAGE", "TOTAL", "SKIP"}
    assert not (outs[0] / "null_odds.json").exists()
    assert (outs[1] / "predictions.json").read_bytes() == (outs[0] / "predictions.json").read_bytes()
    assert _metrics(outs[1]) == metrics


def _qa(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_predict_one_question_and_a_file_without_answers(tmp_path, tiny_model):
    context = "The Normans gave their name to Normandy, a region in France."
    done = _qa(
        "predict", "--model", str(tiny_model), "--question", "Who gave their name?", "--context", context, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert answer["answer"] and context[answer["start"] : answer["end"]] == answer["answer"]
    assert 0.0 < answer["score"] <= 1.0

    questions = [
        {"id": "n1", "question": "Where is Normandy?", "context": context},
        {"id": "n2", "question": "Who gave their name?", "context": context},
    ]
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in questions))
    done = _qa(
        "predict",
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--output",
        "preds",
        "--allow-no-answer",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert set(predictions) == {"n1", "n2"}
    assert set(json.loads((tmp_path / "preds" / "null_odds.json").read_text())) == {"n1", "n2"}


def test_bad_input_exits_2_naming_the_record_and_writes_nothing(tmp_path, tiny_model):
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"id": "n1", "question": "", "context": "text"}))
    done = _qa("predict", "--model", str(tiny_model), "--data", str(data), "--output", "preds", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(data) in done.stderr and "'n1'" in done.stderr
    assert not (tmp_path / "preds").exists()
    done = _qa("predict", "--model", str(tmp_path / "nowhere"), "--question", "q", "--context", "c", cwd=tmp_path)
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr
    done = _qa(
        "evaluate", "--config", str(REPO / "configs" / "runs" / "cpu_sample_en.yaml"), "data.eval=null", cwd=tmp_path
    )
    assert done.returncode == 2 and "data.eval" in done.stderr
