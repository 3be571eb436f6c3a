"""Streaming input: the validated examples of a source in bounded batches, so that what a process
holds is a batch (and the window of text it comes from), not the file.

``stream_source(source).batches(size)`` gives, ``size`` at a time and in order, exactly the
examples that :func:`qa_dist.data.load_source` returns (which is built on it), with the same
DataError messages:

- a file that cannot be opened is an error of ``stream_source``; a gzipped one is read through once
  first, keeping nothing, so that one that is not gzip or decompresses to more than
  ``max_decompressed_mb`` raises before the first batch;
- a bad record raises when it is reached (the batches before it were given), as do a duplicate id,
  malformed JSON, bytes that are not UTF-8 and a file that mixes DuReader and SQuAD-style records;
- what is known only at the end (no questions at all, every DuReader question skipped, text after
  the JSON value, a file whose bytes changed since its fingerprint was taken) raises before the
  last batch is given, so a ``batches()`` that ends without raising read a whole valid file.

The file's bytes are hashed as they are read (``fingerprint``, which ``source_fingerprint`` gives
too). A file with several faults may name a different one first than a reader that parses the
whole file before it validates a record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from qa_dist.data.compressed import MAX_DECOMPRESSED_MB
from qa_dist.data.dureader import dureader_record, is_dureader
from qa_dist.data.readers import (
    LINE_PIECE,
    WINDOW,
    JsonText,
    file_sha256,
    json_lines,
    looks_like_path,
    open_file,
    open_hf_dataset,
    parse_json,
    sample_path,
    text_pieces,
)
from qa_dist.data.validate import ValidationReport, validate_record
from qa_dist.errors import DataError

_DATASET_ROWS = 1000  # rows read from a dataset's Arrow table at a time
_END = object()


class _Examples:
    """Validates the records of one source as they come, with the checks across records: unique
    ids, one format (DuReader or SQuAD-style) per file, and at the end that there were questions."""

    def __init__(self, source: str, report: ValidationReport, *, strict: bool, labelled: bool):
        self.source, self.report, self.strict, self.labelled = source, report, strict, labelled
        self._ids: dict[str, int] = {}  # id -> index of its example
        self._dureader: str | None = None  # where the first DuReader record is
        self._squad: str | None = None  # where the first SQuAD-style record is

    def example(self, record: dict, location: str, *, default_impossible=None, free_references=False) -> dict:
        example = validate_record(
            record,
            source=self.source,
            location=location,
            default_impossible=default_impossible,
            strict=self.strict,
            report=self.report,
            labelled=self.labelled,
            free_references=free_references,
        )
        index = len(self._ids)
        first = self._ids.setdefault(example["id"], index)
        if first != index:
            raise DataError(f"{self.source}: question {example['id']!r}: duplicate id (questions {first} and {index})")
        return example

    def nested(self, articles: Iterable[Any]) -> Iterator[dict]:
        """The examples of SQuAD's data[].paragraphs[].qas[] nesting, an article at a time."""
        path = self.source
        for a, article in enumerate(articles):
            if not isinstance(article, dict):
                raise DataError(f"{path}: data[{a}] must be an object")
            if "paragraphs" not in article:
                raise DataError(f"{path}: data[{a}] is missing key 'paragraphs'")
            title = article.get("title", "")
            paragraphs = article["paragraphs"]
            if not isinstance(paragraphs, list):
                raise DataError(f"{path}: data[{a}].paragraphs must be a list")
            for p, paragraph in enumerate(paragraphs):
                where = f"data[{a}].paragraphs[{p}]"
                if not isinstance(paragraph, dict):
                    raise DataError(f"{path}: {where} must be an object")
                for key in ("context", "qas"):
                    if key not in paragraph:
                        raise DataError(f"{path}: {where} is missing key {key!r}")
                if not isinstance(paragraph["qas"], list):
                    raise DataError(f"{path}: {where}.qas must be a list")
                for q, qa in enumerate(paragraph["qas"]):
                    if not isinstance(qa, dict):
                        raise DataError(f"{path}: {where}.qas[{q}] must be an object")
                    record = dict(qa)
                    record["context"] = paragraph["context"]
                    record.setdefault("title", title)
                    yield self.example(record, f"{where}.qas[{q}]", default_impossible=False)

    def flat(self, items: Iterable[tuple[Any, str]]) -> Iterator[dict]:
        """The examples of flat records, (record, location) pairs: SQuAD-style or DuReader records,
        not both in one file."""
        for item, location in items:
            if not isinstance(item, dict):
                raise DataError(f"{self.source}: {location}: a record must be an object, got {type(item).__name__}")
            dureader = is_dureader(item)
            if dureader and self._dureader is None:
                self._dureader = location
            if not dureader and self._squad is None:
                self._squad = location
            if self._dureader is not None and self._squad is not None:
                raise DataError(
                    f"{self.source}: mixes DuReader records (question_id, documents; first at {self._dureader}) with "
                    f"SQuAD-style records (first at {self._squad}): a file must hold one format"
                )
            if not dureader:
                yield self.example(item, location)
                continue
            options = {"strict": self.strict, "labelled": self.labelled, "report": self.report}
            record = dureader_record(item, location, self.source, **options)
            if record is not None:
                yield self.example(record, location, free_references=True)

    def finish(self) -> None:
        if not self._ids and self.report.skipped:
            raise DataError(
                f"{self.source}: contains no usable questions: all {len(self.report.skipped)} DuReader questions "
                f"were skipped, no answer can be located in a paragraph (first: question {self.report.skipped[0]!r})"
            )
        if not self._ids:
            raise DataError(f"{self.source}: contains no questions")


