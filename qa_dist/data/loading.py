"""Readers for the SQuAD family of formats, all producing flat validated examples, held in memory
(``load_source``, ``load_examples``): the examples that :func:`qa_dist.data.stream_source` gives in
bounded batches (see :mod:`qa_dist.data.streaming`), all in one.

Supported sources:
- nested SQuAD JSON (v1.1, v2.0 with ``is_impossible``; CMRC2018 and DRCD use it too), ``.json`` or ``.json.gz``;
- flat JSON (a list of records, or ``{"data": [records]}`` as ``run_qa.py`` writes) and JSONL;
- Hugging Face dataset names (``squad``, ``squad_v2``, ``cmrc2018``...) and local dataset folders
  through ``datasets.load_dataset`` (``load_from_disk`` for ``save_to_disk`` folders);
- DuReader 2.0 JSONL, raw and preprocessed (also in ``.json`` files, which DuReader uses for JSONL),
  recognised by its keys (``question_id``, ``documents``): see :mod:`qa_dist.data.dureader`;
- ``sample:en-train``, ``sample:en-dev``, ``sample:en-train-v1``, ``sample:zh-train``, ``sample:zh-dev``: the small samples
  shipped with the package (see ``qa_dist/samples/LICENSE.md``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qa_dist.data.compressed import MAX_DECOMPRESSED_MB
from qa_dist.data.readers import SAMPLES, file_sha256, looks_like_path, open_hf_dataset, sample_path
from qa_dist.data.streaming import StreamedSource, stream_dataset, stream_file, stream_source
from qa_dist.data.validate import ValidationReport

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLES",
    "LoadedData",
    "load_examples",
    "load_file",
    "load_hub_dataset",
    "load_source",
    "looks_like_path",
    "sample_path",
    "source_fingerprint",
]


@dataclass
class LoadedData:
    """Examples of one source plus what identifies their content (for the feature cache key)."""

    examples: list[dict]
    report: ValidationReport
    fingerprint: str
    """Hash of the source's content: sha256 of the file bytes, or the dataset's own fingerprint."""
    description: str


def _loaded(streamed: StreamedSource) -> LoadedData:
    """All the examples of a streamed source, read in one batch."""
    examples: list[dict] = []
    for batch in streamed.batches(1 << 62):
        examples += batch
    return LoadedData(examples, streamed.report, streamed.fingerprint, streamed.description)


def load_file(
    path: str | Path, *, strict: bool = False, labelled: bool = True, max_decompressed_mb: int = MAX_DECOMPRESSED_MB
) -> LoadedData:
    """Read and validate one local file in any supported layout (a gzipped one may decompress to
    ``max_decompressed_mb`` MB at most)."""
    return _loaded(stream_file(path, strict=strict, labelled=labelled, max_decompressed_mb=max_decompressed_mb))


def load_hub_dataset(
    name: str,
    split: str,
    *,
    strict: bool = False,
    labelled: bool = True,
    max_decompressed_mb: int = MAX_DECOMPRESSED_MB,
) -> LoadedData:
    """Read and validate a Hugging Face dataset (see ``readers.open_hf_dataset``)."""
    options = {"strict": strict, "labelled": labelled, "max_decompressed_mb": max_decompressed_mb}
    return _loaded(stream_dataset(name, split, **options))


def source_fingerprint(source: str, split: str | None = None, *, max_decompressed_mb: int = MAX_DECOMPRESSED_MB) -> str:
    """What identifies a source's content, without parsing it: the same as ``LoadedData.fingerprint``
    (a local data folder's JSON files are checked first: see ``readers._check_json_depth``)."""
    if source.startswith("sample:"):
        source = str(sample_path(source.split(":", 1)[1]))
    if looks_like_path(source) and not Path(source).expanduser().is_dir():
        return file_sha256(Path(source).expanduser())
    dataset, _ = open_hf_dataset(source, split or "train", max_decompressed_mb=max_decompressed_mb)
    return f"datasets:{dataset._fingerprint}"


def load_source(
    source: str,
    split: str | None = None,
    *,
    strict: bool = False,
    labelled: bool = True,
    max_decompressed_mb: int = MAX_DECOMPRESSED_MB,
) -> LoadedData:
    """Load examples from a file, a shipped sample or a Hugging Face dataset name (all of them in
    memory: :func:`qa_dist.data.stream_source` reads them in batches)."""
    options = {"strict": strict, "labelled": labelled, "max_decompressed_mb": max_decompressed_mb}
    return _loaded(stream_source(source, split, **options))


def load_examples(
    source: str | Path,
    split: str | None = None,
    *,
    strict: bool = False,
    labelled: bool = True,
    max_decompressed_mb: int = MAX_DECOMPRESSED_MB,
) -> list[dict]:
    """Read SQuAD-format question answering data into flat, validated examples.

    Every example has ``id``, ``title``, ``context``, ``question``, ``answers``
    (``{"text": [...], "answer_start": [...]}``) and ``is_impossible``. Raises :class:`DataError`
    naming the file and the question on bad input. Misplaced ``answer_start`` values are moved to
    the nearest exact occurrence of the answer text (an error when ``strict``). With
    ``labelled=False`` (data to predict on) records may come without ``answers``. A gzipped file
    may decompress to ``max_decompressed_mb`` MB at most (``data.max_decompressed_mb``).
    """
    loaded = load_source(str(source), split, strict=strict, labelled=labelled, max_decompressed_mb=max_decompressed_mb)
    if loaded.report.relocations or loaded.report.skipped:
        log.warning(loaded.report.summary())
    return loaded.examples
