"""Data layer: SQuAD-format readers and validation."""

from qa_dist.data.loading import LoadedData, load_examples, load_source, sample_path
from qa_dist.data.schema import Answers, Example
from qa_dist.data.streaming import StreamedSource, stream_source
from qa_dist.data.validate import ValidationReport

__all__ = [
    "Answers",
    "Example",
    "LoadedData",
    "StreamedSource",
    "ValidationReport",
    "load_examples",
    "load_source",
    "sample_path",
    "stream_source",
]
