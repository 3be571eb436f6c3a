"""What the metrics do not say: is the gold answer among the n best, at which rank, and which
predictions are confident but wrong; the curves and histograms a dashboard shows (as plain data:
the evaluator returns them, the tracker renders them). Pure functions."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from qa_dist.metrics import cmrc_em, score, squad_exact


@dataclass(frozen=True)
class Table:
    """Rows for a dashboard table (wandb: a Table; TensorBoard: a text summary of the first rows)."""

    columns: list[str]
    rows: list[list]


@dataclass(frozen=True)
class Curve:
    """``ys`` against ``xs`` (wandb: a line plot per y column from one Table; TensorBoard: none, the
    scalars at the chosen point are logged as eval/ scalars)."""

    x: str
    xs: list[float]
    ys: dict[str, list[float]]
    title: str


@dataclass(frozen=True)
class Histogram:
    """A distribution of values (wandb: Histogram; TensorBoard: add_histogram)."""

    values: list[float]


def _golds(example: dict) -> list[str]:
    return [g for g in example["answers"]["text"] if g] or [""]


def _exact(metric: str):
    return cmrc_em if metric == "cmrc" else squad_exact


def prediction_probability(nbest: list[dict], answer: str) -> float:
    """Probability (within the n best) of the entry that became the answer."""
    return next((x["probability"] for x in nbest if x["text"] == answer), 0.0)


def diagnostics(
    examples: list[dict],
    answers: dict[str, str],
    nbest: dict[str, list[dict]],
    metric: str,
    *,
    confidence: float = 0.5,
    rows: int = 20,
) -> tuple[dict, list[list]]:
    """Metrics (``gold_in_nbest``, ``gold_top1``: % of answerable questions; ``gold_rank_mean`` /
    ``gold_rank_median``: 1-based rank where found; ``confident_wrong``: % of questions answered
    wrongly with probability >= ``confidence``) and the table of the most confident wrong answers:
    [id, question, predicted, probability, gold]."""
    exact = _exact(metric)
    ranks, answerable, wrong = [], 0, []
    n_best = max((len(v) for v in nbest.values()), default=0)
    for ex in examples:
        qid, golds = ex["id"], _golds(ex)
        entries = nbest.get(qid, [])
        if golds != [""]:
            answerable += 1
            rank = next(
                (k for k, x in enumerate(entries, 1) if x["text"] and any(exact(g, x["text"]) for g in golds)),
                None,
            )
            if rank is not None:
                ranks.append(rank)
        answer = answers.get(qid, "")
        right = any(exact(g, answer) for g in golds) if answer else golds == [""]
        probability = prediction_probability(entries, answer)
        if not right and probability >= confidence:
            wrong.append([qid, ex["question"], answer or "(no answer)", probability, " | ".join(golds) or "(none)"])
    wrong.sort(key=lambda row: -row[3])
    metrics = {
        "gold_in_nbest": 100.0 * len(ranks) / answerable if answerable else 0.0,
        "gold_top1": 100.0 * sum(r == 1 for r in ranks) / answerable if answerable else 0.0,
        "gold_rank_mean": statistics.fmean(ranks) if ranks else 0.0,
        "gold_rank_median": statistics.median(ranks) if ranks else 0.0,
        "confident_wrong": 100.0 * len(wrong) / len(examples) if examples else 0.0,
        "recall_at_k": recall_at_k(ranks, answerable, n_best),
    }
    return metrics, wrong[:rows]


def recall_at_k(ranks: list[int], answerable: int, n: int) -> list[float]:
    """% of answerable questions whose gold answer is among the first k of the n best, k = 1..n."""
    counts = np.bincount(np.asarray(ranks, dtype=np.int64), minlength=n + 1)[1 : n + 1]
    return (100.0 * np.cumsum(counts) / answerable).tolist() if answerable else [0.0] * n


def null_threshold_curve(
    examples: list[dict], span_answers: dict[str, str], null_odds: dict[str, float], metric: str, points: int = 50
) -> Curve:
    """EM and F1 when a question is answered with its best span if its null odds are <= the
    threshold and left empty above it, for about ``points`` thresholds (distinct null odds values,
    subsampled, and one below them all: abstain everywhere). Each question is scored by
    ``qa_dist.metrics.score`` twice (its span, the empty answer); the rest are cumulative sums."""
    em_key, f1_key = ("EM", "F1") if metric == "cmrc" else ("exact", "f1")
    span_em, span_f1, empty_em, empty_f1, odds = [], [], [], [], []
    for ex in examples:
        one = [ex]
        answered = score(one, {ex["id"]: str(span_answers.get(ex["id"], ""))}, metric=metric)
        empty = score(one, {ex["id"]: ""}, metric=metric)
        span_em.append(answered[em_key])
        span_f1.append(answered[f1_key])
        empty_em.append(empty[em_key])
        empty_f1.append(empty[f1_key])
        odds.append(null_odds.get(ex["id"], float("inf")))
    odds_arr = np.asarray(odds, dtype=np.float64)
    order = np.argsort(odds_arr, kind="stable")
    sorted_odds = odds_arr[order]
    distinct = np.unique(sorted_odds[np.isfinite(sorted_odds)])
    if len(distinct) > points:
        distinct = distinct[np.linspace(0, len(distinct) - 1, points).round().astype(np.int64)]
    below = (distinct[0] - 1.0) if len(distinct) else 0.0
    thresholds = np.concatenate([[below], distinct])
    answered_count = np.searchsorted(sorted_odds, thresholds, side="right")
    n = max(len(examples), 1)
    ys = {}
    for name, span, empty in (("EM", span_em, empty_em), ("F1", span_f1, empty_f1)):
        cum_span = np.concatenate([[0.0], np.cumsum(np.asarray(span)[order])])
        cum_empty = np.concatenate([[0.0], np.cumsum(np.asarray(empty)[order])])
        ys[name] = ((cum_span[answered_count] + cum_empty[-1] - cum_empty[answered_count]) / n).tolist()
    return Curve("null threshold", thresholds.tolist(), ys, "EM and F1 against the null threshold")


def null_odds_histograms(examples: list[dict], null_odds: dict[str, float]) -> dict[str, Histogram]:
    """Null odds of answerable and of unanswerable questions."""
    answerable = [null_odds[ex["id"]] for ex in examples if ex["id"] in null_odds and _golds(ex) != [""]]
    unanswerable = [null_odds[ex["id"]] for ex in examples if ex["id"] in null_odds and _golds(ex) == [""]]
    return {"answerable": Histogram(answerable), "unanswerable": Histogram(unanswerable)}
