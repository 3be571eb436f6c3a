"""SQuAD v1.1, SQuAD v2.0 and CMRC2018 metrics, written in the project.

``evaluate.load("squad_v2")`` fetches its script from the hub at run time and fails offline, so the
official scripts' logic is implemented here and kept numerically identical to them, with one
deliberate difference: a question without a prediction counts as wrong and is reported (the
official v2 script skips it and then crashes computing HasAns/NoAns).
"""

from __future__ import annotations

from qa_dist.errors import DataError
from qa_dist.metrics.cmrc import (
    CMRC_PUNCTUATION,
    cmrc_em,
    cmrc_f1,
    cmrc_strip_punctuation,
    longest_common_substring,
    mixed_segmentation,
    score_cmrc,
)
from qa_dist.metrics.common import CJK, is_empty, missing_ids, unanswerable
from qa_dist.metrics.squad import normalize_answer, score_squad_v1, score_squad_v2, squad_exact, squad_f1


def null_answer_competes(examples: list[dict], metric: str) -> bool:
    """Whether evaluation predicts the null answer (and writes null odds): always for SQuAD v2;
    for CMRC-style data when it has unanswerable questions (the official CMRC data has none)."""
    return metric == "squad_v2" or (metric == "cmrc" and any(unanswerable(ex) for ex in examples))


# -- choosing ---------------------------------------------------------------------------------


def is_chinese(examples: list[dict], sample: int = 200) -> bool:
    """Contexts mostly made of CJK characters."""
    text = "".join(ex["context"] for ex in examples[:sample])
    letters = [ch for ch in text if not ch.isspace()]
    return bool(letters) and sum(bool(CJK.search(ch)) for ch in letters) / len(letters) > 0.3


def resolve_metric(examples: list[dict], metric: str = "auto", *, with_null_odds: bool = False) -> str:
    """The metric family ``auto`` stands for on these examples (other names pass through)."""
    if metric != "auto":
        return metric
    if is_chinese(examples):
        return "cmrc"
    if with_null_odds or any(ex["is_impossible"] for ex in examples):
        return "squad_v2"
    return "squad"


def score(
    examples: list[dict], predictions: dict[str, str], *, na_probs: dict[str, float] | None = None, metric: str = "auto"
) -> dict:
    """Score predictions (``{id: answer text}``, empty for no answer) against examples.

    ``metric``: ``squad`` (v1.1 keys), ``squad_v2``, ``cmrc``, or ``auto``: CMRC style for Chinese
    contexts (SQuAD's whitespace tokens make every unsegmented Chinese answer one word; unanswerable
    questions scored as SQuAD v2 does, see ``score_cmrc``), else SQuAD v2 when any question is
    unanswerable or null odds are given, else SQuAD v1.1.
    Missing predictions (absent, or None) count as wrong; ``missing`` and ``missing_ids`` report
    them. ``squad`` has no unanswerable questions: on data with some, a DataError.
    """
    metric = resolve_metric(examples, metric, with_null_odds=na_probs is not None)
    predictions = {qid: text for qid, text in predictions.items() if text is not None}
    if metric == "squad":
        no_answer = [ex["id"] for ex in examples if unanswerable(ex)]
        if no_answer:
            raise DataError(
                f"metric squad (SQuAD v1.1) cannot score unanswerable questions, and {len(no_answer)} of the "
                f"{len(examples)} questions are (first: {no_answer[0]!r}); use metric squad_v2 (or cmrc)"
            )
    if metric == "squad":
        result = score_squad_v1(examples, predictions)
    elif metric == "squad_v2":
        result = score_squad_v2(examples, predictions, na_probs)
    elif metric == "cmrc":
        result = score_cmrc(examples, predictions, na_probs)
    else:
        raise ValueError(f"unknown metric {metric!r}: auto, squad, squad_v2 or cmrc")
    missing = missing_ids(examples, predictions)
    result["missing"] = len(missing)
    if missing:
        result["missing_ids"] = missing[:5]
    return result


# -- the null threshold ------------------------------------------------------------------------


def tune_threshold(
    examples: list[dict], predictions: dict[str, str], null_odds: dict[str, float], *, metric: str = "auto"
) -> dict:
    """The null threshold that maximises F1 on these examples, and the metrics that applying it gives.

    ``predictions``: each question's best non-empty span (what is answered when the question is
    not abstained on); ``null_odds``: null score minus best span score. Applying a threshold ``t``
    answers a question when its null odds are ``<= t`` and abstains (empty answer) when they are
    ``> t``. Returns ``{"threshold": t, **score(...)}`` of the predictions with ``t`` applied, so the
    F1 reported is the one that applying ``t`` gives, exactly.

    Unlike the official script's search (``best_f1_thresh``), the threshold always reproduces its F1:
    tied null odds are answered or abstained on together, and when abstaining on every question is
    best the threshold lies below every null odds value (the official script reports 0.0 then,
    which, for null odds, answers every question with negative odds). ``metric``: ``squad_v2``, or
    ``cmrc`` (unanswerable questions scored as ``score_cmrc`` does); ``auto`` picks by language."""
    metric = resolve_metric(examples, metric, with_null_odds=True)
    if metric not in ("squad_v2", "cmrc"):
        raise DataError(f"metric {metric}: tuning the null threshold needs squad_v2 or cmrc")
    missing = [ex["id"] for ex in examples if ex["id"] not in null_odds]
    if missing:
        raise DataError(f"no null odds for {len(missing)} questions (first: {missing[0]!r})")

    def question_f1(example: dict, text: str) -> float:
        if unanswerable(example):
            return float(is_empty(text))
        if metric == "cmrc":
            return max(cmrc_f1(g, text) for g in example["answers"]["text"])
        golds = [t for t in example["answers"]["text"] if normalize_answer(t)] or [""]
        return max(squad_f1(g, text) for g in golds)

    # Gain of answering each question instead of abstaining, summed per distinct null odds value.
    gain: dict[float, float] = {}
    for ex in examples:
        answered = question_f1(ex, str(predictions.get(ex["id"], "")))
        gain[null_odds[ex["id"]]] = gain.get(null_odds[ex["id"]], 0.0) + answered - question_f1(ex, "")
    values = sorted(gain)
    best, current = 0.0, 0.0
    threshold = values[0] - 1.0 if values else 0.0  # below every value: abstain on all
    for value in values:
        current += gain[value]
        if current > best + 1e-12:
            best, threshold = current, value
    applied = {
        ex["id"]: ("" if null_odds[ex["id"]] > threshold else str(predictions.get(ex["id"], ""))) for ex in examples
    }
    return {"threshold": threshold, **score(examples, applied, metric=metric)}


__all__ = [
    "CMRC_PUNCTUATION",
    "cmrc_em",
    "cmrc_f1",
    "cmrc_strip_punctuation",
    "is_chinese",
    "longest_common_substring",
    "mixed_segmentation",
    "normalize_answer",
    "null_answer_competes",
    "resolve_metric",
    "score",
    "score_cmrc",
    "score_squad_v1",
    "score_squad_v2",
    "squad_exact",
    "squad_f1",
    "tune_threshold",
]
