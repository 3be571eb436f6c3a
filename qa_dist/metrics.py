"""SQuAD v1.1, SQuAD v2.0 and CMRC2018 metrics, written in the project.

``evaluate.load("squad_v2")`` fetches its script from the hub at run time and fails offline, so the
official scripts' logic is implemented here and kept numerically identical to them, with one
deliberate difference: a question without a prediction counts as wrong and is reported (the
official v2 script skips it and then crashes computing HasAns/NoAns).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable

from qa_dist.errors import DataError

# -- SQuAD (official evaluate-v1.1.py / evaluate-v2.0.py) ---------------------------------------

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


def _missing(examples: list[dict], predictions: dict) -> list[str]:
    return [ex["id"] for ex in examples if ex["id"] not in predictions]


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


def _best_threshold(predictions: dict, scores: dict, na_probs: dict, has_ans: dict) -> tuple[float, float]:
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
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(preds_for_thresh, exact, na_probs, has_ans)
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(preds_for_thresh, f1, na_probs, has_ans)
    return result


# -- CMRC2018 (official cmrc2018_evaluate.py) ---------------------------------------------------

# The official script's punctuation list, as given (its "……" entry never matches a single character).
CMRC_PUNCTUATION = {
    "-",
    ":",
    "_",
    "*",
    "^",
    "/",
    "\\",
    "~",
    "`",
    "+",
    "=",
    "，",
    "。",
    "：",
    "？",
    "！",
    "“",
    "”",
    "；",
    "’",
    "《",
    "》",
    "……",
    "·",
    "、",
    "「",
    "」",
    "（",
    "）",
    "－",
    "～",
    "『",
    "』",
}
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def _word_tokenize(text: str) -> list[str]:
    # The official script calls nltk.word_tokenize, which needs the punkt data (a download). NLTK's
    # Treebank word tokenizer alone gave identical scores on real CMRC2018 and DRCD predictions.
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize(text)


def mixed_segmentation(text: str, remove_punctuation: bool = False) -> list[str]:
    """Each CJK character (and listed punctuation) one token; other runs word-tokenized."""
    out, run = [], ""
    for ch in str(text).lower().strip():
        if remove_punctuation and ch in CMRC_PUNCTUATION:
            continue
        if _CJK.search(ch) or ch in CMRC_PUNCTUATION:
            if run:
                out.extend(_word_tokenize(run))
                run = ""
            out.append(ch)
        else:
            run += ch
    if run:
        out.extend(_word_tokenize(run))
    return out


def cmrc_strip_punctuation(text: str) -> str:
    return "".join(ch for ch in str(text).lower().strip() if ch not in CMRC_PUNCTUATION)


def longest_common_substring(a: list[str], b: list[str]) -> int:
    """Length of the longest common contiguous run of tokens."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_f1(gold: str, pred: str) -> float:
    gold_segs, pred_segs = mixed_segmentation(gold, True), mixed_segmentation(pred, True)
    lcs = longest_common_substring(gold_segs, pred_segs)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred_segs), lcs / len(gold_segs)
    return 2 * precision * recall / (precision + recall)


def cmrc_em(gold: str, pred: str) -> int:
    return int(cmrc_strip_punctuation(gold) == cmrc_strip_punctuation(pred))


def score_cmrc(examples: list[dict], predictions: dict[str, str]) -> dict:
    """``F1``, ``EM``, ``AVERAGE``, ``TOTAL``, ``SKIP`` as cmrc2018_evaluate.py computes them (as numbers)."""
    f1 = em = 0.0
    skip = 0
    for ex in examples:
        if ex["id"] not in predictions:
            skip += 1
            continue
        pred = str(predictions[ex["id"]])
        golds = ex["answers"]["text"]
        f1 += max(cmrc_f1(g, pred) for g in golds)
        em += max(cmrc_em(g, pred) for g in golds)
    total = len(examples)
    f1_score, em_score = 100.0 * f1 / total, 100.0 * em / total
    return {"AVERAGE": (em_score + f1_score) * 0.5, "F1": f1_score, "EM": em_score, "TOTAL": total, "SKIP": skip}


# -- choosing ---------------------------------------------------------------------------------


def is_chinese(examples: list[dict], sample: int = 200) -> bool:
    """Contexts mostly made of CJK characters."""
    text = "".join(ex["context"] for ex in examples[:sample])
    letters = [ch for ch in text if not ch.isspace()]
    return bool(letters) and sum(bool(_CJK.search(ch)) for ch in letters) / len(letters) > 0.3


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
    contexts (SQuAD's whitespace tokens make every unsegmented Chinese answer one word), else SQuAD
    v2 when any question is unanswerable or null odds are given, else SQuAD v1.1.
    Missing predictions (absent, or None) count as wrong; ``missing`` and ``missing_ids`` report
    them. ``squad`` and ``cmrc`` have no unanswerable questions: on data with some, a DataError.
    """
    metric = resolve_metric(examples, metric, with_null_odds=na_probs is not None)
    predictions = {qid: text for qid, text in predictions.items() if text is not None}
    if metric in ("squad", "cmrc"):
        unanswerable = [ex["id"] for ex in examples if ex["is_impossible"] or not ex["answers"]["text"]]
        if unanswerable:
            name = "squad (SQuAD v1.1)" if metric == "squad" else "cmrc (CMRC2018)"
            raise DataError(
                f"metric {name} cannot score unanswerable questions, and {len(unanswerable)} of the "
                f"{len(examples)} questions are (first: {unanswerable[0]!r}); use metric squad_v2"
            )
    if metric == "squad":
        result = score_squad_v1(examples, predictions)
    elif metric == "squad_v2":
        result = score_squad_v2(examples, predictions, na_probs)
    elif metric == "cmrc":
        result = score_cmrc(examples, predictions)
    else:
        raise ValueError(f"unknown metric {metric!r}: auto, squad, squad_v2 or cmrc")
    missing = _missing(examples, predictions)
    result["missing"] = len(missing)
    if missing:
        result["missing_ids"] = missing[:5]
    return result
