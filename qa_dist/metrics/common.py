"""What the metric families share: which questions have no answer, which predictions are empty,
which questions lack a prediction, and what counts as a CJK character."""

from __future__ import annotations

import re

CJK = re.compile(r"[\u4e00-\u9fa5]")


def unanswerable(example: dict) -> bool:
    return bool(example.get("is_impossible")) or not example["answers"]["text"]


def is_empty(prediction: str) -> bool:
    return not prediction.strip()


def missing_ids(examples: list[dict], predictions: dict) -> list[str]:
    return [ex["id"] for ex in examples if ex["id"] not in predictions]


def best_threshold(predictions: dict, scores: dict, na_probs: dict, has_ans: dict) -> tuple[float, float]:
    """The no-answer threshold that maximises the score (evaluate-v2.0.py's find_best_thresh)."""
    current = best = sum(1 for q in has_ans if not has_ans[q])
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1
        if current > best:
            best, best_thresh = current, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh
