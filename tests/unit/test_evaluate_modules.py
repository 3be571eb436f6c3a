"""The metrics as ``evaluate`` modules (qa_dist.evaluate_module): ``evaluate.load`` of the shipped
folders gives exactly ``qa_dist.score``'s numbers on real dev sets, offline and from any directory."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CMRC_DEV, REPO, SQUAD11_DEV, SQUAD20_DEV

import qa_dist

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
evaluate = pytest.importorskip("evaluate")

SCORE_ONLY = ("missing", "missing_ids")  # qa_dist.score's report of missing predictions, not a hub key


def _prediction(i: int, examples: list[dict], chinese: bool) -> str:
    """Deterministic predictions of every kind: gold, gold with noise that normalisation removes,
    shortened, another question's answer (wrong), and empty."""
    gold = examples[i]["answers"]["text"]
    first = gold[0] if gold else ""
    kind = i % 6
    if kind == 0:
        return first
    if kind == 1:
        return f"The {first}." if not chinese else f"《{first}》。"
    if kind == 2:
        return first[: len(first) // 2] if chinese else " ".join(first.split()[1:])
    if kind == 3:
        other = examples[(i * 7 + 3) % len(examples)]["answers"]["text"]
        return other[0] if other else "nothing"
    if kind == 4:
        return ""
    return gold[-1] if gold else "a made-up answer"


def _inputs(examples: list[dict], *, chinese: bool = False, null_odds: bool = False, seed: int = 12):
    """(predictions, references) for evaluate and (texts, na_probs) for qa_dist.score."""
    texts = {ex["id"]: _prediction(i, examples, chinese) for i, ex in enumerate(examples)}
    rng = random.Random(seed)
    # Null odds as qa-dist writes them (a score difference, any sign), higher for empty predictions.
    na_probs = {qid: rng.uniform(-8.0, 4.0) + (5.0 if not text else 0.0) for qid, text in texts.items()}
    predictions = [
        {"id": qid, "prediction_text": text, **({"no_answer_probability": na_probs[qid]} if null_odds else {})}
        for qid, text in texts.items()
    ]
    references = [{"id": ex["id"], "answers": ex["answers"]} for ex in examples]
    return predictions, references, texts, (na_probs if null_odds else None)


@pytest.fixture(scope="module")
def squad11():
    return qa_dist.load_examples(SQUAD11_DEV)


@pytest.fixture(scope="module")
def squad20():
    return qa_dist.load_examples(SQUAD20_DEV)


@pytest.fixture(scope="module")
def cmrc():
    return qa_dist.load_examples(CMRC_DEV)


def _load(name: str, tmp_path: Path):
    return evaluate.load(qa_dist.evaluate_module(name), cache_dir=str(tmp_path / "metrics"))


def _without_score_only(result: dict) -> dict:
    assert result["missing"] == 0
    return {k: v for k, v in result.items() if k not in SCORE_ONLY}


def test_squad_v1_equals_score(squad11, tmp_path):
    predictions, references, texts, _ = _inputs(squad11)
    got = _load("squad", tmp_path).compute(predictions=predictions, references=references)
    expected = qa_dist.score(squad11, texts, metric="squad")
    assert set(got) == {"exact_match", "f1"}  # the hub's squad keys
    assert got == _without_score_only(expected)
    assert (got["exact_match"], got["f1"]) == (expected["exact_match"], expected["f1"])
    assert 0 < got["exact_match"] < got["f1"] < 100


def test_squad_v1_accepts_the_v2_prediction_format(squad11, tmp_path):
    """run_qa.py-style v2 predictions (with no_answer_probability) score as v1 without it."""
    sub = squad11[:300]
    predictions, references, texts, _ = _inputs(sub, null_odds=True)
    got = _load("squad", tmp_path).compute(predictions=predictions, references=references)
    assert got == _without_score_only(qa_dist.score(sub, texts, metric="squad"))


def test_squad_v2_with_null_odds_equals_score(squad20, tmp_path):
    predictions, references, texts, na_probs = _inputs(squad20, null_odds=True)
    got = _load("squad_v2", tmp_path).compute(predictions=predictions, references=references)
    expected = qa_dist.score(squad20, texts, na_probs=na_probs, metric="squad_v2")
    assert list(got) == [
        "exact",
        "f1",
        "total",
        "HasAns_exact",
        "HasAns_f1",
        "HasAns_total",
        "NoAns_exact",
        "NoAns_f1",
        "NoAns_total",
        "best_exact",
        "best_exact_thresh",
        "best_f1",
        "best_f1_thresh",
    ]  # the hub's squad_v2 keys, in its order
    assert got == _without_score_only(expected)
    # The null odds reach the metric unrounded (float64): the best threshold is one of them.
    assert {got["best_exact_thresh"], got["best_f1_thresh"]} <= set(na_probs.values())
    # (best_* can be below exact/f1 here: like the official script, the threshold search counts any
    # non-empty prediction to an unanswerable question as wrong, "The ." included.)
    assert got["total"] == len(squad20) and got["NoAns_total"] == sum(ex["is_impossible"] for ex in squad20)


def test_squad_v2_without_null_odds_and_with_a_threshold(squad20, tmp_path):
    sub = squad20[:400]
    metric = _load("squad_v2", tmp_path)
    predictions, references, texts, _ = _inputs(sub)
    got = metric.compute(predictions=predictions, references=references)
    assert "best_f1" not in got  # as the official script without --na-prob-file
    assert got == _without_score_only(qa_dist.score(sub, texts, metric="squad_v2"))

    predictions, references, texts, na_probs = _inputs(sub, null_odds=True)
    got = metric.compute(predictions=predictions, references=references, no_answer_threshold=0.0)
    from qa_dist.metrics import score_squad_v2

    assert got == score_squad_v2(sub, texts, na_probs, na_prob_thresh=0.0)
    assert got != _without_score_only(qa_dist.score(sub, texts, na_probs=na_probs, metric="squad_v2"))


def test_cmrc2018_equals_score(cmrc, tmp_path):
    predictions, references, texts, _ = _inputs(cmrc, chinese=True)
    got = _load("cmrc2018", tmp_path).compute(predictions=predictions, references=references)
    expected = qa_dist.score(cmrc, texts, metric="cmrc")
    assert {"AVERAGE", "F1", "EM", "TOTAL", "SKIP"} <= set(got)
    assert got == _without_score_only(expected)
    assert got["TOTAL"] == len(cmrc) and got["SKIP"] == 0


def test_missing_predictions_count_as_wrong_and_are_logged(squad20, tmp_path, caplog):
    """evaluate wants as many predictions as references; a prediction for another id leaves its
    reference without one (an unknown id is ignored, as in the official script)."""
    sub = squad20[:200]
    predictions, references, _, _ = _inputs(sub, null_odds=True)
    for p in predictions[::10]:
        p["id"] += "-elsewhere"
    texts = {p["id"]: p["prediction_text"] for p in predictions}
    na_probs = {p["id"]: p["no_answer_probability"] for p in predictions}
    with caplog.at_level(logging.WARNING, logger="qa_dist.metrics.evaluate_modules"):
        got = _load("squad_v2", tmp_path).compute(predictions=predictions, references=references)
    expected = qa_dist.score(sub, texts, na_probs=na_probs, metric="squad_v2")
    assert expected["missing"] == 20
    assert got == {k: v for k, v in expected.items() if k not in SCORE_ONLY}
    assert "20 of 200 references have no prediction" in caplog.text and sub[0]["id"] in caplog.text


def test_bad_inputs(tmp_path):
    ref = {"id": "a", "answers": {"text": ["x"], "answer_start": [0]}}
    metric = _load("squad_v2", tmp_path)
    with pytest.raises(ValueError, match="no_answer_probability is given for 1 of 2"):
        metric.compute(
            predictions=[
                {"id": "a", "prediction_text": "x", "no_answer_probability": 0.5},
                {"id": "b", "prediction_text": ""},
            ],
            references=[ref, {**ref, "id": "b"}],
        )
    with pytest.raises(ValueError, match="expected format"):  # evaluate's own check
        metric.compute(predictions=[{"id": "a", "prediction_text": None}], references=[ref])


def test_unknown_name():
    for bad in ("squad_v3", "cmrc", "SQuAD", ""):
        with pytest.raises(qa_dist.ConfigError, match="squad, squad_v2 or cmrc2018"):
            qa_dist.evaluate_module(bad)
    with pytest.raises(ValueError, match="'cmrc2018' here"):
        qa_dist.evaluate_module("cmrc")


def test_folders_follow_evaluates_layout():
    for name in ("squad", "squad_v2", "cmrc2018"):
        folder = Path(qa_dist.evaluate_module(name))
        assert folder.is_dir() and (folder / f"{name}.py").is_file() and (folder / "README.md").is_file()


def test_offline_from_another_directory(tmp_path):
    """A fresh process in another directory, with a fresh HF cache, the hub switched off and any
    HTTP going to a closed port: all three load and score. Importing qa_dist alone and asking for
    the path imports neither evaluate nor torch. The script is copied into HF_MODULES_CACHE."""
    script = textwrap.dedent(
        """
        import json, sys
        import qa_dist
        paths = {n: qa_dist.evaluate_module(n) for n in ("squad", "squad_v2", "cmrc2018")}
        heavy = [m for m in ("evaluate", "datasets", "torch", "transformers") if m in sys.modules]
        import evaluate
        ref = [{"id": "q", "answers": {"text": ["Denver Broncos"], "answer_start": [0]}},
               {"id": "n", "answers": {"text": [], "answer_start": []}}]
        pred = [{"id": "q", "prediction_text": "the Denver Broncos", "no_answer_probability": -2.5},
                {"id": "n", "prediction_text": "", "no_answer_probability": 3.0}]
        zh_ref = [{"id": "z", "answers": {"text": ["北京大学出版社"], "answer_start": [0]}}]
        out = {"heavy": heavy, "paths": paths}
        out["squad"] = evaluate.load(paths["squad"]).compute(predictions=pred[:1], references=ref[:1])
        out["squad_v2"] = evaluate.load(paths["squad_v2"]).compute(predictions=pred, references=ref)
        out["cmrc2018"] = evaluate.load(paths["cmrc2018"]).compute(
            predictions=[{"id": "z", "prediction_text": "北京大学"}], references=zh_ref)
        print(json.dumps(out))
        """
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    hf_home = tmp_path / "hf"
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "PYTHONPATH": str(REPO),
    }
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert all(Path(p).is_absolute() and Path(p).is_relative_to(REPO / "qa_dist") for p in out["paths"].values())
    assert out["squad"] == {"exact_match": 100.0, "f1": 100.0}
    assert out["squad_v2"]["exact"] == 100.0 and out["squad_v2"]["NoAns_total"] == 1
    assert out["squad_v2"]["best_f1_thresh"] == -2.5
    assert out["cmrc2018"]["EM"] == 0.0 and out["cmrc2018"]["F1"] == pytest.approx(800 / 11)
    # evaluate copies each script into the modules cache under its content hash, and imports it from there.
    for name in ("squad", "squad_v2", "cmrc2018"):
        copies = list((hf_home / "modules" / "evaluate_modules" / "metrics" / name).glob(f"*/{name}.py"))
        assert len(copies) == 1
        assert copies[0].read_bytes() == (Path(out["paths"][name]) / f"{name}.py").read_bytes()


@pytest.mark.parametrize("name", ["squad", "squad_v2", "cmrc2018"])
def test_add_and_add_batch_take_predictions_without_null_odds(name, squad11, squad20, cmrc, tmp_path):
    """evaluate's incremental API, as a training loop would call it: one prediction at a time and in
    batches, no_answer_probability left out, gives compute's numbers."""
    sub = {"squad": squad11, "squad_v2": squad20, "cmrc2018": cmrc}[name][:120]
    predictions, references, _, _ = _inputs(sub, chinese=name == "cmrc2018")
    expected = _load(name, tmp_path).compute(predictions=predictions, references=references)
    one_by_one = _load(name, tmp_path)
    for prediction, reference in zip(predictions[:50], references[:50], strict=True):
        one_by_one.add(prediction=prediction, reference=reference)
    one_by_one.add_batch(predictions=predictions[50:], references=references[50:])
    assert one_by_one.compute() == expected
