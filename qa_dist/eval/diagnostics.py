"""What the metrics do not say: is the gold answer among the n best, at which rank, and which
predictions are confident but wrong. Pure functions."""

from __future__ import annotations

import statistics

from qa_dist.metrics import cmrc_em, squad_exact


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
    for ex in examples:
        qid, golds = ex["id"], [g for g in ex["answers"]["text"] if g] or [""]
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
    }
    return metrics, wrong[:rows]
