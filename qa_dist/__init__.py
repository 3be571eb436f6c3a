"""qa-dist: distributed training and evaluation for extractive question answering.

The public names are imported on first use (PEP 562): ``import qa_dist.config`` or the command
line's ``qa-dist config --keys`` must not pay for torch, transformers and numba."""

from __future__ import annotations

# Only modules the interpreter has loaded before ``python -m`` runs anything (importlib, sys):
# this file runs while the working directory, which may hold a planted typing.py, is still first
# on sys.path (qa_dist.runtime.safepath removes it next).
import importlib

TYPE_CHECKING = False

__version__ = "0.1.0"

_PUBLIC = {
    "ConfigError": "qa_dist.errors",
    "DataError": "qa_dist.errors",
    "QaDistError": "qa_dist.errors",
    "RunConfig": "qa_dist.config",
    "build_eval_features": "qa_dist.features",
    "build_train_features": "qa_dist.features",
    "evaluate_module": "qa_dist.metrics.evaluate_modules",
    "load_config": "qa_dist.config",
    "load_examples": "qa_dist.data",
    "postprocess": "qa_dist.eval.postprocess",
    "score": "qa_dist.metrics",
    "tune_threshold": "qa_dist.metrics",
}

__all__ = [
    "ConfigError",
    "DataError",
    "QaDistError",
    "RunConfig",
    "build_eval_features",
    "build_train_features",
    "evaluate_module",
    "load_config",
    "load_examples",
    "postprocess",
    "score",
    "tune_threshold",
]
assert sorted(__all__) == sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'qa_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from qa_dist.config import RunConfig, load_config
    from qa_dist.data import load_examples
    from qa_dist.errors import ConfigError, DataError, QaDistError
    from qa_dist.eval.postprocess import postprocess
    from qa_dist.features import build_eval_features, build_train_features
    from qa_dist.metrics import score, tune_threshold
    from qa_dist.metrics.evaluate_modules import evaluate_module
