"""The flat example schema every reader in ``qa_dist.data`` produces, as a ``TypedDict``."""

from __future__ import annotations

from typing import TypedDict


class Answers(TypedDict):
    """Reference answers: parallel lists; empty for an unanswerable (or unlabelled) question.
    ``answer_start`` is a character offset in the context, -1 for a reference kept for scoring only."""

    text: list[str]
    answer_start: list[int]


class Example(TypedDict):
    """One question, flat: what ``qa_dist.load_examples`` returns and the feature builders,
    ``qa_dist.postprocess`` and ``qa_dist.score`` read."""

    id: str
    title: str
    context: str
    question: str
    answers: Answers
    is_impossible: bool
