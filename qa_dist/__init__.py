"""qa-dist: distributed training and evaluation for extractive question answering."""

from qa_dist.config import RunConfig, load_config
from qa_dist.data import load_examples
from qa_dist.errors import ConfigError, DataError, QaDistError
from qa_dist.eval.postprocess import postprocess
from qa_dist.features import build_eval_features, build_train_features
from qa_dist.metrics import score

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "QaDistError",
    "RunConfig",
    "build_eval_features",
    "build_train_features",
    "load_config",
    "load_examples",
    "postprocess",
    "score",
]
