"""SQuAD v1.1 and v2.0 metrics, numerically identical to the official evaluate-v1.1.py and
evaluate-v2.0.py (see ``qa_dist.metrics`` for why they are written here)."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable

from qa_dist.metrics.common import best_threshold

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (as SQuAD does)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str, *, empty_matches_empty: bool = True) -> float:
    """Token-overlap F1. v2 counts an empty gold and empty prediction as a match; v1.1 never does."""
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
    if empty_matches_empty and (not gold_toks or not pred_toks):
        return float(gold_toks == pred_toks)
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def score_squad_v1(examples: list[dict], predictions: dict[str, str]) -> dict:
    """``exact_match`` and ``f1`` as evaluate-v1.1.py computes them (missing predictions score 0)."""
    em = f1 = 0.0
    for ex in examples:
        if ex["id"] not in predictions:
            continue
        golds, pred = ex["answers"]["text"], predictions[ex["id"]]
        em += max(squad_exact(g, pred) for g in golds)
        f1 += max(squad_f1(g, pred, empty_matches_empty=False) for g in golds)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f1 / len(examples)}


def score_squad_v2(
    examples: list[dict],
    predictions: dict[str, str],
    na_probs: dict[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """The keys and values of evaluate-v2.0.py; with ``na_probs``, also the best thresholds."""
    has_ans = {ex["id"]: bool(ex["answers"]["text"]) for ex in examples}  # the raw list, as the script does
    exact, f1 = {}, {}
    for ex in examples:
        qid = ex["id"]
        golds = [t for t in ex["answers"]["text"] if normalize_answer(t)] or [""]
        pred = predictions.get(qid)
        if pred is None:  # counted as wrong, and reported
            exact[qid] = f1[qid] = 0.0
            continue
        exact[qid] = max(squad_exact(g, pred) for g in golds)
        f1[qid] = max(squad_f1(g, pred) for g in golds)
    probs = na_probs or {qid: 0.0 for qid in predictions}
    thresholded = {}
    for name, raw in (("exact", exact), ("f1", f1)):
        thresholded[name] = {
            qid: (float(not has_ans[qid]) if probs.get(qid, 0.0) > na_prob_thresh else s) for qid, s in raw.items()
        }

    def block(ids: Iterable[str]) -> dict:
        ids = list(ids)
        n = len(ids)
        return {
            "exact": 100.0 * sum(thresholded["exact"][q] for q in ids) / n if n else 0.0,
            "f1": 100.0 * sum(thresholded["f1"][q] for q in ids) / n if n else 0.0,
            "total": n,
        }

    result = block(exact)
    has = [q for q in exact if has_ans[q]]
    no = [q for q in exact if not has_ans[q]]
    if has:
        result.update({f"HasAns_{k}": v for k, v in block(has).items()})
    if no:
        result.update({f"NoAns_{k}": v for k, v in block(no).items()})
    if na_probs is not None:
        preds_for_thresh = {q: predictions.get(q, "") for q in exact}
        result["best_exact"], result["best_exact_thresh"] = best_threshold(preds_for_thresh, exact, na_probs, has_ans)
        result["best_f1"], result["best_f1_thresh"] = best_threshold(preds_for_thresh, f1, na_probs, has_ans)
    return result
