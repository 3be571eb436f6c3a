"""What the three ``evaluate`` scripts share: their input features and the call to ``qa_dist.metrics``.

Imported by the scripts only (it imports ``datasets``, as ``evaluate`` does anyway).
"""

from __future__ import annotations

import logging

import datasets

from qa_dist import metrics

log = logging.getLogger(__name__)

NA = "no_answer_probability"


def features() -> datasets.Features:
    """The hub's ``squad_v2`` input format, with ``no_answer_probability`` as float64 (the hub's is
    float32) so that null odds reach the metric unrounded, as they reach ``qa_dist.score``."""
    return datasets.Features(
        {
            "predictions": {
                "id": datasets.Value("string"),
                "prediction_text": datasets.Value("string"),
                NA: datasets.Value("float64"),
            },
            "references": {
                "id": datasets.Value("string"),
                "answers": datasets.Sequence(
                    {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                ),
            },
        }
    )


def with_na_slot(predictions):
    """``evaluate`` checks each prediction against the features and fails on a missing key: an
    optional ``no_answer_probability`` is filled in as None (not given)."""
    if predictions is None:
        return None
    return [{**p, NA: None} if isinstance(p, dict) and NA not in p else p for p in predictions]


def with_na_slot_one(prediction):
    return with_na_slot([prediction])[0] if prediction is not None else None


class OptionalNullOdds:
    """The scripts' ``add``/``add_batch``: ``no_answer_probability`` may be left out. A mixin, not an
    ``EvaluationModule``: evaluate's loader takes the first EvaluationModule class it finds in a
    script as the metric, so a shared Metric base class imported there would be taken instead."""

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (no_answer_probability may be left out)."""
        super().add_batch(predictions=with_na_slot(predictions), references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and its reference (no_answer_probability may be left out)."""
        super().add(prediction=with_na_slot_one(prediction), reference=reference, **kwargs)


def compute(predictions: list[dict], references: list[dict], metric: str, *, no_answer_threshold: float = 1.0) -> dict:
    """Score through ``qa_dist.metrics.score``; the result without its ``missing``/``missing_ids`` keys
    (the hub metrics' keys only): a reference without a prediction counts as wrong and is logged."""
    examples = [
        {
            "id": ref["id"],
            "answers": {"text": list(ref["answers"]["text"]), "answer_start": list(ref["answers"]["answer_start"])},
            # An empty answer list marks an unanswerable question (the SQuAD v2 convention).
            "is_impossible": not ref["answers"]["text"],
        }
        for ref in references
    ]
    texts = {p["id"]: p["prediction_text"] for p in predictions}  # evaluate has refused None
    given = sum(p[NA] is not None for p in predictions)
    if given and given != len(predictions):
        raise ValueError(f"{NA} is given for {given} of {len(predictions)} predictions: give it for all or none")
    na_probs = {p["id"]: p[NA] for p in predictions} if given else None

    if no_answer_threshold == 1.0:
        result = metrics.score(examples, texts, na_probs=na_probs, metric=metric)
    else:  # squad_v2 only. qa_dist.score takes no threshold; the function it calls for squad_v2 does.
        result = metrics.score_squad_v2(examples, texts, na_probs, na_prob_thresh=no_answer_threshold)
        result["missing_ids"] = [ex["id"] for ex in examples if ex["id"] not in texts]
        result["missing"] = len(result["missing_ids"])

    missing = result.pop("missing", 0)
    missing_ids = result.pop("missing_ids", [])[:5]
    if missing:
        log.warning(
            "%d of %d references have no prediction and count as wrong (first: %s)",
            missing,
            len(examples),
            ", ".join(map(str, missing_ids)),
        )
    return result
