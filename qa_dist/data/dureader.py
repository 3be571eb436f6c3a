"""DuReader 2.0 (raw and preprocessed JSONL) read into SQuAD-style flat records.

A DuReader record holds one question over several retrieved documents of several paragraphs each;
extractive QA needs one context with a located answer, so each record becomes one record with one
paragraph as its context:

- preprocessed records (with ``fake_answers``): the paragraph ``most_related_para`` of document
  ``answer_docs[0]``; the answer is ``fake_answers[0]``, placed by ``answer_spans[0]`` (token indices
  into ``segmented_paragraphs``) when the segmented paragraph joins back to the paragraph exactly and
  the text there is the fake answer, else at its first occurrence in the paragraph;
- raw records (``answers`` but no ``fake_answers``): the first paragraph that contains a reference
  answer verbatim, selected documents (``is_selected``) first, in order, then the others; the answer
  is that reference at its first occurrence;
- records without ``answers`` (test sets; only with ``labelled=False``): ``most_related_para`` of
  the first document that has one (selected documents first), else the paragraph that holds the most
  distinct characters of the question (a set: each character counts once; ties: the first).

Every reference answer (``answers``, deduplicated) is kept after the located one for scoring, with
its first occurrence in the context or ``answer_start`` -1: DuReader's references are free-written
summaries that mostly do not occur verbatim, so unlike CMRC2018's they are not errors with strict.
A labelled record whose answer cannot be located is skipped and counted in the report (an error
with strict); with ``labelled=False`` it is kept, unlabelled, with the test-set choice of context.
``question_type``, ``yesno_answers``, ``match_scores`` and the other keys are ignored.
"""

from __future__ import annotations

from typing import Any

from qa_dist.data.validate import ValidationReport, _blank, _where
from qa_dist.errors import DataError

KEYS = ("question_id", "documents")


def is_dureader(item: Any) -> bool:
    """A DuReader record: an object with ``question_id`` or ``documents`` and no SQuAD ``context``."""
    return isinstance(item, dict) and "context" not in item and any(key in item for key in KEYS)


class _Unlocatable(Exception):
    """The record has no answer that can be located in a paragraph (the reason is the message)."""


