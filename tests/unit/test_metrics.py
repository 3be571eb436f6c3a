"""Metrics: hand-computed values, the reason for CMRC-style F1, missing predictions, normalisers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qa_dist.metrics import cmrc_f1, mixed_segmentation, normalize_answer, score, squad_f1


def _ex(qid, context, answers, impossible=False):
    return {
        "id": qid,
        "title": "",
        "context": context,
        "question": "?",
        "is_impossible": impossible,
        "answers": {"text": answers, "answer_start": [0] * len(answers)},
    }


def test_squad_v1_hand_computed():
    examples = [_ex("a", "c", ["the Denver Broncos"]), _ex("b", "c", ["Santa Clara, California"])]
    # a: exact after normalisation (article, case). b: pred "Santa Clara" -> 2 of 3 gold tokens:
    # precision 1, recall 2/3, F1 0.8.
    result = score(examples, {"a": "denver broncos!", "b": "Santa Clara"}, metric="squad")
    assert result == {"exact_match": 50.0, "f1": pytest.approx(90.0), "missing": 0}


def test_squad_v2_hand_computed_with_null_odds():
    examples = [_ex("a", "c", ["France"]), _ex("b", "c", [], impossible=True), _ex("c", "c", ["10th century"])]
    preds = {"a": "France", "b": "", "c": "the 11th century"}
    result = score(examples, preds, na_probs={"a": 0.1, "b": 0.9, "c": 0.5})
    # c: tokens [11th, century] vs [10th, century]: 1 common, P = R = 1/2, F1 = 0.5.
    assert result["exact"] == pytest.approx(200 / 3) and result["f1"] == pytest.approx(250 / 3)
    assert (result["HasAns_total"], result["NoAns_total"], result["total"]) == (2, 1, 3)
    assert result["HasAns_f1"] == pytest.approx(75.0) and result["NoAns_exact"] == 100.0
    # Best threshold: answering only "a" (na 0.1) and abstaining elsewhere scores a (1) + b (1) = 2/3.
    assert result["best_exact"] == pytest.approx(200 / 3) and result["best_exact_thresh"] == 0.1


def test_chinese_needs_cmrc_style_f1():
    """Unsegmented Chinese is one whitespace token: SQuAD's F1 gives a partly right answer the same
    0 as a wrong one; CMRC's character-level F1 tells them apart."""
    gold, partly_right, wrong = "北京大学出版社", "北京大学", "上海"
    assert squad_f1(gold, partly_right) == squad_f1(gold, wrong) == 0.0
    assert cmrc_f1(gold, partly_right) == pytest.approx(2 * (1.0 * 4 / 7) / (1.0 + 4 / 7))
    assert cmrc_f1(gold, wrong) == 0.0
    examples = [_ex("z", "北京大学出版社出版了这本书。", [gold])]
    assert set(score(examples, {"z": partly_right})) == {"F1", "EM", "AVERAGE", "TOTAL", "SKIP", "missing"}


def test_mixed_segmentation():
    assert mixed_segmentation("2010年是NBA的Finals，") == ["2010", "年", "是", "nba", "的", "finals", "，"]
    assert mixed_segmentation("《三体》, Liu Cixin", remove_punctuation=True) == ["三", "体", ",", "liu", "cixin"]


def test_missing_predictions_count_as_wrong_and_are_reported():
    examples = [_ex("a", "c", ["x"]), _ex("b", "c", [], impossible=True), _ex("c", "c", ["y"])]
    result = score(examples, {"a": "x"})
    assert result["missing"] == 2 and result["missing_ids"] == ["b", "c"]
    assert result["exact"] == pytest.approx(100 / 3) and result["total"] == 3  # the official script crashes here
    cmrc = score([_ex("q", "中文的上下文", ["中文"])], {}, metric="cmrc")
    assert (cmrc["SKIP"], cmrc["TOTAL"], cmrc["F1"], cmrc["missing"]) == (1, 1, 0.0, 1)


