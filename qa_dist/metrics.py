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


def score_cmrc(examples: list[dict], predictions: dict[str, str], na_probs: dict[str, float] | None = None) -> dict:
    """``F1``, ``EM``, ``AVERAGE``, ``TOTAL``, ``SKIP`` as cmrc2018_evaluate.py computes them (as numbers).

    Data with unanswerable questions (which the official script cannot score) is scored the way
    SQuAD v2 extends v1.1: an unanswerable question scores 100 when the prediction is empty, else 0;
    an answerable one scores the official EM/F1 (an empty prediction 0). Then ``HasAns_*`` and
    ``NoAns_*`` (``EM``, ``F1``, ``total``) are added, and with ``na_probs`` the best thresholds
    (``best_EM``, ``best_EM_thresh``, ``best_F1``, ``best_F1_thresh``) as evaluate-v2.0.py searches
    them. On answerable-only data the output is the official script's alone."""
    em, f1 = {}, {}
    skip = 0
    for ex in examples:
        qid = ex["id"]
        if qid not in predictions:
            skip += 1
            em[qid] = f1[qid] = 0.0
            continue
        pred = str(predictions[qid])
        if _unanswerable(ex):
            em[qid] = f1[qid] = float(_empty(pred))
            continue
        golds = ex["answers"]["text"]
        f1[qid] = max(cmrc_f1(g, pred) for g in golds)
        em[qid] = max(cmrc_em(g, pred) for g in golds)

    def block(ids: list[str]) -> tuple[float, float]:
        n = len(ids)
        return (100.0 * sum(em[q] for q in ids) / n, 100.0 * sum(f1[q] for q in ids) / n) if n else (0.0, 0.0)

    total = len(examples)
    em_score, f1_score = block(list(em))
    result = {"AVERAGE": (em_score + f1_score) * 0.5, "F1": f1_score, "EM": em_score, "TOTAL": total, "SKIP": skip}
    has_ans = {ex["id"]: not _unanswerable(ex) for ex in examples}
    if all(has_ans.values()):
        return result
    for prefix, ids in (("HasAns", [q for q in em if has_ans[q]]), ("NoAns", [q for q in em if not has_ans[q]])):
        if ids:
            result[f"{prefix}_EM"], result[f"{prefix}_F1"] = block(ids)
            result[f"{prefix}_total"] = len(ids)
    if na_probs is not None:
        preds = {q: ("" if _empty(str(predictions.get(q, ""))) else predictions[q]) for q in em}
        result["best_EM"], result["best_EM_thresh"] = _best_threshold(preds, em, na_probs, has_ans)
        result["best_F1"], result["best_F1_thresh"] = _best_threshold(preds, f1, na_probs, has_ans)
    return result


def _unanswerable(example: dict) -> bool:
    return bool(example.get("is_impossible")) or not example["answers"]["text"]


def null_answer_competes(examples: list[dict], metric: str) -> bool:
    """Whether evaluation predicts the null answer (and writes null odds): always for SQuAD v2;
    for CMRC-style data when it has unanswerable questions (the official CMRC data has none)."""
    return metric == "squad_v2" or (metric == "cmrc" and any(_unanswerable(ex) for ex in examples))


def _empty(prediction: str) -> bool:
    return not prediction.strip()


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
    contexts (SQuAD's whitespace tokens make every unsegmented Chinese answer one word; unanswerable
    questions scored as SQuAD v2 does, see ``score_cmrc``), else SQuAD v2 when any question is
    unanswerable or null odds are given, else SQuAD v1.1.
    Missing predictions (absent, or None) count as wrong; ``missing`` and ``missing_ids`` report
    them. ``squad`` has no unanswerable questions: on data with some, a DataError.
    """
    metric = resolve_metric(examples, metric, with_null_odds=na_probs is not None)
    predictions = {qid: text for qid, text in predictions.items() if text is not None}
    if metric == "squad":
        unanswerable = [ex["id"] for ex in examples if _unanswerable(ex)]
        if unanswerable:
            raise DataError(
                f"metric squad (SQuAD v1.1) cannot score unanswerable questions, and {len(unanswerable)} of the "
                f"{len(examples)} questions are (first: {unanswerable[0]!r}); use metric squad_v2 (or cmrc)"
            )
    if metric == "squad":
        result = score_squad_v1(examples, predictions)
    elif metric == "squad_v2":
        result = score_squad_v2(examples, predictions, na_probs)
    elif metric == "cmrc":
        result = score_cmrc(examples, predictions, na_probs)
    else:
        raise ValueError(f"unknown metric {metric!r}: auto, squad, squad_v2 or cmrc")
    missing = _missing(examples, predictions)
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
        if _unanswerable(example):
            return float(_empty(text))
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
