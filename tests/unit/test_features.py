"""Windowed features: identical windows to the tokenizer's overflow, exactly right labels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CMRC_DEV, DRCD_DEV, SQUAD11_TRAIN, SQUAD20_DEV, subset_nested
from hypothesis import given, settings
from hypothesis import strategies as st

from qa_dist import DataError, build_eval_features, build_train_features, load_examples
from qa_dist.features import pair_layout, window_spans


def _examples(path, n_paragraphs, tmp_path, start=0):
    import json

    target = tmp_path / f"{path.stem}-{start}-{n_paragraphs}.json"
    target.write_text(json.dumps(subset_nested(path, n_paragraphs, start)), encoding="utf-8")
    return load_examples(target)


def _reference(tokenizer, examples, max_length, stride):
    """What everyone computes: the pair tokenizer call with overflowing tokens."""
    questions = [e["question"].lstrip() for e in examples]
    contexts = [e["context"] for e in examples]
    if tokenizer.padding_side == "left":
        return tokenizer(
            contexts,
            questions,
            truncation="only_first",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
    return tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


@pytest.mark.parametrize("tokenizer_name", ["minilm_tokenizer", "wordpiece_tokenizer", "bpe_left_tokenizer"])
@pytest.mark.parametrize(("max_length", "stride"), [(384, 128), (96, 32)])
def test_windows_identical_to_tokenizer_overflow(request, tmp_path, tokenizer_name, max_length, stride):
    tokenizer = request.getfixturevalue(tokenizer_name)
    examples = _examples(SQUAD20_DEV, 60, tmp_path)
    ref = _reference(tokenizer, examples, max_length, stride)
    train = build_train_features(examples, tokenizer, max_length, stride)
    evalf = build_eval_features(examples, tokenizer, max_length, stride)
    assert train["input_ids"] == ref["input_ids"]
    assert evalf["input_ids"] == ref["input_ids"]
    assert train["attention_mask"] == ref["attention_mask"]
    assert train["example_index"] == ref["overflow_to_sample_mapping"]
    assert evalf["example_id"] == [examples[i]["id"] for i in ref["overflow_to_sample_mapping"]]
    if "token_type_ids" in tokenizer.model_input_names:
        assert train["token_type_ids"] == ref["token_type_ids"]
    else:
        assert "token_type_ids" not in train
    context_seq = 0 if tokenizer.padding_side == "left" else 1
    for i, offsets in enumerate(evalf["offset_mapping"]):
        seq = ref.sequence_ids(i)
        context = examples[ref["overflow_to_sample_mapping"][i]]["context"]
        expected = [tuple(o) if s == context_seq else None for o, s in zip(ref["offset_mapping"][i], seq, strict=True)]
        for ours, theirs in zip(offsets, expected, strict=True):
            # Byte-level BPE: tokenizers leaves the leading space in the offsets of the first token
            # of an overflow window (and trims it everywhere else); ours are trimmed throughout.
            if ours != theirs:
                assert context[ours[0] : ours[1]] == context[theirs[0] : theirs[1]].strip(), (
                    ours,
                    theirs,
                )
                assert abs(ours[0] - theirs[0]) <= max(1, theirs[1] - theirs[0])
    assert len(train["input_ids"]) > len(examples)  # some examples really overflow into several windows


def _check_labels(examples, tokenizer, features, evalf):
    """The labelled span is the smallest token span whose characters cover the answer:
    its first and last tokens overlap the answer, and no context token outside it does."""
    checked = inside = 0
    for f, ex_index in enumerate(features["example_index"]):
        ex = examples[ex_index]
        start, end = features["start_positions"][f], features["end_positions"][f]
        cls = features["input_ids"][f].index(tokenizer.cls_token_id)
        offsets = evalf["offset_mapping"][f]
        context_tokens = [i for i, o in enumerate(offsets) if o is not None]
        if ex["is_impossible"]:
            assert (start, end) == (cls, cls)
            continue
        s = ex["answers"]["answer_start"][0]
        e = s + len(ex["answers"]["text"][0])
        overlapping = [i for i in context_tokens if offsets[i][0] < e and offsets[i][1] > s]
        all_overlapping = _all_overlapping_tokens(ex, tokenizer, s, e)
        checked += 1
        if overlapping and len(overlapping) == all_overlapping:
            inside += 1
            assert (start, end) == (overlapping[0], overlapping[-1]), ex["id"]
            covered = ex["context"][offsets[start][0] : offsets[end][1]]
            assert ex["answers"]["text"][0].strip() in covered
        else:  # the window does not hold the whole answer
            assert (start, end) == (cls, cls), ex["id"]
    return checked, inside


_overlap_cache: dict = {}


def _all_overlapping_tokens(ex, tokenizer, s, e) -> int:
    key = (id(tokenizer), ex["context"], s, e)
    if key not in _overlap_cache:
        offsets = tokenizer(ex["context"], add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
            "offset_mapping"
        ]
        _overlap_cache[key] = sum(1 for a, b in offsets if a < e and b > s)
    return _overlap_cache[key]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "paragraphs", "tokenizer_name"),
    [
        (SQUAD11_TRAIN, 700, "minilm_tokenizer"),
        (SQUAD20_DEV, 400, "bpe_left_tokenizer"),
        (CMRC_DEV, 400, "zh_wordpiece_tokenizer"),
        (DRCD_DEV, 400, "zh_wordpiece_tokenizer"),
    ],
    ids=["squad-train-minilm", "squad2-dev-bpe-left", "cmrc-dev", "drcd-dev"],
)
def test_label_property_on_real_data(request, tmp_path, path, paragraphs, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    examples = _examples(path, paragraphs, tmp_path)
    assert len(examples) >= 1000
    # A short window makes many answers straddle window boundaries, the case that goes wrong.
    for max_length, stride in [(128, 48), (384, 128)]:
        train = build_train_features(examples, tokenizer, max_length, stride)
        evalf = build_eval_features(examples, tokenizer, max_length, stride)
        assert train["input_ids"] == evalf["input_ids"]
        checked, inside = _check_labels(examples, tokenizer, train, evalf)
        assert checked > 1000 and inside > 500


def _tutorial_labels(tokenizer, question, context, answer_start, answer_text, max_length, stride):
    """Labels of the Hugging Face notebook's ``prepare_train_features`` (as in bench/preprocess.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from preprocess import tutorial_prepare_train_features

    columns = {
        "question": [question],
        "context": [context],
        "answers": [{"text": [answer_text], "answer_start": [answer_start]}],
    }
    result = tutorial_prepare_train_features(columns, tokenizer, max_length, stride)
    return list(zip(result["start_positions"], result["end_positions"], strict=True))


