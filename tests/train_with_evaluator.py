"""Run by the tests in its own process: train with an evaluator that records when it was called.
With QA_DIST_TEST_EVAL_SECONDS set, every evaluation computes that long (forwards of the model in
eval mode, asking qa_dist.runtime.preemption.check_stop after each, as the gathered evaluation does)
and says so on stderr first, with the rank."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from qa_dist.config import load_config
from qa_dist.train import PeriodicEvaluator, train

try:
    from qa_dist.runtime.preemption import check_stop
except ImportError:  # an older qa-dist, for measuring what it did
    check_stop = None


class Recording(PeriodicEvaluator):
    def __init__(self, every: int, seconds: float = 0.0) -> None:
        super().__init__(every)
        self.calls: list[int] = []
        self.seconds = seconds

    def run(self, step: int, model) -> dict:
        self.calls.append(step)
        if self.seconds:
            print(f"rank {os.environ.get('RANK', '0')} evaluating at step {step}", file=sys.stderr, flush=True)
            ids = torch.randint(1000, 2000, (8, 128))
            deadline = time.monotonic() + self.seconds
            model.eval()
            with torch.no_grad():
                while time.monotonic() < deadline:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids))
                    if check_stop is not None:
                        check_stop()  # as the gathered evaluation does after every batch
            model.train()
        return {"eval/score": float(step)}


out, every, *overrides = sys.argv[1:]
evaluator = Recording(int(every), float(os.environ.get("QA_DIST_TEST_EVAL_SECONDS", "0")))
result = train(load_config(None, overrides), evaluator=evaluator)
with open(out, "w") as f:
    json.dump({"calls": evaluator.calls, "steps": result.steps}, f)
sys.exit(75 if result.preempted else 0)  # as qa-dist train does
