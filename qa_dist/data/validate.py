"""Validation of raw question records into flat, checked examples.

Pure functions: they take records that a reader produced (with where each came from) and return
flat examples or raise :class:`DataError` naming the file and the question id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qa_dist.errors import DataError


@dataclass
class Relocation:
    """An answer whose ``answer_start`` did not match its text and was moved to the nearest match."""

    example_id: str
    text: str
    given_start: int
    new_start: int


@dataclass
class ValidationReport:
    """What validation fixed along the way, for the summary printed after loading."""

    source: str
    examples: int = 0
    unanswerable: int = 0
    relocations: list[Relocation] = field(default_factory=list)
    unlocated_references: list[str] = field(default_factory=list)
    """Ids of questions with an extra reference answer not found in the context (kept for scoring)."""
    skipped: list[str] = field(default_factory=list)
    """Ids of DuReader questions skipped because no answer could be located in a paragraph."""

    def summary(self) -> str:
        line = f"{self.source}: {self.examples} questions ({self.unanswerable} unanswerable)"
        if self.relocations:
            first = self.relocations[0]
            line += (
                f"; relocated {len(self.relocations)} answer_start values that did not match their "
                f"text (first: question {first.example_id!r}, {first.given_start} -> {first.new_start})"
            )
        if self.unlocated_references:
            line += (
                f"; {len(self.unlocated_references)} extra reference answers do not occur in their "
                f"context and are kept for scoring only (first: question {self.unlocated_references[0]!r})"
            )
        if self.skipped:
            line += (
                f"; skipped {len(self.skipped)} DuReader questions whose answer cannot be located in a "
                f"paragraph (first: question {self.skipped[0]!r})"
            )
        return line


def _where(source: str, qid: Any, location: str | None = None) -> str:
    at = f" ({location})" if location else ""
    return f"{source}: question {qid!r}{at}" if qid is not None else f"{source}{at}"


_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
"""Invisible characters that are not whitespace to ``str.strip`` (zero-width space, non-joiner,
joiner, word joiner, byte order mark): a text made only of them (and whitespace) is empty."""


_BLANK = re.compile(rf"[\s{_ZERO_WIDTH}]*")


def _blank(text: str) -> bool:
    return _BLANK.fullmatch(text) is not None


def _check_encodable(text: str, what: str, where: str) -> None:
    """A lone surrogate (``"\\ud800"`` escaped in JSON) makes a str that no UTF-8 encoder accepts:
    the tokenizer or Arrow would fail on it much later, without naming the question."""
    if text.isascii():  # (constant time: str knows)
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: {what} has a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} "
            "(not a valid Unicode character; the file escapes half of a surrogate pair)"
        ) from None


def _require_str(value: Any, what: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    _check_encodable(value, what, where)
    if not allow_empty and _blank(value):
        raise DataError(f"{where}: {what} is empty")
    return value


def _normalise_answers(raw: Any, where: str) -> list[tuple[str, int]]:
    """Accept ``[{text, answer_start}, ...]`` or ``{text: [...], answer_start: [...]}``."""
    if isinstance(raw, dict):
        if "text" not in raw or "answer_start" not in raw:
            raise DataError(f"{where}: answers mapping needs keys 'text' and 'answer_start'")
        texts, starts = raw["text"], raw["answer_start"]
        if not isinstance(texts, list) or not isinstance(starts, list):
            raise DataError(f"{where}: answers 'text' and 'answer_start' must be lists")
        if len(texts) != len(starts):
            raise DataError(f"{where}: answers has {len(texts)} texts but {len(starts)} answer_start values")
        pairs = list(zip(texts, starts, strict=True))
    elif isinstance(raw, list):
        pairs = []
        for i, answer in enumerate(raw):
            if not isinstance(answer, dict):
                raise DataError(f"{where}: answer {i} must be an object, got {type(answer).__name__}")
            if "text" not in answer or "answer_start" not in answer:
                key = "text" if "text" not in answer else "answer_start"
                raise DataError(f"{where}: answer {i} is missing key {key!r}")
            pairs.append((answer["text"], answer["answer_start"]))
    else:
        raise DataError(f"{where}: answers must be a list or a mapping, got {type(raw).__name__}")
    out = []
    for i, (text, start) in enumerate(pairs):
        if not isinstance(text, str):
            raise DataError(f"{where}: answer {i} text must be a string, got {type(text).__name__}")
        if not text.isascii():
            _check_encodable(text, f"answer {i} text", where)
        if _blank(text):
            raise DataError(f"{where}: answer {i} text is empty (only whitespace or zero-width characters)")
        if isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{where}: answer {i} answer_start must be an integer, got {type(start).__name__}")
        out.append((text, start))
    return out


def _relocate(context: str, text: str, start: int) -> int | None:
    """Start of the exact occurrence of ``text`` in ``context`` nearest to ``start``, or None."""
    best, pos = None, context.find(text)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1)
    return best


def validate_record(
    record: dict,
    *,
    source: str,
    location: str | None,
    default_impossible: bool | None,
    strict: bool,
    report: ValidationReport,
    labelled: bool = True,
    free_references: bool = False,
) -> dict:
    """Check one question record and return the flat example.

    ``record`` carries ``id``, ``question``, ``context``, ``answers`` and optionally ``title`` and
    ``is_impossible``. ``default_impossible`` is what a missing ``is_impossible`` means: False for
    nested SQuAD files (v1.1 has no such key), None for flat data (unanswerable iff no answers).
    With ``labelled=False`` (data to predict on), ``answers`` may be absent. With
    ``free_references`` (DuReader, whose references are free-written summaries), extra answers
    that do not occur in the context are kept for scoring even when ``strict``.
    """
    qid = record.get("id")
    where = _where(source, qid, location)
    for key in ("id", "question", "context", "answers") if labelled else ("id", "question", "context"):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise DataError(f"{where}: id must be a string, got {type(qid).__name__}")
    qid = str(qid)
    if not qid.isascii():
        _check_encodable(qid, "id", _where(source, None, location))
    if not qid.strip():
        raise DataError(f"{where}: id is empty")
    question = _require_str(record["question"], "question", where)
    context = _require_str(record["context"], "context", where)
    title = record.get("title") or ""
    if not isinstance(title, str):
        raise DataError(f"{where}: title must be a string, got {type(title).__name__}")
    _check_encodable(title, "title", where)
    if not labelled and "answers" not in record:
        record = {**record, "answers": [], "is_impossible": False}
        labelled_here = False
    else:
        labelled_here = True
    answers = _normalise_answers(record["answers"], where)

    impossible = record.get("is_impossible", default_impossible)
    if impossible is None:
        impossible = not answers
    if not isinstance(impossible, bool):
        raise DataError(f"{where}: is_impossible must be true or false, got {impossible!r}")
    if impossible and answers:
        raise DataError(f"{where}: question is marked unanswerable (is_impossible) but has answers")
    if not impossible and not answers and labelled_here:
        raise DataError(f"{where}: answerable question has no answer")

    texts, starts = [], []
    for i, (text, start) in enumerate(answers):
        # A negative start (CMRC2018 uses -1 for "not located") is a mismatch like any other.
        if start < 0 or not context.startswith(text, start):
            found = _relocate(context, text, start)
            if found is None and i > 0 and (free_references or not strict):
                # Official CMRC2018 dev has 193 free-written extra references: the official scorer
                # compares texts only, so they stay as references; training uses the first answer.
                report.unlocated_references.append(qid)
                texts.append(text)
                starts.append(-1)
                continue
            if found is None:
                raise DataError(f"{where}: answer {i} text {text!r} does not occur in the context")
            if strict:
                raise DataError(
                    f"{where}: answer {text!r} is not at answer_start {start} "
                    f"(nearest occurrence at {found}; strict mode does not relocate)"
                )
            report.relocations.append(Relocation(qid, text, start, found))
            start = found
        texts.append(text)
        starts.append(start)

    report.examples += 1
    report.unanswerable += impossible
    return {
        "id": qid,
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": texts, "answer_start": starts},
        "is_impossible": impossible,
    }
