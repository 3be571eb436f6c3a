"""Data layer: every supported layout reads to the same flat examples; every bad input is named."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import (
    CMRC_DEV,
    CMRC_TRIAL,
    DRCD_DEV,
    DRCD_TEST,
    SQUAD11_DEV,
    SQUAD11_TRAIN,
    SQUAD20_DEV,
)

from qa_dist import DataError, load_examples
from qa_dist.data import load_source
from qa_dist.data.loading import source_fingerprint

KEYS = {"id", "title", "context", "question", "answers", "is_impossible"}


@pytest.mark.parametrize(
    ("path", "count", "unanswerable"),
    [
        (SQUAD11_DEV, 10_570, 0),
        (SQUAD11_TRAIN, 87_599, 0),
        (SQUAD20_DEV, 11_873, 5_945),
        (CMRC_DEV, 3_219, 0),
        (DRCD_DEV, 3_524, 0),
        (DRCD_TEST, 3_493, 0),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_real_files_load_with_official_counts(path, count, unanswerable):
    examples = load_examples(path)
    assert len(examples) == count
    assert sum(e["is_impossible"] for e in examples) == unanswerable
    assert all(set(e) == KEYS for e in examples)
    for e in examples[:2000]:
        for text, start in zip(e["answers"]["text"], e["answers"]["answer_start"], strict=True):
            assert start == -1 or e["context"][start : start + len(text)] == text


def test_cmrc_dev_misplaced_starts_are_relocated_and_counted():
    loaded = load_source(str(CMRC_DEV))
    assert len(loaded.report.relocations) == 7
    # Free-written extra references (never the first answer) stay for scoring, flagged by -1.
    assert len(loaded.report.unlocated_references) == 193
    assert "relocated 7" in loaded.report.summary()
    by_id = {e["id"]: e for e in loaded.examples}
    fix = loaded.report.relocations[0]
    example = by_id[fix.example_id]
    assert fix.new_start in example["answers"]["answer_start"]
    with pytest.raises(
        DataError,
        match=r"cmrc2018_dev.json.gz: question 'DEV_6_QUERY_2' .*answer 1 text .* does not occur",
    ):
        load_source(str(CMRC_DEV), strict=True)


def test_cmrc_trial_has_an_empty_question_and_says_which():
    with pytest.raises(DataError, match=r"cmrc2018_trial.json.gz: question 'TRIAL_776_QUERY_4'.*question is empty"):
        load_examples(CMRC_TRIAL)


def test_drcd_answers_with_extra_id_are_read():
    raw = json.loads(gzip.decompress(DRCD_DEV.read_bytes()))
    assert "id" in raw["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]
    examples = load_examples(DRCD_DEV)
    assert examples[0]["title"] == raw["data"][0]["title"]


def _flat_records():
    context = "The cat sat on the mat. The dog did not."
    return [
        {
            "id": "a",
            "title": "Pets",
            "question": "Where did the cat sit?",
            "context": context,
            "answers": {"text": ["on the mat"], "answer_start": [12]},
        },
        {
            "id": "b",
            "question": "What did the bird do?",
            "context": context,
            "answers": {"text": [], "answer_start": []},
        },
        {
            "id": "c",
            "question": "Who did not?",
            "context": context,
            "answers": [{"text": "The dog", "answer_start": 24}],
        },
    ]


def test_flat_json_jsonl_nested_and_gzip_read_the_same(tmp_path):
    records = _flat_records()
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    with gzip.open(tmp_path / "lines.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    nested = {
        "version": "v2.0",
        "data": [
            {
                "title": "Pets",
                "paragraphs": [
                    {
                        "context": records[0]["context"],
                        "qas": [
                            {
                                "id": "a",
                                "question": records[0]["question"],
                                "answers": [{"text": "on the mat", "answer_start": 12}],
                                "is_impossible": False,
                            },
                            {
                                "id": "b",
                                "question": records[1]["question"],
                                "answers": [],
                                "is_impossible": True,
                            },
                            {
                                "id": "c",
                                "question": records[2]["question"],
                                "answers": [{"text": "The dog", "answer_start": 24}],
                            },
                        ],
                    }
                ],
            }
        ],
    }
    with gzip.open(tmp_path / "nested.json.gz", "wt") as f:
        json.dump(nested, f)
    results = [
        load_examples(tmp_path / name) for name in ("list.json", "wrapped.json", "lines.jsonl", "lines.jsonl.gz")
    ]
    for other in results[1:]:
        assert other == results[0]
    flat = results[0]
    assert [e["is_impossible"] for e in flat] == [False, True, False]
    assert flat[2]["answers"] == {"text": ["The dog"], "answer_start": [24]}
    nested_examples = load_examples(tmp_path / "nested.json.gz")
    assert [e["answers"] for e in nested_examples] == [e["answers"] for e in flat]
    assert nested_examples[1]["title"] == "Pets"


def test_local_dataset_folder_goes_through_datasets(tmp_path):
    """The Hugging Face path (datasets.load_dataset), exercised offline with local files."""
    import datasets

    folder = tmp_path / "my_squad"
    folder.mkdir()
    records = _flat_records()
    (folder / "train.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    **r,
                    "answers": r["answers"]
                    if isinstance(r["answers"], dict)
                    else {
                        "text": [a["text"] for a in r["answers"]],
                        "answer_start": [a["answer_start"] for a in r["answers"]],
                    },
                }
            )
            for r in records
        )
    )
    (folder / "validation.jsonl").write_text(json.dumps({**records[0], "id": "v"}))
    train = load_examples(folder, split="train")
    assert [e["id"] for e in train] == ["a", "b", "c"]
    assert [e["is_impossible"] for e in train] == [False, True, False]
    assert [e["id"] for e in load_examples(folder, split="validation")] == ["v"]
    # The cache key reads the dataset's fingerprint without validating every row.
    assert source_fingerprint(str(folder), "train") == load_source(str(folder), "train").fingerprint
    assert source_fingerprint(str(folder), "train") == source_fingerprint(str(folder), "train")
    assert source_fingerprint(str(folder), "train") != source_fingerprint(str(folder), "validation")

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{**r, "title": r.get("title", "")} for r in load_examples(folder)]).save_to_disk(
        str(saved)
    )
    assert [e["id"] for e in load_examples(saved)] == ["a", "b", "c"]


def _write(tmp_path, obj, name="bad.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def _with(record_changes=None, drop=None, extra=None):
    records = _flat_records()
    if record_changes:
        records[0] = {**records[0], **record_changes}
    if drop:
        records[0] = {k: v for k, v in records[0].items() if k != drop}
    return records + (extra or [])


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (_with(drop="context"), r"question 'a'.*missing key 'context'"),
        (_with(drop="answers"), r"question 'a'.*missing key 'answers'"),
        (_with({"question": 7}), r"question 'a'.*question must be a string, got int"),
        (_with({"id": 1.5}), r"id must be a string, got float"),
        (_with({"answers": "on the mat"}), r"question 'a'.*answers must be a list or a mapping"),
        (
            _with({"answers": {"text": ["on the mat"], "answer_start": ["12"]}}),
            r"question 'a'.*answer_start must be an integer, got str",
        ),
        (
            _with({"answers": {"text": ["x", "y"], "answer_start": [1]}}),
            r"question 'a'.*2 texts but 1 answer_start",
        ),
        (_with({"context": "   "}), r"question 'a'.*context is empty"),
        (_with({"question": ""}), r"question 'a'.*question is empty"),
        (
            _with({"is_impossible": False, "answers": []}),
            r"question 'a'.*answerable question has no answer",
        ),
        (
            _with({"is_impossible": True}),
            r"question 'a'.*unanswerable \(is_impossible\) but has answers",
        ),
        (_with({"is_impossible": "no"}), r"question 'a'.*is_impossible must be true or false"),
        (
            _with({"answers": {"text": ["a unicorn"], "answer_start": [3]}}),
            r"question 'a'.*'a unicorn' does not occur in the context",
        ),
        (
            _with(extra=[{**_flat_records()[0]}]),
            r"question 'a': duplicate id \(questions 0 and 3\)",
        ),
        ([], r"contains no questions"),
        ({"version": "1"}, r"not a SQuAD-format file"),
    ],
)
def test_bad_records_name_the_file_and_the_question(tmp_path, records, message):
    path = _write(tmp_path, records)
    with pytest.raises(DataError, match=message) as info:
        load_examples(path)
    assert str(path) in str(info.value)


def test_nested_v1_without_answers_is_an_error(tmp_path):
    nested = {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Some text.",
                        "qas": [{"id": "q1", "question": "What?", "answers": []}],
                    }
                ],
            }
        ]
    }
    with pytest.raises(
        DataError,
        match=r"question 'q1' \(data\[0\].paragraphs\[0\].qas\[0\]\): answerable question has no answer",
    ):
        load_examples(_write(tmp_path, nested))
    with pytest.raises(DataError, match=r"data\[0\].paragraphs\[0\] is missing key 'qas'"):
        load_examples(_write(tmp_path, {"data": [{"paragraphs": [{"context": "x"}]}]}))


def test_malformed_json_reports_line_and_column(tmp_path):
    path = _write(tmp_path, '{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}')
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 3, column 19"):
        load_examples(path)
    lines = _write(tmp_path, json.dumps(_flat_records()[0]) + "\n{oops\n", name="bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl: malformed JSON at line 2, column 2"):
        load_examples(lines)


def test_not_utf8_and_missing_and_bad_gzip(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(_flat_records()).replace("cat", "caf\u00e9").encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.json: not UTF-8 \(invalid byte 0xe9 at line 1\)"):
        load_examples(path)
    with pytest.raises(DataError, match=r"nope.json: file not found"):
        load_examples(tmp_path / "nope.json")
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"broken.json.gz: not a valid gzip file"):
        load_examples(broken)


def test_relocation_to_nearest_occurrence_and_strict_mode(tmp_path):
    context = "red apple, green apple, blue apple"  # 'apple' at 4, 17 and 29
    record = {
        "id": "r",
        "question": "Which apple?",
        "context": context,
        "answers": {"text": ["apple"], "answer_start": [19]},
    }
    path = _write(tmp_path, [record])
    loaded = load_source(str(path))
    assert loaded.examples[0]["answers"]["answer_start"] == [17]
    assert [(r.example_id, r.given_start, r.new_start) for r in loaded.report.relocations] == [("r", 19, 17)]
    assert "relocated 1 answer_start" in loaded.report.summary()
    with pytest.raises(DataError, match=r"question 'r'.*not at answer_start 19 \(nearest occurrence at 17; strict"):
        load_source(str(path), strict=True)


# -- issue 14: inputs that used to fail with a traceback or be misread --------------------------


def test_jsonl_keeps_line_separators_that_are_valid_inside_json_strings(tmp_path):
    """U+2028, U+2029 and U+0085 are valid raw inside a JSON string; str.splitlines() split the
    record there and called the file malformed."""
    records = _flat_records()
    records[0]["context"] = "The cat sat\u2028on the mat.\u0085 The dog\u2029 did not."
    records[0]["answers"] = {"text": ["on the mat"], "answer_start": [12]}
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    assert "\u2028" in lines[0] and "\u0085" in lines[0]
    path = tmp_path / "separators.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8", newline="")
    examples = load_examples(path)
    assert [e["id"] for e in examples] == ["a", "b", "c"]
    assert examples[0]["context"] == records[0]["context"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n\n" + "{oops\u2028\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: malformed JSON at line 3, column 2"):
        load_examples(bad)


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl", "deep.json.gz"])
def test_deeply_nested_json_is_a_data_error(tmp_path, name):
    depth = 200_000
    text = json.dumps(_flat_records()[0]) + "\n" + "[" * depth + "]" * depth + "\n"
    if not name.endswith(".jsonl"):
        text = '{"data": ' + "[" * depth + "]" * depth + "}"
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    where = r" at line 2" if name.endswith(".jsonl") else ""
    with pytest.raises(DataError, match=rf"{name}: JSON nested too deeply to read{where}"):
        load_examples(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"context": "The cat sat on the mat. \ud800 The dog did not."},
            r"context has a lone surrogate U\+D800 at character 24",
        ),
        ({"question": "Where\udfff?"}, r"question has a lone surrogate U\+DFFF"),
        ({"title": "\udbff"}, r"title has a lone surrogate"),
        (
            {"answers": [{"text": "on the mat", "answer_start": 12}, {"text": "x\ud800", "answer_start": 0}]},
            r"answer 1 text has a lone surrogate",
        ),
    ],
)
def test_lone_surrogate_is_rejected_naming_the_question(tmp_path, change, message):
    path = _write(tmp_path, _with(change))  # json.dumps escapes it: "\ud800", as such files have it
    assert "\\ud" in path.read_text() or "\\udfff" in path.read_text()
    with pytest.raises(DataError, match=rf"bad.json: question 'a' \(record 0\): {message}"):
        load_examples(path)


def test_lone_surrogate_in_an_id_is_rejected(tmp_path):
    path = _write(tmp_path, _with({"id": "a\ud800"}), name="bad.jsonl")
    path.write_text("\n".join(json.dumps(r) for r in _with({"id": "a\ud800"})))
    with pytest.raises(DataError, match=r"bad.jsonl \(line 1\): id has a lone surrogate"):
        load_examples(path)


@pytest.mark.parametrize("invisible", ["\u200b", "\u200c\u200d", "\ufeff", "\u2060", " \u200b\u3000\u200b "])
def test_answer_of_zero_width_characters_is_empty(tmp_path, invisible):
    context = f"The cat sat{invisible}on the mat."
    record = {
        "id": "zw",
        "question": "Where?",
        "context": context,
        "answers": {"text": [invisible], "answer_start": [11]},
    }
    with pytest.raises(DataError, match=r"bad.json: question 'zw' \(record 0\): answer 0 text is empty"):
        load_examples(_write(tmp_path, [record]))
    with pytest.raises(DataError, match=r"question 'zw' \(record 0\): question is empty"):
        load_examples(
            _write(tmp_path, [{**record, "question": invisible, "answers": {"text": ["cat"], "answer_start": [4]}}])
        )
    # Zero-width characters inside a real answer are kept.
    inside = {**record, "answers": {"text": [f"sat{invisible}on"], "answer_start": [8]}}
    assert load_examples(_write(tmp_path, [inside]))[0]["answers"]["text"] == [f"sat{invisible}on"]


def _jsonl_record(record: dict) -> str:
    answers = record["answers"]
    if isinstance(answers, list):
        answers = {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}
    return json.dumps({**record, "title": record.get("title", ""), "answers": answers})


def test_data_folder_of_mixed_files_is_a_clear_error(tmp_path):
    records = _flat_records()
    # A .csv beside the .jsonl: datasets read only the .jsonl and dropped the other file silently.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.jsonl").write_text("\n".join(_jsonl_record(r) for r in records))
    (mixed / "more.csv").write_text("id,question,context\nz,Why?,Because.\n")
    (mixed / "README.md").write_text("notes are not data")
    with pytest.raises(
        DataError, match=r"mixed: data folder mixes kinds of files \(csv: more.csv; json: train.jsonl\)"
    ):
        load_examples(mixed)
    # Files of one kind whose columns differ: a DatasetGenerationError traceback before.
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    (ragged / "a.jsonl").write_text("\n".join(_jsonl_record(r) for r in records))
    (ragged / "b.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"ragged \[train\]: cannot read these files as one dataset: Couldn't cast"):
        load_examples(ragged)
    # One kind of file, README aside: still read.
    (mixed / "more.csv").unlink()
    assert [e["id"] for e in load_examples(mixed)] == ["a", "b", "c"]


def test_deeply_nested_json_in_a_data_folder_is_a_data_error_not_a_crash(tmp_path):
    """datasets reads a folder with pyarrow's JSON reader, which crashed the process (SIGSEGV) on
    this; through the command line, so that the old crash fails the test instead of the run."""
    import subprocess
    import sys

    folder = tmp_path / "folder"
    folder.mkdir()
    depth = 100_000
    (folder / "train.jsonl").write_text('{"id": ' + "[" * depth + "]" * depth + "}\n")
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "score", "--data", str(folder), "--predictions", str(folder / "none.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert errors == [
        f"qa-dist: error: {folder / 'train.jsonl'}: JSON nested too deeply to read (no SQuAD-format file nests so deep)"
    ]
    assert "Traceback" not in done.stderr