def test_answer_on_last_context_token_of_a_window(minilm_tokenizer):
    """The tutorial's start loop runs past the window's last context token into [SEP] and the
    padding, whose offsets are (0, 0) <= start_char, and labels the padding."""
    context = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    question = "which?"
    n_question = len(minilm_tokenizer(question, add_special_tokens=False)["input_ids"])
    max_length, stride = (
        n_question + 3 + 8,
        2,
    )  # 8 context tokens per window: the first ends at "eight"
    start = context.index("eight")
    example = {
        "id": "q",
        "title": "",
        "context": context,
        "question": question,
        "answers": {"text": ["eight"], "answer_start": [start]},
        "is_impossible": False,
    }
    features = build_train_features([example], minilm_tokenizer, max_length, stride)
    first_window = features["input_ids"][0]
    position = first_window.index(minilm_tokenizer.convert_tokens_to_ids("eight"))
    assert position == len(first_window) - 2  # last context token, right before [SEP]
    assert (features["start_positions"][0], features["end_positions"][0]) == (position, position)

    tutorial = _tutorial_labels(minilm_tokenizer, question, context, start, "eight", max_length, stride)
    assert tutorial[0] != (position, position)


def test_unanswerable_and_cut_answers_point_at_cls(bpe_left_tokenizer, minilm_tokenizer):
    context = " ".join(f"word{i}" for i in range(200))
    answer = "word50 word51 word52 word53 word54 word55"
    start = context.index(answer)
    examples = [
        {
            "id": "a",
            "title": "",
            "context": context,
            "question": "q?",
            "answers": {"text": [answer], "answer_start": [start]},
            "is_impossible": False,
        },
        {
            "id": "b",
            "title": "",
            "context": context,
            "question": "q?",
            "answers": {"text": [], "answer_start": []},
            "is_impossible": True,
        },
    ]
    for tok in (minilm_tokenizer, bpe_left_tokenizer):
        f = build_train_features(examples, tok, 64, 16)
        cls_positions = [ids.index(tok.cls_token_id) for ids in f["input_ids"]]
        labelled = [
            i for i, ex in enumerate(f["example_index"]) if ex == 0 and f["start_positions"][i] != cls_positions[i]
        ]
        assert labelled, "some window holds the whole answer"
        for i, ex in enumerate(f["example_index"]):
            if ex == 1:
                assert f["start_positions"][i] == f["end_positions"][i] == cls_positions[i]


