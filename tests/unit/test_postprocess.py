"""Post-processing (pure): candidates to answers, n-best lists and null odds; the evaluation plan;
diagnostics. Checked by hand and against an exhaustive reference on real SQuAD v2 windows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SQUAD20_DEV, subset_nested

from qa_dist import build_eval_features, load_examples, postprocess
from qa_dist.eval import Candidates, WindowOffsets, decode
from qa_dist.eval.diagnostics import diagnostics
from qa_dist.features.batches import eval_plan

CONTEXT = "the cat sat"
FEATURES = [  # two windows of one example: [CLS] the cat [SEP] and [CLS] cat sat [SEP]
    {"offset_mapping": [None, (0, 3), (4, 7), None], "example_id": "a"},
    {"offset_mapping": [None, (4, 7), (8, 11), None], "example_id": "a"},
]


def test_best_span_over_windows_and_null_is_the_minimum_over_windows():
    start = np.array([[5.0, 1, 2, 0, -100], [0, 0, 3, 0, -100]])
    answers, nbest, null_odds, _ = postprocess(
        [{"id": "a", "context": CONTEXT}], FEATURES, start, start, version_2_with_negative=True, n_best_size=3
    )
    # Best span: "sat" (window 1, 3 + 3); null: min(5 + 5, 0 + 0) = 0; odds 0 - 6.
    assert answers == {"a": "sat"} and null_odds == {"a": -6.0}
    assert [(x["text"], x["start"], x["end"], x["score"]) for x in nbest["a"]] == [
        ("sat", 8, 11, 6.0),
        ("cat", 4, 7, 4.0),
        ("the cat", 0, 7, 3.0),
    ]
    weights = [math.exp(s - 6.0) for s in (6.0, 4.0, 3.0)]
    assert nbest["a"][0]["probability"] == pytest.approx(weights[0] / sum(weights))
    # log-probabilities are normalised per window (its real tokens: 4 of 5 are not padding)
    lse = 2 * float(torch.logsumexp(torch.tensor([0.0, 0, 3, 0]), 0))
    assert nbest["a"][0]["log_prob"] == pytest.approx(6.0 - lse, abs=1e-5)


def test_null_wins_above_the_threshold_and_enters_the_nbest():
    start = np.array([[9.0, 1, 2, 0], [9.0, 0, 3, 0]])  # null 18 in both windows, best span 6
    answers, nbest, null_odds, spans = postprocess(
        [{"id": "a", "context": CONTEXT}], FEATURES, start, start, version_2_with_negative=True
    )
    assert answers == {"a": ""} and null_odds == {"a": 12.0} and spans == {"a": "sat"}
    assert nbest["a"][0]["text"] == "" and nbest["a"][0]["score"] == 18.0
    kept, *_ = postprocess(
        [{"id": "a", "context": CONTEXT}],
        FEATURES,
        start,
        start,
        version_2_with_negative=True,
        null_score_diff_threshold=12.5,
    )
    assert kept == {"a": "sat"}
    v1, *_ = postprocess([{"id": "a", "context": CONTEXT}], FEATURES, start, start)
    assert v1 == {"a": "sat"}  # SQuAD v1.1 never answers empty


def _candidates(windows, n=2):
    k = len(windows)
    return Candidates(
        window=np.array(windows, dtype=np.int64),
        start=np.ones((k, n), np.int16),
        end=np.ones((k, n), np.int16),
        score=np.tile(np.array([1.0, -np.inf], np.float32), (k, 1)),
        null=np.zeros(k, np.float32),
        log_norm=np.zeros(k, np.float32),
    )


def test_duplicate_windows_are_dropped_and_a_missing_window_is_an_error():
    offsets = WindowOffsets.from_lists([f["offset_mapping"] for f in FEATURES])
    args = (offsets, np.array([0, 0]), ["a"], [CONTEXT])
    once = decode(_candidates([0, 1]), *args)
    assert decode(_candidates([1, 0, 0, 1, 0]), *args) == once  # sampler padding repeats windows
    assert once.nbest["a"][0]["text"] == "the"
    with pytest.raises(ValueError, match="cover 1 distinct windows of 2"):
        decode(_candidates([1]), *args)


def _reference(examples, features, start, end, n_best, max_answer_length):
    """Every valid span of every window, in plain Python (what the vectorized code must equal)."""
    by_id = {}
    for f, feature in enumerate(features):
        spans, offsets = by_id.setdefault(feature["example_id"], ([], []))
        offsets.append(float(start[f][feature["cls_index"]] + end[f][feature["cls_index"]]))
        ctx = [i for i, o in enumerate(feature["offset_mapping"]) if o is not None]
        for i in ctx:
            for j in ctx:
                if i <= j < i + max_answer_length:
                    o = feature["offset_mapping"]
                    spans.append((float(start[f][i]) + float(end[f][j]), o[i][0], o[j][1]))
    answers, odds = {}, {}
    for ex in examples:
        spans, nulls = by_id[ex["id"]]
        best = max(spans)
        odds[ex["id"]] = min(nulls) - best[0]
        answers[ex["id"]] = "" if odds[ex["id"]] > 0 else ex["context"][best[1] : best[2]]
    return answers, odds


def test_vectorized_postprocess_equals_exhaustive_reference_on_real_squad_v2(tmp_path, minilm_tokenizer):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(subset_nested(SQUAD20_DEV, 6)))
    examples = load_examples(path)
    cols = build_eval_features(examples, minilm_tokenizer, max_length=96, doc_stride=32)
    features = [dict(zip(cols, row, strict=True)) for row in zip(*cols.values(), strict=True)]
    assert len(features) > len(examples)  # several windows per question
    g = torch.Generator().manual_seed(1)
    width = max(len(f["input_ids"]) for f in features)
    start, end = (torch.randn(len(features), width, generator=g).numpy() for _ in range(2))
    got = postprocess(examples, features, start, end, version_2_with_negative=True, max_answer_length=15)
    answers, odds = _reference(examples, features, start, end, 20, 15)
    assert got.answers == answers
    assert got.null_odds == pytest.approx(odds, abs=1e-5)
    assert all(len(v) == 20 for v in got.nbest.values())
    assert all(a["score"] >= b["score"] for v in got.nbest.values() for a, b in zip(v, v[1:], strict=False))

    # The same through Arrow (a datasets.Dataset, as the tutorials hold features): same answers.
    import datasets

    dataset = datasets.Dataset.from_dict({k: cols[k] for k in ("offset_mapping", "example_id", "cls_index")})
    again = postprocess(
        datasets.Dataset.from_list(examples), dataset, start, end, version_2_with_negative=True, max_answer_length=15
    )
    assert again.answers == got.answers and again.nbest == got.nbest


@pytest.mark.parametrize("n_windows", [0, 1, 7, 20, 21])
def test_eval_plan_covers_every_window_once_in_batches_independent_of_world_size(n_windows):
    lengths = np.random.default_rng(n_windows).integers(10, 100, n_windows)
    single = [tuple(b) for b, padding in eval_plan(lengths, batch_size=4, world_size=1, rank=0)]
    for world in (2, 3):
        plans = [eval_plan(lengths, batch_size=4, world_size=world, rank=r) for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # the same number of forwards on every rank
        real = [tuple(b) for p in plans for b, padding in p if not padding]
        assert sorted(real) == sorted(single)  # the same batches, whatever the world size
    assert sorted(int(i) for b in single for i in b) == list(range(n_windows))


def test_diagnostics():
    examples = [
        {"id": "1", "question": "q1", "answers": {"text": ["Paris"]}},
        {"id": "2", "question": "q2", "answers": {"text": ["the Loire"]}},
        {"id": "3", "question": "q3", "answers": {"text": []}},
    ]
    nbest = {
        "1": [{"text": "Paris", "probability": 0.9}],
        "2": [{"text": "Seine", "probability": 0.8}, {"text": "Loire", "probability": 0.2}],
        "3": [{"text": "Lyon", "probability": 0.6}, {"text": "", "probability": 0.4}],
    }
    answers = {"1": "Paris", "2": "Seine", "3": "Lyon"}
    metrics, wrong = diagnostics(examples, answers, nbest, "squad_v2")
    assert metrics["gold_in_nbest"] == 100.0 and metrics["gold_top1"] == 50.0
    assert metrics["gold_rank_mean"] == 1.5
    assert metrics["confident_wrong"] == pytest.approx(200 / 3)
    assert [row[0] for row in wrong] == ["2", "3"]  # most confident first


def test_builder_features_plain_lists_and_arrow_give_identical_predictions(tmp_path, minilm_tokenizer):
    """The README's path (features straight from build_eval_features, whose offset mapping is held
    as arrays), the same columns as plain Python lists, and the Arrow path (the notebook's padded
    features through datasets.map, and the feature cache's table): identical predictions."""
    import sys
    from pathlib import Path

    import datasets

    from qa_dist.features import OffsetMapping
    from qa_dist.features.prepare import examples_table, features_table

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from postprocess import tutorial_prepare_validation_features

    path = tmp_path / "dev.json"
    path.write_text(json.dumps(subset_nested(SQUAD20_DEV, 25)))
    examples = load_examples(path)
    length, stride = 96, 32
    built = build_eval_features(examples, minilm_tokenizer, length, stride)
    assert isinstance(built["offset_mapping"], OffsetMapping)
    examples_ds = datasets.Dataset.from_list(examples)
    kwargs = {"tokenizer": minilm_tokenizer, "max_length": length, "doc_stride": stride}
    notebook = examples_ds.map(
        tutorial_prepare_validation_features, batched=True, remove_columns=examples_ds.column_names, fn_kwargs=kwargs
    )
    assert notebook["example_id"] == built["example_id"] and len(built["example_id"]) > len(examples) + 20
    columns = {k: [e[k] for e in examples] for k in ("id", "question", "context")}
    notebook_lists = tutorial_prepare_validation_features(columns, **kwargs)  # a BatchEncoding of lists
    g = torch.Generator().manual_seed(3)
    start, end = (torch.randn(len(notebook), length, generator=g).numpy() for _ in range(2))
    start[:, 0] += 2.5  # a null score (at CLS) that wins for some questions and not for others
    end[:, 0] += 2.5

    def run(examples, features):
        return postprocess(examples, features, start, end, version_2_with_negative=True, max_answer_length=20)

    arrow = run(examples_ds, notebook)
    assert 0 < sum(a == "" for a in arrow.answers.values()) < len(examples)
    forms = {
        "build_eval_features": run(examples, built),
        "build_eval_features, examples as a Dataset": run(examples_ds, built),
        "plain lists": run(examples, {**built, "offset_mapping": built["offset_mapping"].tolist()}),
        "rows of plain lists": run(
            examples, [dict(zip(built, r, strict=True)) for r in zip(*built.values(), strict=True)]
        ),
        "the notebook's lists": run(examples, notebook_lists),
        "the notebook's Dataset as a dict of lists": run(examples, notebook.to_dict()),
        "the cache's tables": run(examples_table(examples), features_table(built)),
        "Dataset.from_dict(build_eval_features)": run(examples, datasets.Dataset.from_dict(built)),
    }
    for name, got in forms.items():
        assert got == arrow, name
        assert dict(got.nbest) == dict(arrow.nbest), name


def test_plain_list_offsets_are_checked():
    start = np.zeros((1, 4))
    bad = [{"offset_mapping": [None, (0, 3, 5), (4,), None], "example_id": "a"}]
    with pytest.raises(ValueError, match="pairs or None"):
        postprocess([{"id": "a", "context": CONTEXT}], bad, start, start)
    arrays = [{"offset_mapping": np.array([[0, 0], [0, 3], [4, 7], [0, 0]]), "example_id": "a"}]
    logits = np.array([[0.0, 5, 0, 0]])
    got = postprocess([{"id": "a", "context": CONTEXT}], arrays, logits, logits)  # rows as numpy arrays
    assert got.answers == {"a": "the"}
