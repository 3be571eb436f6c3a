"""The package's import direction: data -> features/cache -> train -> eval -> metrics, with config and
dist below all of them; evaluation never imports training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


BELOW_ALL = ("qa_dist.config", "qa_dist.runtime", "qa_dist.errors")
"""What every stage may import: the config tree, the runtime (dist, preemption, report, fsutil), errors."""


@pytest.mark.parametrize(
    "module",
    [
        "qa_dist.config",
        "qa_dist.runtime.dist",
        "qa_dist.runtime.report",
        "qa_dist.runtime.preemption",
        "qa_dist.errors",
    ],
)
def test_config_and_runtime_import_nothing_above_them(module):
    above = [m for m in _loaded_after_import(module, "qa_dist.") if not m.startswith(BELOW_ALL)]
    assert above == []


@pytest.mark.parametrize("module", ["qa_dist.metrics", "qa_dist.metrics.evaluate_modules"])
def test_metrics_import_no_stage_above_them(module):
    above = [m for m in _loaded_after_import(module, "qa_dist.") if not m.startswith((*BELOW_ALL, "qa_dist.metrics"))]
    assert above == []


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 90
PACKAGE = Path(__file__).resolve().parents[2] / "qa_dist"


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "samples" not in p.parts)


def test_no_module_is_longer_than_a_few_screens():
    long = {
        str(p.relative_to(PACKAGE)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_is_longer_than_a_screen_and_a_half():
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if (n := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = n
    assert long == {}
