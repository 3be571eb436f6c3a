"""DuReader 2.0 (raw and preprocessed JSONL) and the SQuAD-format DuReader-robust/checklist files."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qa_dist import DataError, load_examples, score
from qa_dist.data import load_source

REPO = Path(__file__).resolve().parents[2]
KEYS = {"id", "title", "context", "question", "answers", "is_impossible"}


def _doc(title, paragraphs, *, selected=False, most_related=None, segmented=None, rank=0):
    """A DuReader document; ``segmented`` defaults to one token per character (which joins back)."""
    doc = {
        "is_selected": selected,
        "title": title,
        "segmented_title": list(title),
        "paragraphs": paragraphs,
        "segmented_paragraphs": segmented or [list(p) for p in paragraphs],
        "bs_rank_pos": rank,
    }
    if most_related is not None:
        doc["most_related_para"] = most_related
    return doc


def _preprocessed(qid, question, documents, answers, fake, answer_docs, spans):
    return {
        "question_id": qid,
        "question": question,
        "segmented_question": list(question),
        "question_type": "ENTITY",
        "fact_or_opinion": "FACT",
        "documents": documents,
        "answers": answers,
        "segmented_answers": [list(a) for a in answers],
        "answer_docs": answer_docs,
        "answer_spans": spans,
        "fake_answers": fake,
        "match_scores": [0.9] if fake else [],
        "yesno_answers": [],
        "entity_answers": [[]],
    }


def _raw(qid, question, documents, answers):
    return {
        "question_id": qid,
        "question": question,
        "question_type": "DESCRIPTION",
        "documents": documents,
        "answers": answers,
        "yesno_answers": [],
    }


# Preprocessed, the segmented paragraph joins back: the span (the second 长城) places the answer.
JOINS = _preprocessed(
    1001,
    "最有名的是哪段长城",
    [
        _doc("天气", ["今天天气很好。"], most_related=0),
        _doc(
            "长城",
            ["长城是古代的防御工程。", "北京的长城很长，八达岭长城最有名。"],
            selected=True,
            most_related=1,
            segmented=[
                ["长城", "是", "古代", "的", "防御", "工程", "。"],
                ["北京", "的", "长城", "很", "长", "，", "八达岭", "长城", "最", "有名", "。"],
            ],
            rank=1,
        ),
    ],
    answers=["八达岭长城最有名。", "长城", "长城是中国的象征"],
    fake=["长城"],
    answer_docs=[1],
    spans=[[7, 7]],
)
# Preprocessed, the segmentation dropped a space, so it does not join back: first occurrence.
NO_JOIN = _preprocessed(
    1002,
    "Python 是什么",
    [
        _doc(
            "Python",
            ["编程语言很多，Python 是一种编程语言。"],
            selected=True,
            most_related=0,
            segmented=[["编程", "语言", "很多", "，", "Python", "是", "一种", "编程", "语言", "。"]],
        )
    ],
    answers=["一种编程语言"],
    fake=["编程语言"],
    answer_docs=[0],
    spans=[[7, 8]],
)
# Raw: the selected document lacks every reference; the next document in reading order (the
# non-selected ones, in order) that has one verbatim gives the context.
RAW_LATER = _raw(
    1003,
    "长江有多长",
    [
        _doc("甲", ["无关的内容。"]),
        _doc("乙", ["黄河是中国第二长河。"], selected=True),
        _doc("丙", ["这一段没有。", "长江全长6300公里，是中国第一长河。"]),
        _doc("丁", ["长江全长6300公里。"]),
    ],
    answers=["长江是中国第一长河，全长约6300公里。", "6300公里"],
)
# Raw: a non-selected document comes first, but the selected one containing the answer wins.
RAW_SELECTED = _raw(
    1004,
    "珠穆朗玛峰有多高",
    [
        _doc("一", ["珠峰高8848米。"]),
        _doc("二", ["珠穆朗玛峰海拔8848米，是世界最高峰。"], selected=True),
    ],
    answers=["8848米"],
)
UNLOCATABLE_FAKE = _preprocessed(
    1005, "没有答案吗", [_doc("空", ["什么也没有。"], most_related=0)], ["有的"], [], [], []
)
UNLOCATABLE_RAW = _raw(1006, "答案在哪里", [_doc("无", ["这里没有。"], selected=True)], ["不在这里的答案"])
LABELLED = [JOINS, NO_JOIN, RAW_LATER, RAW_SELECTED, UNLOCATABLE_FAKE, UNLOCATABLE_RAW]

# Test-set records: no answers.
TEST_RELATED = {
    "question_id": 2001,
    "question": "故宫在哪里",
    "question_type": "ENTITY",
    "documents": [
        {"title": "没有", "paragraphs": ["故宫在北京市中心。"]},
        {"title": "故宫", "paragraphs": ["第一段。", "故宫位于北京中轴线的中心。"], "most_related_para": 1},
    ],
}
TEST_OVERLAP = {
    "question_id": 2002,
    "question": "故宫有多少个房间",
    "documents": [
        {"title": "甲", "paragraphs": ["故宫在北京。"]},
        {"title": "乙", "paragraphs": ["故宫有很多房间，据说有九千多个。"]},
        {"title": "丙", "paragraphs": ["房间很多个，故宫有多大？"]},
    ],
}


def _write(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def train_file(tmp_path):
    return _write(tmp_path / "dureader_train.jsonl", LABELLED)


def test_preprocessed_and_raw_records_load(train_file):
    loaded = load_source(str(train_file))
    examples = {e["id"]: e for e in loaded.examples}
    assert list(examples) == ["1001", "1002", "1003", "1004"]
    assert all(set(e) == KEYS and not e["is_impossible"] for e in examples.values())

    joins = examples["1001"]
    assert joins["context"] == "北京的长城很长，八达岭长城最有名。" and joins["title"] == "长城"
    assert joins["question"] == "最有名的是哪段长城"
    # From answer_spans (the second 长城), not the first occurrence (3); the references after it,
    # deduplicated: one occurs (its first occurrence), one is free-written (-1, scoring only).
    assert joins["answers"] == {
        "text": ["长城", "八达岭长城最有名。", "长城是中国的象征"],
        "answer_start": [11, 8, -1],
    }

    no_join = examples["1002"]
    assert no_join["context"] == "编程语言很多，Python 是一种编程语言。"
    assert no_join["answers"] == {"text": ["编程语言", "一种编程语言"], "answer_start": [0, 15]}

    later = examples["1003"]
    assert later["context"] == "长江全长6300公里，是中国第一长河。" and later["title"] == "丙"
    assert later["answers"] == {"text": ["6300公里", "长江是中国第一长河，全长约6300公里。"], "answer_start": [4, -1]}

    selected = examples["1004"]
    assert selected["title"] == "二" and selected["answers"] == {"text": ["8848米"], "answer_start": [7]}

    for e in examples.values():
        for text, start in zip(e["answers"]["text"], e["answers"]["answer_start"], strict=True):
            assert start == -1 or e["context"][start : start + len(text)] == text

    report = loaded.report
    assert report.skipped == ["1005", "1006"]
    assert report.examples == 4 and not report.relocations
    assert "skipped 2 DuReader questions" in report.summary() and "'1005'" in report.summary()


def test_unlocatable_is_an_error_with_strict_but_free_references_are_not(train_file, tmp_path):
    with pytest.raises(DataError, match=r"dureader_train.jsonl: question '1005' \(line 5\): no answer can be located"):
        load_examples(train_file, strict=True)
    raw_only = _write(tmp_path / "raw.jsonl", [RAW_LATER, UNLOCATABLE_RAW])
    with pytest.raises(DataError, match=r"question '1006' \(line 2\): no answer can be located .*verbatim"):
        load_examples(raw_only, strict=True)
    # Free-written references that do not occur are kept even with strict (DuReader's references
    # are summaries, unlike CMRC2018's extra answers).
    located = _write(tmp_path / "located.jsonl", LABELLED[:4])
    loaded = load_source(str(located), strict=True)
    assert len(loaded.examples) == 4
    assert loaded.report.unlocated_references == ["1001", "1003"]


def test_nothing_locatable_names_the_first_question(tmp_path):
    path = _write(tmp_path / "none.jsonl", [UNLOCATABLE_FAKE, UNLOCATABLE_RAW])
    with pytest.raises(DataError, match=r"none.jsonl: contains no usable questions: all 2 DuReader .*'1005'"):
        load_examples(path)


def test_test_records_load_unlabelled(tmp_path):
    path = _write(tmp_path / "test.jsonl", [TEST_RELATED, TEST_OVERLAP])
    examples = load_examples(path, labelled=False)
    assert [e["id"] for e in examples] == ["2001", "2002"]
    assert all(e["answers"] == {"text": [], "answer_start": []} and not e["is_impossible"] for e in examples)
    # most_related_para of the first document that has one.
    assert examples[0]["context"] == "故宫位于北京中轴线的中心。" and examples[0]["title"] == "故宫"
    # No most_related_para: the most distinct question characters shared; ties go to the first.
    assert examples[1]["context"] == "故宫有很多房间，据说有九千多个。" and examples[1]["title"] == "乙"
    with pytest.raises(DataError, match=r"test.jsonl: question '2001' \(line 1\): DuReader record has no 'answers'"):
        load_examples(path)


def test_labelled_false_keeps_unlocatable_questions_to_predict_on(train_file):
    loaded = load_source(str(train_file), labelled=False)
    examples = {e["id"]: e for e in loaded.examples}
    assert list(examples) == ["1001", "1002", "1003", "1004", "1005", "1006"]
    assert examples["1005"]["answers"]["text"] == [] and examples["1005"]["context"] == "什么也没有。"
    assert examples["1001"]["answers"]["answer_start"][0] == 11
    assert not loaded.report.skipped


@pytest.mark.parametrize("name", ["dev.json", "dev.json.gz", "dev.jsonl.gz"])
def test_json_files_that_are_jsonl_are_read(tmp_path, name):
    """DuReader ships JSON Lines in files named .json."""
    path = _write(tmp_path / name, LABELLED)
    assert [e["id"] for e in load_examples(path)] == ["1001", "1002", "1003", "1004"]


def test_a_folder_of_dureader_files_says_to_give_the_file(tmp_path):
    folder = tmp_path / "dureader"
    folder.mkdir()
    _write(folder / "train.jsonl", LABELLED)
    with pytest.raises(DataError, match=r"DuReader records are read from a file, not a dataset folder"):
        load_examples(folder)


def test_one_record_json_file(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(JOINS, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [e["id"] for e in load_examples(path)] == ["1001"]


def test_mixed_records_are_an_error(tmp_path):
    squad = {"id": "s1", "question": "q", "context": "长城很长。", "answers": {"text": ["长城"], "answer_start": [0]}}
    path = _write(tmp_path / "mixed.jsonl", [JOINS, squad])
    with pytest.raises(DataError, match=r"mixed.jsonl: mixes DuReader records .*line 1.* SQuAD-style records .*line 2"):
        load_examples(path)
    path = _write(tmp_path / "mixed2.jsonl", [squad, RAW_LATER])
    with pytest.raises(DataError, match=r"mixes DuReader records .*line 2.*line 1"):
        load_examples(path)


def test_malformed_dureader_records_are_named(tmp_path):
    broken = dict(RAW_LATER)
    del broken["documents"]
    with pytest.raises(DataError, match=r"question '1003' \(line 1\): DuReader record is missing key 'documents'"):
        load_examples(_write(tmp_path / "a.jsonl", [broken]))
    bad_doc = {**JOINS, "answer_docs": [5]}
    with pytest.raises(DataError, match=r"question '1001' \(line 1\): answer_docs\[0\] 5 is out of range"):
        load_examples(_write(tmp_path / "b.jsonl", [bad_doc]))
    no_question = dict(RAW_SELECTED)
    del no_question["question"]
    with pytest.raises(DataError, match=r"question '1004' \(line 1\): missing key 'question'"):
        load_examples(_write(tmp_path / "c.jsonl", [no_question]))
    duplicate = _write(tmp_path / "d.jsonl", [RAW_SELECTED, {**RAW_SELECTED, "question_id": "1004"}])
    with pytest.raises(DataError, match=r"question '1004': duplicate id"):
        load_examples(duplicate)


def test_score_with_cmrc_metric_uses_every_reference(train_file):
    examples = load_examples(train_file)
    predictions = {
        "1001": "长城是中国的象征",  # a free-written reference: full marks
        "1002": "编程语言",
        "1003": "长江是中国第一长河，全长约6300公里。",
        "1004": "8848",
    }
    result = score(examples, predictions, metric="cmrc")
    assert result["TOTAL"] == 4 and result["SKIP"] == 0
    assert result["EM"] == pytest.approx(75.0)
    assert 75.0 < result["F1"] < 100.0


def test_prepare_through_the_cli_builds_windows_and_counts_skips(train_file, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qa_dist",
            "prepare",
            "-q",
            f"data.train={train_file}",
            "model.name_or_path=sample:zh-char-tokenizer",
            "data.max_length=32",
            "data.doc_stride=8",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "train built:" in done.stdout and "examples 4" in done.stdout
    windows = int(done.stdout.split("windows ")[1].split()[0].replace(",", ""))
    assert windows >= 4
    assert "skipped 2 DuReader questions" in done.stdout and "(first: question '1005')" in done.stdout


def test_dureader_robust_and_checklist_are_nested_squad_files(tmp_path):
    """DuReader-robust and DuReader-checklist ship SQuAD-format JSON; checklist adds unanswerable
    questions (is_impossible true, no answers) and extra keys such as ``type``."""
    data = {
        "data": [
            {
                "title": "",
                "paragraphs": [
                    {
                        "context": "爬行垫根据中间材料的不同可以分为XPE爬行垫、EPE爬行垫和PVC爬行垫。",
                        "qas": [
                            {
                                "id": "robust-1",
                                "question": "爬行垫什么材质的好",
                                "answers": [{"text": "XPE爬行垫", "answer_start": 16}],
                            },
                            {
                                "id": "checklist-1",
                                "question": "爬行垫多少钱",
                                "type": "no-answer",
                                "is_impossible": True,
                                "answers": [],
                            },
                            {
                                "id": "checklist-2",
                                "question": "爬行垫有哪几种",
                                "type": "in-domain",
                                "is_impossible": False,
                                "answers": [{"text": "XPE爬行垫、EPE爬行垫和PVC爬行垫", "answer_start": 16}],
                            },
                        ],
                    }
                ],
            }
        ]
    }
    path = tmp_path / "dureader_checklist.dev.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    examples = load_examples(path)
    assert [e["id"] for e in examples] == ["robust-1", "checklist-1", "checklist-2"]
    assert [e["is_impossible"] for e in examples] == [False, True, False]
    assert examples[0]["answers"] == {"text": ["XPE爬行垫"], "answer_start": [16]}
    assert all(set(e) == KEYS for e in examples)
