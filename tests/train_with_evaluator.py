"""Run by the tests in its own process: train with an evaluator that records when it was called."""

from __future__ import annotations

import json
import sys

from qa_dist.config import load_config
from qa_dist.train import PeriodicEvaluator, train


class Recording(PeriodicEvaluator):
    def __init__(self, every: int) -> None:
        super().__init__(every)
        self.calls: list[int] = []

    def run(self, step: int, model) -> dict:
        self.calls.append(step)
        return {"eval/score": float(step)}


out, every, *overrides = sys.argv[1:]
evaluator = Recording(int(every))
result = train(load_config(None, overrides), evaluator=evaluator)
with open(out, "w") as f:
    json.dump({"calls": evaluator.calls, "steps": result.steps}, f)