class StreamedSource:
    """The examples of one source, read and validated a batch at a time: see :func:`stream_source`.

    ``description`` and ``fingerprint`` are those of ``load_source``'s LoadedData; ``report`` is
    filled as the batches are read (and emptied when ``batches`` starts again): complete once they
    are exhausted. One ``batches`` iteration at a time."""

    def __init__(self, description: str, *, strict: bool, labelled: bool):
        self.description = description
        self.report = ValidationReport(source=description)
        self._strict, self._labelled = strict, labelled
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """What identifies the content: ``sha256:`` and the hash of a file's bytes (read through
        once, unless ``batches`` has), or ``datasets:`` and a dataset's own fingerprint."""
        if self._fingerprint is None:
            self._fingerprint = self._take_fingerprint()
        return self._fingerprint

    def _take_fingerprint(self) -> str:
        raise NotImplementedError

    def _examples(self, examples: _Examples) -> Iterator[dict]:
        raise NotImplementedError

    def batches(self, size: int) -> Iterator[list[dict]]:
        """The validated examples in order, ``size`` at a time (the last batch may be shorter)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch size must be a positive integer, got {size!r}")
        return self._batches(size)

    def _batches(self, size: int) -> Iterator[list[dict]]:
        self.report.__dict__.update(vars(ValidationReport(source=self.description)))  # emptied in place
        examples = _Examples(self.description, self.report, strict=self._strict, labelled=self._labelled)
        batch: list[dict] = []
        for example in self._examples(examples):
            if len(batch) == size:  # given once the next example is read: the last batch waits for the end
                yield batch
                batch = []
            batch.append(example)
        examples.finish()
        if batch:
            yield batch


class _DuReaderLines(Exception):
    """A ``.json`` file that is JSON Lines of DuReader records (as DuReader ships them)."""


class _FileSource(StreamedSource):
    def __init__(self, path: Path, *, strict: bool, labelled: bool, max_decompressed_mb: int):
        super().__init__(str(path), strict=strict, labelled=labelled)
        self._path, self._max_mb = path, max_decompressed_mb
        open_file(path).close()  # a file that is missing or cannot be opened: said now

    def _take_fingerprint(self) -> str:
        return file_sha256(self._path)

    def _pass(self, digest, piece: int = LINE_PIECE) -> Iterator[str]:
        return text_pieces(self._path, digest, piece=piece, max_decompressed_mb=self._max_mb)

    def _examples(self, examples: _Examples) -> Iterator[dict]:
        path = self._path
        if path.name.endswith(".gz"):  # a first pass that keeps nothing: gzip, within the limit
            self._settle(file_sha256(path, gzip_limit_mb=self._max_mb))
        digest = hashlib.sha256()
        if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
            yield from examples.flat(_lines(self._pass(digest), path))
        else:
            try:
                yield from _json_examples(JsonText(self._pass(digest, WINDOW), path), examples)
            except _DuReaderLines:
                digest = hashlib.sha256()
                yield from examples.flat(_lines(self._pass(digest), path))
        self._settle("sha256:" + digest.hexdigest())

    def _settle(self, fingerprint: str) -> None:
        """``fingerprint`` (of the bytes just read) becomes the source's, or must equal it."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint
        elif fingerprint != self._fingerprint:
            raise DataError(f"{self._path}: changed while it was read (its sha256 is not the one it had before)")


def _lines(pieces: Iterator[str], path: Path) -> Iterator[tuple[Any, str]]:
    for n, line in json_lines(pieces):
        yield parse_json(line, path, line=n), f"line {n}"


def _json_examples(text: JsonText, examples: _Examples) -> Iterator[dict]:
    """The examples of a JSON file: an object with ``data`` (nested SQuAD or flat records), a list
    of records, or one DuReader record."""
    if text.peek() == "{":
        return _object_examples(text, examples)
    return _list_examples(text, examples)


def _list_examples(text: JsonText, examples: _Examples) -> Iterator[dict]:
    first = text.peek()
    if first == "[":
        yield from examples.flat((item, f"record {i}") for i, item in enumerate(text.items()))
    else:
        text.value()
    if text.peek():
        raise text.fail("Extra data")
    if first != "[":
        raise _not_squad(text.path)