@given(st.text(max_size=60))
def test_normalize_answer_is_idempotent_and_clean(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once
    assert once == once.strip() and "  " not in once and once == once.lower()
    assert not ({"the", "a", "an"} & set(once.split()))


@given(st.text(max_size=40))
def test_mixed_segmentation_keeps_every_cjk_character(text):
    segments = mixed_segmentation(text)
    cjk = [ch for ch in text.lower() if "\u4e00" <= ch <= "\u9fa5"]
    assert [s for s in segments if len(s) == 1 and "\u4e00" <= s <= "\u9fa5"] == cjk


def test_score_command_prints_json(tmp_path):
    data = tmp_path / "dev.jsonl"
    data.write_text(
        "\n".join(json.dumps(_ex(q, "Paris is in France.", a, not a)) for q, a in [("a", ["France"]), ("b", [])])
    )
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({"a": "France", "b": "Paris"}))
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "score", "--data", str(data), "--predictions", str(preds)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["exact"] == 50.0 and result["HasAns_exact"] == 100.0 and result["NoAns_exact"] == 0.0
    bad = subprocess.run(
        [sys.executable, "-m", "qa_dist", "score", "--data", str(data), "--predictions", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "predictions" in bad.stderr


# -- qa-dist score on bad predictions and null odds (issue 14 item 14) --------------------------


def _strict_json(text: str):
    """Parse JSON as a strict parser does: NaN and Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture()
def score_files(tmp_path):
    """Data with one answerable and one unanswerable question, and a writer for JSON files."""
    data = tmp_path / "dev.jsonl"
    answerable, unanswerable = _ex("a", "Paris is in France.", ["France"]), _ex("b", "Paris is in France.", [], True)
    answerable["answers"]["answer_start"] = [12]
    data.write_text(json.dumps(answerable) + "\n" + json.dumps(unanswerable) + "\n")

    def write(name, text):
        path = tmp_path / name
        path.write_text(text if isinstance(text, str) else json.dumps(text))
        return str(path)

    return str(data), write


def _score_cli(capsys, *args):
    from qa_dist.cli import main

    code = main(["score", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code, err) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qa-dist: error: "), err
    return lines[0]


@pytest.mark.parametrize("value", [3, 0.5, True, ["France"], {"text": "France"}])
def test_score_non_string_prediction_is_a_one_line_error(score_files, capsys, value):
    data, write = score_files
    preds = write("predictions.json", {"a": value, "b": ""})
    code, out, err = _score_cli(capsys, "--data", data, "--predictions", preds)
    line = _one_error_line(code, err)
    assert f"{preds}: question 'a': a prediction must be a string" in line and out == ""


def test_score_null_prediction_counts_as_missing(score_files, capsys):
    data, write = score_files
    preds = write("predictions.json", {"a": "France", "b": None})
    code, out, err = _score_cli(capsys, "--data", data, "--predictions", preds)
    assert code == 0, err
    result = _strict_json(out)
    assert result["missing"] == 1 and result["missing_ids"] == ["b"]
    assert result["exact"] == 50.0 and result["HasAns_exact"] == 100.0 and result["NoAns_exact"] == 0.0
    for metric in ("squad_v2", "auto"):
        _, out, _ = _score_cli(capsys, "--data", data, "--predictions", preds, "--metric", metric)
        assert _strict_json(out)["missing"] == 1


@pytest.mark.parametrize(
    ("odds", "got"),
    [
        ("NaN", "got nan"),
        ("Infinity", "got inf"),
        ("-Infinity", "got -inf"),
        ('"0.5"', "got str"),
        ("null", "got NoneType"),
        ("true", "got bool"),
    ],
)
def test_score_bad_null_odds_are_a_one_line_error(score_files, capsys, odds, got):
    data, write = score_files
    preds = write("predictions.json", {"a": "France", "b": ""})
    na = write("null_odds.json", '{"a": 0.1, "b": ' + odds + "}")
    code, out, err = _score_cli(capsys, "--data", data, "--predictions", preds, "--na-probs", na)
    line = _one_error_line(code, err)
    assert f"{na}: question 'b': null odds must be a finite number, {got}" in line and out == ""


@pytest.mark.parametrize("metric", ["squad"])
def test_score_metric_without_unanswerable_questions_on_v2_data_is_a_one_line_error(score_files, capsys, metric):
    data, write = score_files
    preds = write("predictions.json", {"a": "France", "b": ""})
    code, out, err = _score_cli(capsys, "--data", data, "--predictions", preds, "--metric", metric)
    line = _one_error_line(code, err)
    assert f"{data}: metric {metric} (" in line and "1 of the 2 questions are (first: 'b')" in line
    assert "use metric squad_v2" in line and out == ""


def test_score_reports_predictions_for_questions_not_in_the_data(score_files, capsys, caplog):
    data, write = score_files
    preds = write("predictions.json", {"a": "France", "b": "", "zz-1": "x", "zz-2": None, "zz-3": ""})
    with caplog.at_level("WARNING"):
        code, out, err = _score_cli(capsys, "--data", data, "--predictions", preds)
    assert code == 0, err
    result = _strict_json(out)
    assert result["extra"] == 2 and result["extra_ids"] == ["zz-1", "zz-3"]  # (a null is no prediction)
    assert result["exact"] == 100.0 and result["total"] == 2 and result["missing"] == 0
    assert any("2 predictions are for questions not in" in r.getMessage() for r in caplog.records)
    plain = write("plain.json", {"a": "France", "b": ""})
    _, out, _ = _score_cli(capsys, "--data", data, "--predictions", plain)
    assert "extra" not in _strict_json(out) and "extra_ids" not in _strict_json(out)


def test_score_deeply_nested_predictions_file_is_a_one_line_error(score_files, capsys):
    data, write = score_files
    preds = write("predictions.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, _, err = _score_cli(capsys, "--data", data, "--predictions", preds)
    assert f"{preds}: predictions file is JSON nested too deeply to read" in _one_error_line(code, err)


def test_score_command_nan_null_odds_exit_2_without_traceback(score_files):
    """The same through a real process: exit code 2, one line, no traceback, no invalid JSON."""
    data, write = score_files
    preds = write("predictions.json", {"a": "France", "b": ""})
    na = write("null_odds.json", '{"a": NaN, "b": 0.9}')
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "score", "--data", data, "--predictions", preds, "--na-probs", na],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        f"qa-dist: error: {na}: question 'a': null odds must be a finite number, got nan"
    ]


# -- CMRC-style scoring of unanswerable questions, and the tuned null threshold ------------------


def test_cmrc_with_unanswerable_questions_hand_computed():
    examples = [
        _ex("a", "中文的上下文", ["中文"]),
        _ex("b", "中文的上下文", [], impossible=True),
        _ex("c", "中文的上下文", [], impossible=True),
        _ex("d", "中文的上下文", ["上下文"]),
    ]
    preds = {"a": "中文", "b": "", "c": "上下", "d": ""}
    result = score(examples, preds, metric="cmrc", na_probs={"a": -2.0, "b": 3.0, "c": 0.5, "d": 1.0})
    # a right (100), b right to abstain (100), c wrong to answer (0), d empty on an answerable one (0).
    assert (result["EM"], result["F1"], result["TOTAL"], result["SKIP"]) == (50.0, 50.0, 4, 0)
    assert (result["HasAns_EM"], result["HasAns_F1"], result["HasAns_total"]) == (50.0, 50.0, 2)
    assert (result["NoAns_EM"], result["NoAns_F1"], result["NoAns_total"]) == (50.0, 50.0, 2)
    # The official search: answer in order of null odds, a (+1) first: 2 (b, c abstained) + 1 = 3 of 4.
    assert result["best_F1"] == 75.0 and result["best_F1_thresh"] == -2.0
    assert result["best_EM"] == 75.0 and result["best_EM_thresh"] == -2.0
    assert score(examples, preds, metric="auto")["NoAns_total"] == 2  # Chinese contexts: CMRC style


def test_cmrc_dev_with_questions_made_unanswerable_matches_the_official_numbers_on_the_rest():
    from conftest import CMRC_DEV

    from qa_dist import load_examples

    examples = load_examples(str(CMRC_DEV))
    preds = {}
    for i, ex in enumerate(examples):
        gold = ex["answers"]["text"][0]
        preds[ex["id"]] = [gold, gold[:-1] or gold, "", ex["context"][:8]][i % 4]
    answerable = [ex for i, ex in enumerate(examples) if i % 5]
    made_unanswerable = [
        {**ex, "is_impossible": True, "answers": {"text": [], "answer_start": []}}
        for i, ex in enumerate(examples)
        if i % 5 == 0
    ]
    official = score(answerable, preds, metric="cmrc")  # answerable only: the official script's output
    assert set(official) == {"AVERAGE", "F1", "EM", "TOTAL", "SKIP", "missing", "missing_ids"} - {"missing_ids"}
    mixed = score(answerable + made_unanswerable, preds, metric="cmrc")
    assert mixed["HasAns_F1"] == pytest.approx(official["F1"], rel=1e-12)
    assert mixed["HasAns_EM"] == pytest.approx(official["EM"], rel=1e-12)
    assert mixed["HasAns_total"] == len(answerable) and mixed["NoAns_total"] == len(made_unanswerable)
    empty = sum(1 for ex in made_unanswerable if preds[ex["id"]] == "")
    assert mixed["NoAns_EM"] == mixed["NoAns_F1"] == pytest.approx(100.0 * empty / len(made_unanswerable))
    assert mixed["TOTAL"] == len(examples) and "best_F1" not in mixed


def test_tuned_threshold_when_abstaining_everywhere_is_best():
    from qa_dist import tune_threshold

    # One unanswerable question and one wrongly answered one. The official search reports threshold
    # 0.0 with best F1 50, but 0.0 applied to these null odds answers both: F1 0.
    examples = [_ex("u", "c", [], impossible=True), _ex("w", "c", ["Paris"])]
    spans, odds = {"u": "London", "w": "Berlin"}, {"u": -1.0, "w": -2.0}
    official = score(examples, spans, na_probs=odds)
    assert official["best_f1"] == 50.0 and official["best_f1_thresh"] == 0.0
    tuned = tune_threshold(examples, spans, odds)
    assert tuned["threshold"] < -2.0 and tuned["f1"] == 50.0 and tuned["exact"] == 50.0
    applied = {q: "" if odds[q] > tuned["threshold"] else spans[q] for q in spans}
    assert score(examples, applied)["f1"] == tuned["f1"]


def test_tuned_threshold_answers_tied_null_odds_together():
    from qa_dist import tune_threshold

    examples = [_ex("r", "c", ["Paris"]), _ex("u", "c", [], impossible=True), _ex("s", "c", ["Rome"])]
    spans, odds = {"r": "Paris", "u": "x", "s": "Rome"}, {"r": 0.5, "u": 0.5, "s": 0.5}
    tuned = tune_threshold(examples, spans, odds)
    # Answering the tied three scores 2 of 3; abstaining on all 1 of 3. (The official search counts
    # "r" alone, 2 of 3 too, but its threshold 0.5 then answers all three.)
    assert tuned["threshold"] == 0.5 and tuned["f1"] == pytest.approx(200 / 3)


def test_tuned_threshold_chinese():
    from qa_dist import tune_threshold

    examples = [_ex("a", "中文的上下文", ["中文"]), _ex("b", "中文的上下文", [], impossible=True)]
    tuned = tune_threshold(examples, {"a": "中文", "b": "上下"}, {"a": -1.0, "b": 2.0})
    assert tuned["threshold"] == -1.0 and tuned["F1"] == 100.0 and tuned["HasAns_total"] == 1


@pytest.mark.slow
def test_tuned_threshold_on_squad_v2_dev_reaches_the_official_best_f1():
    import random

    from conftest import SQUAD20_DEV

    from qa_dist import load_examples, tune_threshold

    examples = load_examples(str(SQUAD20_DEV))
    rng = random.Random(0)
    spans, odds = {}, {}
    for i, ex in enumerate(examples):
        # An unanswerable question's span never normalises to "": the official search counts any
        # non-empty text as answered (-1) where the metric would score "The ." as an abstention.
        gold = ex["answers"]["text"][0] if ex["answers"]["text"] else "zzz"
        spans[ex["id"]] = [gold, gold + " and more", ex["context"][:20] + " zzz"][i % 3]
        # Odds that lean the right way, with noise: tuning has something to find.
        odds[ex["id"]] = rng.gauss(1.0 if ex["is_impossible"] else -1.0, 2.0)
    official = score(examples, spans, na_probs=odds)
    tuned = tune_threshold(examples, spans, odds)
    assert tuned["f1"] == pytest.approx(official["best_f1"], rel=1e-12)
    assert tuned["threshold"] == official["best_f1_thresh"]
    assert tuned["f1"] > score(examples, spans)["f1"]  # better than answering everything


def test_numbers_too_long_to_convert_are_one_line(score_files, capsys, tmp_path):
    data, write = score_files
    digits = "9" * 5000  # past Python's int max str digits (4300): a ValueError inside json
    preds = write("predictions.json", '{"a": "France", "b": ' + digits + "}")
    line = _one_error_line(*_score_cli(capsys, "--data", data, "--predictions", preds)[::2])
    assert "predictions.json" in line and "digits" in line
    good = write("good.json", {"a": "France", "b": ""})
    odds = write("null_odds.json", '{"a": -1.0, "b": ' + "9" * 400 + "}")  # an int float() cannot hold
    line = _one_error_line(*_score_cli(capsys, "--data", data, "--predictions", good, "--na-probs", odds)[::2])
    assert "null_odds.json" in line and "'b'" in line and "too large" in line
    bad_data = tmp_path / "digits.jsonl"
    bad_data.write_text(Path(data).read_text().replace('"answer_start": [12]', '"answer_start": [' + digits + "]"))
    line = _one_error_line(*_score_cli(capsys, "--data", str(bad_data), "--predictions", good)[::2])
    assert "digits.jsonl" in line and "line 1" in line and "digits" in line


def test_a_byte_order_mark_is_accepted_in_predictions_and_null_odds(score_files, capsys):
    data, write = score_files
    bom = "\ufeff"  # what Windows editors put before the JSON; data files accept it too
    preds = write("predictions.json", bom + json.dumps({"a": "France", "b": ""}))
    odds = write("null_odds.json", bom + json.dumps({"a": -1.0, "b": 2.0}))
    code, out, err = _score_cli(capsys, "--data", data, "--predictions", preds, "--na-probs", odds)
    assert code == 0, err
    assert json.loads(out)["exact"] == 100.0
