"""The package's import direction: data -> features/cache -> train -> eval -> metrics, with config and
dist below all of them; evaluation never imports training."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest


def _loaded_after_import(module: str, prefix: str) -> list[str]:
    probe = f"import sys, {module}\nprint(sorted(m for m in sys.modules if m.startswith({prefix!r})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout)


@pytest.mark.parametrize(
    "module",
    [
        "qa_dist.eval.evaluator",
        "qa_dist.eval.run",
        "qa_dist.eval.postprocess",
        "qa_dist.eval.hooks",
        "qa_dist.metrics",
        "qa_dist.features.prepare",
        "qa_dist.features",
        "qa_dist.data",
        "qa_dist.metrics.evaluate_modules",
    ],
)
def test_evaluation_and_what_is_below_it_never_import_training(module):
    assert _loaded_after_import(module, "qa_dist.train") == []


@pytest.mark.parametrize("module", ["qa_dist.config", "qa_dist.runtime.dist", "qa_dist.errors", "qa_dist.runtime.fsutil"])
def test_config_and_dist_import_nothing_above_them(module):
    above = [
        m for m in _loaded_after_import(module, "qa_dist.") if m not in {module, "qa_dist.errors", "qa_dist.runtime.fsutil"}
    ]
    assert above == []