def _object_examples(text: JsonText, examples: _Examples) -> Iterator[dict]:
    path, top, streamed = text.path, {}, False
    start = text.line()
    for key in text.members():
        if key == "data" and streamed:
            raise DataError(f"{path}: has key 'data' twice: a file must hold one list of data")
        if key == "data" and text.peek() == "[":
            yield from _data_examples(text.items(), examples)
            streamed = True
        else:
            top[key] = text.value()  # what is not the data is small
    end = text.line()
    if text.peek():
        if not streamed and is_dureader(top) and start == end < text.line():
            raise _DuReaderLines  # json.loads would say "Extra data", and the first line is one record
        raise text.fail("Extra data")
    if streamed and is_dureader(top):
        raise DataError(
            f"{path}: holds both 'data' and the keys of one DuReader record (question_id, documents): "
            "a file must hold one format"
        )
    if streamed:
        return
    if is_dureader(top):  # one DuReader record alone
        yield from examples.flat([(top, "line 1")])
    elif "data" in top:
        raise DataError(f"{path}: 'data' must be a list")
    else:
        raise _not_squad(path)


def _not_squad(path: Path) -> DataError:
    return DataError(
        f"{path}: not a SQuAD-format file: expected {{'data': [...]}} (nested or flat records) or a list of records"
    )


def _data_examples(items: Iterator[Any], examples: _Examples) -> Iterator[dict]:
    """The examples of ``data``'s items: articles of nested SQuAD when the first has paragraphs, else
    flat records."""
    first = next(items, _END)
    if first is _END:
        return iter(())
    items = chain([first], items)
    if isinstance(first, dict) and "paragraphs" in first:
        return examples.nested(items)
    return examples.flat((item, f"data[{i}]") for i, item in enumerate(items))


class _DatasetSource(StreamedSource):
    def __init__(self, dataset, description: str, *, strict: bool, labelled: bool):
        super().__init__(description, strict=strict, labelled=labelled)
        self._dataset = dataset
        self._fingerprint = f"datasets:{dataset._fingerprint}"  # as source_fingerprint

    def _examples(self, examples: _Examples) -> Iterator[dict]:
        dataset, source = self._dataset, self.description
        required = {"id", "question", "context", "answers"} if self._labelled else {"id", "question", "context"}
        missing = required - set(dataset.column_names)
        if missing and {"question_id", "documents"} <= set(dataset.column_names):
            raise DataError(
                f"{source}: DuReader records are read from a file, not a dataset folder: give the .json or .jsonl "
                "file itself"
            )
        if missing:
            raise DataError(f"{source}: not a SQuAD-format dataset, missing columns {sorted(missing)}")
        i = 0
        for rows in dataset.iter(batch_size=_DATASET_ROWS):  # columns: {name: [values]}
            names = list(rows)
            for values in zip(*(rows[name] for name in names), strict=True):
                yield examples.example(dict(zip(names, values, strict=True)), f"row {i}")
                i += 1


def stream_file(
    path: str | Path, *, strict: bool = False, labelled: bool = True, max_decompressed_mb: int = MAX_DECOMPRESSED_MB
) -> StreamedSource:
    """One local file in any supported layout (a gzipped one may decompress to
    ``max_decompressed_mb`` MB at most)."""
    return _FileSource(
        Path(path).expanduser(), strict=strict, labelled=labelled, max_decompressed_mb=max_decompressed_mb
    )


def stream_dataset(
    name: str,
    split: str,
    *,
    strict: bool = False,
    labelled: bool = True,
    max_decompressed_mb: int = MAX_DECOMPRESSED_MB,
) -> StreamedSource:
    """A Hugging Face dataset, by name or local folder (see ``readers.open_hf_dataset``)."""
    dataset, description = open_hf_dataset(name, split, max_decompressed_mb=max_decompressed_mb)
    return _DatasetSource(dataset, description, strict=strict, labelled=labelled)


def stream_source(
    source: str,
    split: str | None = None,
    *,
    strict: bool = False,
    labelled: bool = True,
    max_decompressed_mb: int = MAX_DECOMPRESSED_MB,
) -> StreamedSource:
    """The examples of a file, a shipped sample (``sample:en-train``) or a Hugging Face dataset
    name or folder, to read in batches: ``stream_source(...).batches(size)``. Opens the source (a
    missing file or dataset is an error here); its content is read and checked by ``batches``."""
    if not isinstance(source, str) or not source.strip():
        raise DataError("data source is empty: give a file path, a dataset name or sample:en-train")
    options = {"strict": strict, "labelled": labelled, "max_decompressed_mb": max_decompressed_mb}
    if source.startswith("sample:"):
        return stream_file(sample_path(source.split(":", 1)[1]), **options)
    if Path(source).expanduser().is_dir():
        return stream_dataset(str(Path(source).expanduser()), split or "train", **options)
    if looks_like_path(source):
        return stream_file(source, **options)
    return stream_dataset(source, split or "train", **options)
