"""The evaluation hook the training loop calls. Here, in ``eval``, so that evaluators (the gathered
one, users' own) never import training code; the loop imports them (training runs evaluation)."""

from __future__ import annotations

from typing import Protocol


class Evaluator(Protocol):
    """The evaluation hook: the loop calls it; it owns its own schedule."""

    def maybe_run(self, step: int, model) -> dict | None: ...

    def finish(self, step: int, model) -> dict | None: ...


class NullEvaluator:
    def maybe_run(self, step: int, model) -> dict | None:
        return None

    def finish(self, step: int, model) -> dict | None:
        return None


class PeriodicEvaluator:
    """Base for evaluators that run every ``every`` optimizer steps (0: only at the end) and once at
    the end of training (unless that step was just evaluated). Every rank calls ``maybe_run`` and
    ``finish``; subclasses implement ``run``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.last_step: int | None = None

    def maybe_run(self, step: int, model) -> dict | None:
        if self.every and step % self.every == 0:
            self.last_step = step
            return self.run(step, model)
        return None

    def finish(self, step: int, model) -> dict | None:
        if self.last_step == step:
            return None
        self.last_step = step
        return self.run(step, model)

    def run(self, step: int, model) -> dict | None:
        raise NotImplementedError