def test_cls_at_the_end_for_xlnet_style_templates(wordpiece_tokenizer):
    """CLS wherever the template puts it: XLNet puts it last (A <sep> B <sep> <cls>)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = wordpiece_tokenizer.backend_tokenizer.__class__.from_str(wordpiece_tokenizer.backend_tokenizer.to_str())
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="$A [SEP] [CLS]",
        pair="$A:0 [SEP]:0 $B:1 [SEP]:1 [CLS]:2",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    layout = pair_layout(tok)
    assert layout.post == (sep, cls) and layout.post_types == (1, 2)
    ex = {
        "id": "x",
        "title": "",
        "context": "alpha beta gamma",
        "question": "what?",
        "answers": {"text": [], "answer_start": []},
        "is_impossible": True,
    }
    f = build_train_features([ex], tok, 64, 16)
    assert f["start_positions"] == [len(f["input_ids"][0]) - 1]
    assert f["token_type_ids"][0] == tok("what?", "alpha beta gamma", return_token_type_ids=True)["token_type_ids"]


def test_question_too_long_for_the_window_is_a_clear_error(minilm_tokenizer):
    ex = {
        "id": "long-q",
        "title": "",
        "context": "short context " * 50,
        "question": "why " * 60,
        "answers": {"text": [], "answer_start": []},
        "is_impossible": True,
    }
    with pytest.raises(DataError, match="long-q.*doc_stride"):
        build_train_features([ex], minilm_tokenizer, 64, 16)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), budget=st.integers(2, 60), data=st.data())
def test_window_spans_match_tokenizers_overflow(minilm_tokenizer, n, budget, data):
    stride = data.draw(st.integers(0, budget - 1))
    spans = window_spans(n, budget, stride)
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (a0, a1), (b0, _) in zip(spans, spans[1:], strict=False):
        assert a1 - a0 == budget and a1 - b0 == stride  # full windows overlapping by the stride
    # Same windows as the tokenizer gives for a context of n one-token words.
    context = " ".join(["a"] * n)
    q = "q"
    enc = minilm_tokenizer(
        q,
        context,
        truncation="only_second",
        max_length=budget + 4,
        stride=stride,
        return_overflowing_tokens=True,
    )
    assert [len(ids) - 4 for ids in enc["input_ids"]] == [b - a for a, b in spans]


# The tutorials' own inputs: the rows of datasets.load_dataset("squad") / ("squad_v2"), built here
# from the real files as the hub's loading script builds them (no is_impossible column; an
# unanswerable question has empty answers), with the hub's declared features.


def _hub_dataset(nested: dict):
    import datasets

    rows = [
        {
            "id": qa["id"],
            "title": article.get("title", ""),
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": {
                "text": [a["text"] for a in qa["answers"]],
                "answer_start": [a["answer_start"] for a in qa["answers"]],
            },
        }
        for article in nested["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


@pytest.mark.parametrize(
    ("path", "paragraphs"), [(SQUAD11_TRAIN, 40), (SQUAD20_DEV, 60)], ids=["squad-v1.1", "squad-v2"]
)
def test_hub_squad_rows_give_the_windows_of_load_examples(tmp_path, minilm_tokenizer, path, paragraphs):
    import json

    nested = subset_nested(path, paragraphs)
    target = tmp_path / "subset.json"
    target.write_text(json.dumps(nested), encoding="utf-8")
    examples = load_examples(target)
    ds = _hub_dataset(nested)
    assert "is_impossible" not in ds.column_names and len(ds) == len(examples)
    assert ds[0]["answers"].keys() == {"text", "answer_start"}  # a dict of lists, as the hub gives it
    unanswerable = sum(not ex["answers"]["text"] for ex in examples)
    assert (unanswerable > 50) == (path == SQUAD20_DEV)
    train = build_train_features(examples, minilm_tokenizer, 128, 48)
    evalf = build_eval_features(examples, minilm_tokenizer, 128, 48)
    assert len(train["input_ids"]) > len(examples)  # answers fall in some windows and not in others
    for form in (ds, list(ds), ds.to_list()):
        assert build_train_features(form, minilm_tokenizer, 128, 48) == train
        assert build_eval_features(form, minilm_tokenizer, 128, 48) == evalf


def test_offset_mapping_reads_like_lists_and_converts_to_arrow_in_one_step(tmp_path, minilm_tokenizer):
    import pickle

    import datasets
    import pyarrow as pa

    from qa_dist.eval import WindowOffsets
    from qa_dist.features import OffsetMapping
    from qa_dist.features.prepare import features_table

    examples = _examples(SQUAD20_DEV, 8, tmp_path)
    evalf = build_eval_features(examples, minilm_tokenizer, 96, 32)
    offsets = evalf["offset_mapping"]
    assert isinstance(offsets, OffsetMapping) and len(offsets) == len(evalf["input_ids"])
    # What the pair call gives, None outside the context: the rows of a list of lists.
    ref = _reference(minilm_tokenizer, examples, 96, 32)
    rows = [
        [tuple(o) if s == 1 else None for o, s in zip(ref["offset_mapping"][i], ref.sequence_ids(i), strict=True)]
        for i in range(len(ref["input_ids"]))
    ]
    assert offsets.tolist() == rows and list(offsets) == rows
    assert offsets == rows and rows == offsets and evalf == {**evalf, "offset_mapping": rows}
    assert offsets != rows[:-1] and offsets != [*rows[:-1], [None]]
    assert offsets[-1] == rows[-1] and offsets[3] == rows[3] and type(offsets[3]) is list
    assert offsets[2:7] == rows[2:7] and isinstance(offsets[2:7], OffsetMapping) and offsets[::3] == rows[::3]
    assert offsets[5:2] == [] and len(offsets[5:2]) == 0
    with pytest.raises(IndexError):
        offsets[len(rows)]
    with pytest.raises(TypeError):
        offsets[0] = rows[0]  # read-only: tolist() for lists to change
    assert pickle.loads(pickle.dumps(offsets)) == offsets
    # Arrow: the cache's column type, the same values as converting the lists.
    cache_type = pa.list_(pa.list_(pa.int32(), 2))
    assert pa.array(offsets, type=cache_type).equals(pa.array(rows, type=cache_type))
    assert features_table(evalf).equals(features_table({**evalf, "offset_mapping": rows}))
    assert pa.array(offsets[4:9]).to_pylist() == [[list(p) if p else None for p in r] for r in rows[4:9]]
    dataset = datasets.Dataset.from_dict(evalf)
    assert dataset["offset_mapping"] == [[list(p) if p else None for p in r] for r in rows]
    from_arrow = WindowOffsets.from_arrow(pa.array(offsets))
    direct = WindowOffsets.from_lists(offsets)
    for name in ("base", "char_start", "char_end"):
        assert np.array_equal(getattr(from_arrow, name), getattr(direct, name))
        assert np.array_equal(getattr(WindowOffsets.from_lists(rows), name), getattr(direct, name))
