"""stream_source: the examples of load_source in bounded batches, with its errors, in bounded memory."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest
from conftest import CMRC_DEV, CMRC_TRIAL, DRCD_DEV, DRCD_TEST, SQUAD11_DEV, SQUAD11_TRAIN, SQUAD20_DEV

from qa_dist import DataError
from qa_dist.data import StreamedSource, load_source, sample_path, stream_source
from qa_dist.data.loading import SAMPLES, source_fingerprint

SIZES = (1, 7, 1000)


def _record(i: int, **changes) -> dict:
    record = {
        "id": f"q{i}",
        "title": "Pets",
        "context": f"The cat sat on the mat, {i} times.",
        "question": "Where did the cat sit?",
        "answers": {"text": ["on the mat"], "answer_start": [12]},
    }
    return {**record, **changes}


def _dureader(qid: int, **changes) -> dict:
    record = {
        "question_id": qid,
        "question": "长江有多长",
        "documents": [{"is_selected": True, "title": "长江", "paragraphs": ["长江全长6300公里。"]}],
        "answers": ["6300公里"],
    }
    return {**record, **changes}


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _nested(records, per_paragraph: int = 3) -> dict:
    """Nested SQuAD holding ``records`` (their titles dropped: one article per 10 paragraphs)."""
    articles = []
    for start in range(0, len(records), per_paragraph):
        group = records[start : start + per_paragraph]
        qas = [{k: v for k, v in r.items() if k not in ("context", "title")} for r in group]
        paragraph = {"context": group[0]["context"], "qas": qas}
        if start % (10 * per_paragraph) == 0:
            articles.append({"title": f"T{start}", "paragraphs": []})
        articles[-1]["paragraphs"].append(paragraph)
    return {"version": "v2.0", "data": articles}


def _assert_streams_as_loaded(source: str, sizes=SIZES, **options) -> StreamedSource:
    loaded = load_source(source, **options)
    streamed = stream_source(source, **options)
    assert streamed.fingerprint == loaded.fingerprint == source_fingerprint(source)
    assert streamed.description == loaded.description
    for size in sizes:
        batches = list(streamed.batches(size))
        assert batches and all(len(b) == size for b in batches[:-1]) and 1 <= len(batches[-1]) <= size
        assert [e for b in batches for e in b] == loaded.examples
        assert streamed.report.summary() == loaded.report.summary()
        assert streamed.report == loaded.report
    return streamed


def _until_error(streamed: StreamedSource, size: int) -> tuple[list[dict], str]:
    """The examples given before batches() raised, and its message."""
    given: list[dict] = []
    with pytest.raises(DataError) as caught:
        for batch in streamed.batches(size):
            assert len(batch) == size  # a short batch is the last: nothing raises after it
            given += batch
    message = str(caught.value)
    assert "\n" not in message
    return given, message


def _load_error(path, **options) -> str:
    with pytest.raises(DataError) as caught:
        load_source(str(path), **options)
    return str(caught.value)


def _given_before(good: int, size: int) -> int:
    """How many examples a stream gives before raising at the record after ``good`` valid ones: the
    full batches, a batch once the next example is read (so the last full one is held)."""
    return (good - 1) // size * size if good else 0


# -- the same examples as load_source ---------------------------------------------------------


REAL = [
    pytest.param(SQUAD11_TRAIN, marks=pytest.mark.slow, id="squad11-train"),
    pytest.param(SQUAD11_DEV, id="squad11-dev"),
    pytest.param(SQUAD20_DEV, id="squad20-dev"),
    pytest.param(CMRC_DEV, id="cmrc-dev"),
    pytest.param(DRCD_DEV, id="drcd-dev"),
    pytest.param(DRCD_TEST, id="drcd-test"),
]


@pytest.mark.parametrize("path", REAL)
def test_real_files_stream_as_they_load(path):
    if not path.exists():
        pytest.skip(f"{path}: the real data sets are expected in ../shared/data (see SOURCES.md)")
    streamed = _assert_streams_as_loaded(str(path))
    # And in the order of the file itself, read whole by json.
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    expected = [(qa["id"], p["context"]) for a in data for p in a["paragraphs"] for qa in p["qas"]]
    assert [(e["id"], e["context"]) for b in streamed.batches(1000) for e in b] == [(str(i), c) for i, c in expected]


def test_a_real_file_with_a_bad_question_gives_the_batches_before_it():
    if not CMRC_TRIAL.exists():
        pytest.skip(f"{CMRC_TRIAL}: the real data sets are expected in ../shared/data (see SOURCES.md)")
    with gzip.open(CMRC_TRIAL, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    ids = [qa["id"] for a in data for p in a["paragraphs"] for qa in p["qas"]]
    bad = ids.index("TRIAL_776_QUERY_4")  # its question is empty
    for size in SIZES:
        given, message = _until_error(stream_source(str(CMRC_TRIAL)), size)
        assert message == _load_error(CMRC_TRIAL)
        assert "question 'TRIAL_776_QUERY_4' (data[188].paragraphs[0].qas[4]): question is empty" in message
        assert [e["id"] for e in given] == ids[: _given_before(bad, size)]


@pytest.mark.parametrize("name", sorted(name for name in SAMPLES if name != "zh-char-tokenizer"))
def test_shipped_samples_stream_as_they_load(name):
    _assert_streams_as_loaded(f"sample:{name}")
    assert stream_source(f"sample:{name}").description == str(sample_path(name))


def _variants(tmp_path) -> dict[str, bytes]:
    records = [_record(i) for i in range(40)]
    records[3] = _record(3, answers={"text": [], "answer_start": []}, is_impossible=True)
    records[5] = _record(5, answers=[{"text": "on the mat", "answer_start": 11}])  # relocated
    lines = _jsonl(records)
    nested = _nested(records)
    shuffled = {"data": [{"paragraphs": a["paragraphs"], "title": a["title"]} for a in nested["data"]], "v": 1}
    dureader = _jsonl([_dureader(i) for i in range(12)] + [_dureader(99, answers=["nowhere"])])  # one skipped
    return {
        "lines.jsonl": lines.encode(),
        "lines-crlf.jsonl": lines.replace("\n", "\r\n\r\n").encode(),
        "lines.jsonl.gz": gzip.compress(lines.encode()),
        "bom.jsonl": b"\xef\xbb\xbf" + lines.encode(),
        "list.json": json.dumps(records).encode(),
        "wrapped.json": json.dumps({"data": records}, indent=1).encode(),
        "wrapped.json.gz": gzip.compress(json.dumps({"data": records}).encode()),
        "nested.json": json.dumps(nested).encode(),
        "nested-pretty.json": json.dumps(nested, indent=4).encode(),
        "nested.json.gz": gzip.compress(json.dumps(nested).encode()) + gzip.compress(b"  \n"),
        "nested-key-order.json": json.dumps(shuffled).encode(),
        "dureader.jsonl": dureader.encode(),
        "dureader.json": dureader.encode(),  # DuReader ships JSON Lines in .json files
        "dureader.json.gz": gzip.compress(dureader.encode()),
        "dureader-one.json": json.dumps(_dureader(7), indent=2).encode(),
    }


def test_jsonl_dureader_flat_nested_and_gzip_variants_stream_as_they_load(tmp_path):
    for name, content in _variants(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(content)
        streamed = _assert_streams_as_loaded(str(path))
        summary = streamed.report.summary()
        if name.startswith("dureader"):
            assert "skipped 1 DuReader questions" in summary or name == "dureader-one.json", name
        else:
            assert "40 questions (1 unanswerable); relocated 1 answer_start" in summary, name


def test_a_json_file_larger_than_the_window_reads_as_json_does(tmp_path):
    # Several windows of text (1 MiB each), articles cut by their ends.
    records = [_record(i, context=f"The cat sat on the mat, {i} times. " + "lorem ipsum " * 40) for i in range(6000)]
    text = json.dumps(_nested(records), indent=1)
    assert len(text) > 2 << 20
    path = tmp_path / "big.json"
    path.write_text(text)
    streamed = _assert_streams_as_loaded(str(path), sizes=(1000,))
    expected = [q["id"] for a in json.loads(text)["data"] for p in a["paragraphs"] for q in p["qas"]]
    assert [e["id"] for b in streamed.batches(512) for e in b] == expected


def test_a_dataset_folder_streams_as_it_loads(tmp_path):
    records = [_record(i) for i in range(25)]
    records[4] = _record(4, answers={"text": ["on the mat"], "answer_start": [2]})  # relocated
    folder = tmp_path / "my_squad"
    folder.mkdir()
    (folder / "train.jsonl").write_text(_jsonl(records))
    loaded = load_source(str(folder), "train")
    streamed = stream_source(str(folder), "train")
    assert streamed.fingerprint == loaded.fingerprint == source_fingerprint(str(folder), "train")
    assert streamed.fingerprint.startswith("datasets:") and streamed.description == f"{folder} [train]"
    for size in SIZES:
        assert [e for b in streamed.batches(size) for e in b] == loaded.examples
        assert streamed.report == loaded.report
    # The same examples as the file read by this package's own reader, rows in order.
    assert loaded.examples == load_source(str(folder / "train.jsonl")).examples
    assert len(loaded.report.relocations) == 1


def test_batches_again_read_again_and_the_report_is_the_same_object(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text(_jsonl([_record(0, answers={"text": ["on the mat"], "answer_start": [3]}), _record(1)]))
    streamed = stream_source(str(path))
    report = streamed.report
    first = list(streamed.batches(1))
    assert report.examples == 2 and len(report.relocations) == 1
    assert list(streamed.batches(5)) == [first[0] + first[1]]
    assert streamed.report is report and report.examples == 2 and len(report.relocations) == 1
    with pytest.raises(ValueError, match="batch size"):
        streamed.batches(0)


def test_the_fingerprint_needs_no_batches_and_a_file_that_changes_is_an_error(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text(_jsonl(_record(i) for i in range(3)))
    streamed = stream_source(str(path))
    assert streamed.fingerprint == source_fingerprint(str(path))
    path.write_text(_jsonl(_record(i) for i in range(4)))  # after its fingerprint named the cache entry
    given, message = _until_error(streamed, 10)
    assert given == [] and message == f"{path}: changed while it was read (its sha256 is not the one it had before)"


# -- the same errors as load_source, where they are met -------------------------------------------


def test_a_bad_line_raises_after_the_batches_before_it(tmp_path):
    lines = _jsonl(_record(i) for i in range(50)).splitlines()
    lines[30] = '{"id": "q30", oops}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = f"{path}: malformed JSON at line 31, column 15: Expecting property name enclosed in double quotes"
    assert _load_error(path) == expected
    for size in SIZES:
        given, message = _until_error(stream_source(str(path)), size)
        assert message == expected
        assert [e["id"] for e in given] == [f"q{i}" for i in range(_given_before(30, size))]


@pytest.mark.parametrize("pretty", [False, True])
def test_truncated_json_says_what_json_says(tmp_path, pretty):
    records = [_record(i, context=f"The cat sat on the mat, {i} times. " + "word " * 300) for i in range(3000)]
    text = json.dumps(_nested(records), indent=2 if pretty else None)
    path = tmp_path / "cut.json"
    for cut in (len(text) - 2, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * len(text) // 4, 200, 12):
        path.write_text(text[:cut])
        with pytest.raises(json.JSONDecodeError) as caught:
            json.loads(text[:cut])
        e = caught.value
        expected = f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        assert _load_error(path) == expected
        given, message = _until_error(stream_source(str(path)), 100)
        assert message == expected
        assert [e["id"] for e in given] == [r["id"] for r in records[: len(given)]]
        assert len(given) > 500 or cut < 1 << 20  # the records before the cut were given


@pytest.mark.parametrize(
    ("name", "content", "message", "good"),
    [
        (
            "not-object.json",
            json.dumps([_record(i) for i in range(20)] + [5] + [_record(21)]),
            "{path}: record 20: a record must be an object, got int",
            20,
        ),
        (
            "null-first.json",
            json.dumps({"data": [None] + [_record(i) for i in range(3)]}),
            "{path}: data[0]: a record must be an object, got NoneType",
            0,
        ),
        (
            "missing.jsonl",
            _jsonl([_record(i) for i in range(12)] + [{k: v for k, v in _record(12).items() if k != "question"}]),
            "{path}: question 'q12' (line 13): missing key 'question'",
            12,
        ),
        (
            "duplicate-at-end.jsonl",
            _jsonl([_record(i) for i in range(30)] + [_record(0)]),
            "{path}: question 'q0': duplicate id (questions 0 and 30)",
            30,
        ),
        (
            "mixed.jsonl",
            _jsonl([_record(i) for i in range(9)] + [_dureader(1)]),
            "{path}: mixes DuReader records (question_id, documents; first at line 10) with SQuAD-style records "
            "(first at line 1): a file must hold one format",
            9,
        ),
        (
            "mixed-dureader-first.json",
            json.dumps([_dureader(i) for i in range(8)] + [_record(0)]),
            "{path}: mixes DuReader records (question_id, documents; first at record 0) with SQuAD-style records "
            "(first at record 8): a file must hold one format",
            8,
        ),
        (
            "nested-bad-article.json",
            json.dumps({"data": _nested([_record(i) for i in range(60)])["data"] + [[]]}),
            "{path}: data[2] must be an object",
            60,
        ),
        (
            "deep.jsonl",
            _jsonl([_record(i) for i in range(10)]) + "[" * 100_000 + "]" * 100_000 + "\n",
            "{path}: JSON nested too deeply to read at line 11 (no SQuAD-format file nests so deep)",
            10,
        ),
        (
            "huge-number.jsonl",
            _jsonl([_record(i) for i in range(4)]) + '{"id": 1' + "0" * 5000 + "}\n",
            "{path}: a number of more than 4300 digits at line 5",
            4,
        ),
        (
            "not-utf8.jsonl",
            _jsonl([_record(i) for i in range(20)]) + '{"id": "caf\udce9"}\n',
            "{path}: not UTF-8 (invalid byte 0xe9 at line 21)",
            20,
        ),
    ],
)
def test_a_bad_record_raises_when_it_is_reached(tmp_path, name, content, message, good):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    expected = message.format(path=path)
    assert _load_error(path) == expected
    for size in SIZES:
        given, got = _until_error(stream_source(str(path)), size)
        assert got == expected
        assert len(given) == _given_before(good, size)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("no-questions.json", '{"version": "1", "data": []}', "{path}: contains no questions"),
        ("empty-list.json", "[]", "{path}: contains no questions"),
        ("empty.jsonl", "\n \n", "{path}: contains no questions"),
        ("empty.json", "", "{path}: malformed JSON at line 1, column 1: Expecting value"),
        ("version.json", '{"version": "1"}', "{path}: not a SQuAD-format file: expected {{'data': [...]}} (nested"),
        ("data.json", '{"data": {"a": 1}}', "{path}: 'data' must be a list"),
        (
            "all-skipped.jsonl",
            _jsonl([_dureader(1, answers=["x"]), _dureader(2, answers=["y"])]),
            "{path}: contains no usable questions: all 2 DuReader questions were skipped",
        ),
        (
            "deep.json",
            '{"data": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "{path}: JSON nested too deeply to read (no SQuAD-format file nests so deep)",
        ),
        ("deep-open.json", "[" * 100_000, "{path}: JSON nested too deeply to read (no SQuAD-format"),
    ],
)
def test_a_file_with_no_questions_gives_no_batch(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    expected = message.format(path=path)
    assert _load_error(path).startswith(expected)
    for size in SIZES:
        given, got = _until_error(stream_source(str(path)), size)
        assert given == [] and got.startswith(expected)


def test_what_is_known_at_the_end_raises_before_the_last_batch(tmp_path):
    records = [_record(i) for i in range(10)]
    cases = {
        "trailing.json": (json.dumps(records) + "\n  x", "{path}: malformed JSON at line 2, column 3: Extra data"),
        "two-values.json": (
            json.dumps({"data": records}) + "\n" + json.dumps({"data": []}),
            "{path}: malformed JSON at line 2, column 1: Extra data",
        ),
        "cut.json": (json.dumps(records)[:-1], None),  # json.loads's words for it
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        expected = message.format(path=path) if message else _load_error(path)
        assert _load_error(path) == expected and "malformed JSON" in expected
        for size in (3, 5, 10, 1000):
            given, got = _until_error(stream_source(str(path)), size)
            assert got == expected
            assert len(given) == _given_before(10, size)  # the batch holding the tenth is not given


def test_json_that_a_stream_cannot_read_as_json_loads_does_is_an_error(tmp_path):
    # json.loads keeps the last of two keys 'data', and read an object with 'data' and DuReader's
    # keys as one DuReader record: a stream has given the first list's examples by then.
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"data": [_record(0)], "x": 1})[:-1] + ', "data": []}')
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"data": [_record(i) for i in range(3)], **_dureader(1)}))
    for path, message, good in (
        (twice, f"{twice}: has key 'data' twice: a file must hold one list of data", 1),
        (
            both,
            f"{both}: holds both 'data' and the keys of one DuReader record (question_id, documents): a file must "
            "hold one format",
            3,
        ),
    ):
        assert _load_error(path) == message
        for size in SIZES:
            given, got = _until_error(stream_source(str(path)), size)
            assert got == message and len(given) == _given_before(good, size)


def test_a_gzip_bomb_raises_before_the_first_batch(tmp_path):
    text = json.dumps({"data": [_record(i) for i in range(100)]}).encode()
    path = tmp_path / "over.json.gz"
    path.write_bytes(gzip.compress(text + b" " * (1 << 20)))
    expected = f"{path}: decompresses to more than 1 MB (data.max_decompressed_mb); a gzip bomb, or raise the limit"
    assert _load_error(path, max_decompressed_mb=1) == expected
    streamed = stream_source(str(path), max_decompressed_mb=1)  # opening it reads nothing
    for size in SIZES:
        given, message = _until_error(streamed, size)
        assert given == [] and message == expected
    assert len([e for b in stream_source(str(path), max_decompressed_mb=2).batches(7) for e in b]) == 100
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(gzip.compress(text)[:-12])
    given, message = _until_error(stream_source(str(broken)), 1)
    assert given == [] and message.startswith(f"{broken}: not a valid gzip file (") and message == _load_error(broken)


def test_a_missing_file_is_an_error_of_stream_source(tmp_path):
    with pytest.raises(DataError, match=r"nope.json: file not found"):
        stream_source(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match=r"data source is empty"):
        stream_source(" ")


# -- memory ---------------------------------------------------------------------------------


def test_memory_is_bounded_by_a_batch_not_by_the_file(tmp_path):
    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum " * 170
    count = 0
    with open(path, "w") as f:
        while f.tell() < 20 << 20:
            f.write(json.dumps(_record(count, context=f"The cat sat on the mat. {filler}{count}")) + "\n")
            count += 1
    streamed = stream_source(str(path))
    seen = 0
    tracemalloc.start()
    try:
        for batch in streamed.batches(100):
            assert len(batch) == 100 or seen + len(batch) == count
            seen += len(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count > 9000
    # A batch is some 200 KB, the text read at a time a few hundred KB, the ids seen some 1 MB;
    # the whole file is 20 MB (and load_source holds about 28 MB).
    assert peak < 5 << 20, f"peak {peak / 2**20:.1f} MiB"
