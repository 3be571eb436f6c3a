"""The CMRC2018 metric, numerically identical to the official cmrc2018_evaluate.py: mixed
segmentation (each CJK character a token), F1 over the longest common substring."""

from __future__ import annotations

from qa_dist.metrics.common import CJK, best_threshold, is_empty, unanswerable

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
        if CJK.search(ch) or ch in CMRC_PUNCTUATION:
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
        if unanswerable(ex):
            em[qid] = f1[qid] = float(is_empty(pred))
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
    has_ans = {ex["id"]: not unanswerable(ex) for ex in examples}
    if all(has_ans.values()):
        return result
    for prefix, ids in (("HasAns", [q for q in em if has_ans[q]]), ("NoAns", [q for q in em if not has_ans[q]])):
        if ids:
            result[f"{prefix}_EM"], result[f"{prefix}_F1"] = block(ids)
            result[f"{prefix}_total"] = len(ids)
    if na_probs is not None:
        preds = {q: ("" if is_empty(str(predictions.get(q, ""))) else predictions[q]) for q in em}
        result["best_EM"], result["best_EM_thresh"] = best_threshold(preds, em, na_probs, has_ans)
        result["best_F1"], result["best_F1_thresh"] = best_threshold(preds, f1, na_probs, has_ans)
    return result