def _index(value: Any, size: int, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: {what} must be an integer, got {type(value).__name__}")
    if not 0 <= value < size:
        raise DataError(f"{where}: {what} {value} is out of range (there are {size})")
    return value


def _list(value: Any, what: str, where: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be a list, got {type(value).__name__}")
    return value


def _documents(record: dict, where: str) -> list[dict]:
    documents = _list(record["documents"], "documents", where)
    for d, document in enumerate(documents):
        if not isinstance(document, dict):
            raise DataError(f"{where}: documents[{d}] must be an object, got {type(document).__name__}")
        paragraphs = _list(document.get("paragraphs", []), f"documents[{d}].paragraphs", where)
        for p, paragraph in enumerate(paragraphs):
            if not isinstance(paragraph, str):
                raise DataError(
                    f"{where}: documents[{d}].paragraphs[{p}] must be a string, got {type(paragraph).__name__}"
                )
        title = document.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(f"{where}: documents[{d}].title must be a string, got {type(title).__name__}")
    return documents


def _in_reading_order(documents: list[dict]) -> list[int]:
    """Document indices: selected documents first, in order, then the others."""
    selected = [d for d, doc in enumerate(documents) if doc.get("is_selected")]
    chosen = set(selected)
    return selected + [d for d in range(len(documents)) if d not in chosen]


def _texts(value: Any, what: str, where: str) -> list[str]:
    """Non-blank strings of a list, deduplicated, in order."""
    out: list[str] = []
    for i, text in enumerate(_list(value, what, where)):
        if not isinstance(text, str):
            raise DataError(f"{where}: {what}[{i}] must be a string, got {type(text).__name__}")
        if not _blank(text) and text not in out:
            out.append(text)
    return out


def _preprocessed(record: dict, documents: list[dict], where: str) -> tuple[dict, str, str, int]:
    fake = _texts(record["fake_answers"], "fake_answers", where)
    answer_docs = _list(record.get("answer_docs", []), "answer_docs", where)
    if not fake or not answer_docs:
        raise _Unlocatable("no fake_answers or answer_docs")
    document = documents[_index(answer_docs[0], len(documents), "answer_docs[0]", where)]
    paragraphs = document.get("paragraphs", [])
    if "most_related_para" not in document:
        raise DataError(f"{where}: documents[{answer_docs[0]}] is missing key 'most_related_para'")
    p = _index(document["most_related_para"], len(paragraphs), "most_related_para", where)
    context, text = paragraphs[p], fake[0]
    start = -1
    segmented = document.get("segmented_paragraphs")
    spans = record.get("answer_spans")
    if (
        isinstance(segmented, list)
        and p < len(segmented)
        and isinstance(segmented[p], list)
        and all(isinstance(token, str) for token in segmented[p])
        and "".join(segmented[p]) == context
        and isinstance(spans, list)
        and spans
        and isinstance(spans[0], list)
        and spans[0]
        and isinstance(spans[0][0], int)
        and not isinstance(spans[0][0], bool)
        and 0 <= spans[0][0] < len(segmented[p])
    ):
        start = sum(len(token) for token in segmented[p][: spans[0][0]])
        if context[start : start + len(text)] != text:
            start = -1
    if start < 0:
        start = context.find(text)
    if start < 0:
        raise _Unlocatable(f"fake answer {text!r} does not occur in its paragraph")
    return document, context, text, start


def _raw(references: list[str], documents: list[dict]) -> tuple[dict, str, str, int]:
    for d in _in_reading_order(documents):
        for context in documents[d].get("paragraphs", []):
            for text in references:
                start = context.find(text)
                if start >= 0:
                    return documents[d], context, text, start
    raise _Unlocatable("no paragraph contains a reference answer verbatim")


def _unlabelled(record: dict, documents: list[dict], where: str) -> tuple[dict, str]:
    order = _in_reading_order(documents)
    for d in order:
        paragraphs = documents[d].get("paragraphs", [])
        if "most_related_para" in documents[d] and paragraphs:
            p = _index(documents[d]["most_related_para"], len(paragraphs), f"documents[{d}].most_related_para", where)
            if not _blank(paragraphs[p]):
                return documents[d], paragraphs[p]
    question = record.get("question")
    wanted = {ch for ch in question if not ch.isspace()} if isinstance(question, str) else set()
    best = None
    for d in order:
        for paragraph in documents[d].get("paragraphs", []):
            if _blank(paragraph):
                continue
            shared = len(wanted & set(paragraph))
            if best is None or shared > best[0]:
                best = (shared, documents[d], paragraph)
    if best is None:
        raise _Unlocatable("no document has a non-empty paragraph")
    return best[1], best[2]


def dureader_record(item: dict, location: str, path, *, strict: bool, labelled: bool, report: ValidationReport):
    """The flat record of the DuReader record ``item`` (at ``location`` in ``path``), or None when it
    is unlocatable: then it is counted in ``report.skipped`` (an error when ``strict``)."""
    qid = item.get("question_id")
    named = str(qid) if isinstance(qid, (int, str)) and not isinstance(qid, bool) else qid
    where = _where(str(path), named, location)
    for key in KEYS:
        if key not in item:
            raise DataError(f"{where}: DuReader record is missing key {key!r}")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise DataError(f"{where}: question_id must be an integer or a string, got {type(qid).__name__}")
    qid = str(qid)
    documents = _documents(item, where)
    record = {"id": qid, "is_impossible": False}
    if "question" in item:
        record["question"] = item["question"]
    try:
        if "answers" not in item:
            if labelled:
                raise DataError(
                    f"{where}: DuReader record has no 'answers' (a test set?): it can be predicted on "
                    "(qa-dist predict) but not trained on or scored"
                )
            document, context = _unlabelled(item, documents, where)
            answers = None
        else:
            references = _texts(item["answers"], "answers", where)
            try:
                if "fake_answers" in item:
                    document, context, text, start = _preprocessed(item, documents, where)
                else:
                    document, context, text, start = _raw(references, documents)
            except _Unlocatable:
                if labelled or strict:
                    raise
                document, context = _unlabelled(item, documents, where)  # kept to predict on
                answers = None
            else:
                answers = [(text, start)] + [(ref, context.find(ref)) for ref in references if ref != text]
    except _Unlocatable as reason:
        if strict:
            raise DataError(
                f"{where}: no answer can be located ({reason}); strict mode does not skip questions"
            ) from None
        report.skipped.append(qid)
        return None
    record["context"] = context
    record["title"] = document.get("title") or ""
    if answers is not None:
        record["answers"] = {"text": [t for t, _ in answers], "answer_start": [s for _, s in answers]}
    return record
