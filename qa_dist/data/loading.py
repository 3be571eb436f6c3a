"""Readers for the SQuAD family of formats, all producing flat validated examples.

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

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qa_dist.data.compressed import MAX_DECOMPRESSED_MB, gunzip
from qa_dist.data.dureader import dureader_records, is_dureader
from qa_dist.data.validate import ValidationReport, check_unique_ids, validate_record
from qa_dist.errors import DataError
from qa_dist.runtime.hub import apply_offline, go_offline_unless_reachable, unreachable_message

log = logging.getLogger(__name__)

SAMPLES = {
    "en-train": "squad_v2_sample_train.json",
    "en-dev": "squad_v2_sample_dev.json",
    "en-train-v1": "squad_v1_sample_train.json",
    "zh-train": "cmrc2018_sample_train.json",
    "zh-dev": "cmrc2018_sample_dev.json",
    "zh-char-tokenizer": "zh-char-tokenizer",
}
_FILE_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


@dataclass
class LoadedData:
    """Examples of one source plus what identifies their content (for the feature cache key)."""

    examples: list[dict]
    report: ValidationReport
    fingerprint: str
    """Hash of the source's content: sha256 of the file bytes, or the dataset's own fingerprint."""
    description: str


def sample_path(name: str) -> Path:
    """Path of a sample shipped with the package (``en-train``, ``en-dev``, ``zh-train``, ...)."""
    if name not in SAMPLES:
        raise DataError(f"sample:{name}: no such sample; available: " + ", ".join(f"sample:{k}" for k in SAMPLES))
    return Path(str(resources.files("qa_dist") / "samples" / SAMPLES[name]))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .json, .json.gz or .jsonl file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None


def _read_text(path: Path, *, max_decompressed_mb: int = MAX_DECOMPRESSED_MB) -> tuple[str, bytes]:
    """The decoded text of a (possibly gzipped) UTF-8 file, and its raw bytes. A gzipped file may
    decompress to ``max_decompressed_mb`` MB (of 2**20 bytes) at most."""
    raw = _read_bytes(path)
    data = raw
    if path.name.endswith(".gz"):
        data = gunzip(raw, path, max_decompressed_mb)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 (invalid byte 0x{data[e.start]:02x} at line {line})") from None
    return text, raw


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """``text`` parsed; ``line``: where it starts in ``path`` (one line of a JSONL file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno + (line or 1) - 1}, column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        where = f" at line {line}" if line else ""
        raise DataError(f"{path}: JSON nested too deeply to read{where} (no SQuAD-format file nests so deep)") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        where = f" at line {line}" if line else ""
        raise DataError(f"{path}: a number of more than {sys.get_int_max_str_digits()} digits{where}") from None


def _json_lines(text: str):
    """(line number, line) of a JSONL text, split on "\\n" only (JSON Lines' separator, with an
    optional "\\r" before it): ``str.splitlines`` also splits at U+2028, U+0085 and other characters
    that are valid raw inside a JSON string. Blank lines (JSON whitespace only) are skipped."""
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip(" \t\r"):
            yield n, line


def _nested_records(data: list, path: Path):
    """Yield (record, location) from SQuAD's data[].paragraphs[].qas[] nesting."""
    for a, article in enumerate(data):
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
                yield record, f"{where}.qas[{q}]"


def _validate_all(
    records,
    *,
    source: str,
    default_impossible,
    strict: bool,
    labelled: bool = True,
    report: ValidationReport | None = None,
    free_references: bool = False,
) -> tuple[list[dict], ValidationReport]:
    if report is None:
        report = ValidationReport(source=source)
    examples = [
        validate_record(
            record,
            source=source,
            location=location,
            default_impossible=default_impossible,
            strict=strict,
            report=report,
            labelled=labelled,
            free_references=free_references,
        )
        for record, location in records
    ]
    if not examples and report.skipped:
        raise DataError(
            f"{source}: contains no usable questions: all {len(report.skipped)} DuReader questions were skipped, "
            f"no answer can be located in a paragraph (first: question {report.skipped[0]!r})"
        )
    if not examples:
        raise DataError(f"{source}: contains no questions")
    check_unique_ids(examples, source)
    return examples, report


def _records_from_flat(items: list, path: Path, locate):
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {locate(i)}: a record must be an object, got {type(item).__name__}")
        yield item, locate(i)


def _records_from_items(items: list, path: Path, locate, *, strict: bool, labelled: bool, report: ValidationReport):
    """(records, free_references): DuReader records when the items have DuReader's keys, else flat
    SQuAD records; a file mixing the two is an error."""
    dureader = [i for i, item in enumerate(items) if is_dureader(item)]
    if not dureader:
        return _records_from_flat(items, path, locate), False
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {locate(i)}: a record must be an object, got {type(item).__name__}")
        if not is_dureader(item):
            raise DataError(
                f"{path}: mixes DuReader records (question_id, documents; first at {locate(dureader[0])}) with "
                f"SQuAD-style records (first at {locate(i)}): a file must hold one format"
            )
    return dureader_records(items, path, locate, strict=strict, labelled=labelled, report=report), True


def _jsonl_items(text: str, path: Path) -> tuple[list, list[int]]:
    items, lines = [], []
    for n, line in _json_lines(text):
        items.append(_parse_json(line, path, line=n))
        lines.append(n)
    return items, lines


def _dureader_lines(text: str) -> bool:
    """A ``.json`` file that is JSON Lines of DuReader records (as DuReader ships them)."""
    for _, line in _json_lines(text):
        try:
            return is_dureader(json.loads(line))
        except (ValueError, RecursionError):
            return False
    return False


def load_file(
    path: str | Path, *, strict: bool = False, labelled: bool = True, max_decompressed_mb: int = MAX_DECOMPRESSED_MB
) -> LoadedData:
    """Read and validate one local file in any supported layout (a gzipped one may decompress to
    ``max_decompressed_mb`` MB at most)."""
    path = Path(path).expanduser()
    text, raw = _read_text(path, max_decompressed_mb=max_decompressed_mb)
    fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
    source = str(path)
    name = path.name.lower()
    report = ValidationReport(source=source)

    def validate(records, default, free_references=False) -> LoadedData:
        examples, _ = _validate_all(
            records,
            source=source,
            default_impossible=default,
            strict=strict,
            labelled=labelled,
            report=report,
            free_references=free_references,
        )
        return LoadedData(examples, report, fingerprint, source)

    def from_items(items: list, locate) -> LoadedData:
        records, free = _records_from_items(items, path, locate, strict=strict, labelled=labelled, report=report)
        return validate(records, None, free)

    if name.endswith((".jsonl", ".jsonl.gz")):
        items, lines = _jsonl_items(text, path)
        return from_items(items, lambda i: f"line {lines[i]}")

    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _dureader_lines(text):
            items, lines = _jsonl_items(text, path)
            return from_items(items, lambda i: f"line {lines[i]}")
        parsed = _parse_json(text, path)  # raises the error naming line and column
    except (RecursionError, ValueError):
        parsed = _parse_json(text, path)
    if is_dureader(parsed):  # one DuReader record alone
        return from_items([parsed], lambda i: "line 1")
    if isinstance(parsed, dict) and "data" in parsed:
        data_list = parsed["data"]
        if not isinstance(data_list, list):
            raise DataError(f"{path}: 'data' must be a list")
        if data_list and isinstance(data_list[0], dict) and "paragraphs" in data_list[0]:
            records = _nested_records(data_list, path)
            default = False
        else:
            return from_items(data_list, lambda i: f"data[{i}]")
    elif isinstance(parsed, list):
        return from_items(parsed, lambda i: f"record {i}")
    else:
        raise DataError(
            f"{path}: not a SQuAD-format file: expected {{'data': [...]}} (nested or flat records) or a list of records"
        )
    return validate(records, default)


def _from_dataset(dataset, source: str, strict: bool, labelled: bool = True) -> LoadedData:
    required = {"id", "question", "context", "answers"} if labelled else {"id", "question", "context"}
    missing = required - set(dataset.column_names)
    if missing and {"question_id", "documents"} <= set(dataset.column_names):
        raise DataError(
            f"{source}: DuReader records are read from a file, not a dataset folder: give the .json or .jsonl "
            "file itself"
        )
    if missing:
        raise DataError(f"{source}: not a SQuAD-format dataset, missing columns {sorted(missing)}")
    records = ((row, f"row {i}") for i, row in enumerate(dataset))
    examples, report = _validate_all(records, source=source, default_impossible=None, strict=strict, labelled=labelled)
    return LoadedData(examples, report, f"datasets:{dataset._fingerprint}", source)  # as source_fingerprint


def _open_hf_dataset(name: str, split: str, *, max_decompressed_mb: int = MAX_DECOMPRESSED_MB):
    """A Hugging Face dataset (``squad``, ``squad_v2``, ``cmrc2018``, ``name:config``, or a local
    dataset folder) through ``datasets.load_dataset``; a ``save_to_disk`` folder through
    ``load_from_disk``. Returns the dataset and a description of the source. A local folder's
    gzipped JSON files may decompress to ``max_decompressed_mb`` MB at most."""
    hub = not Path(name).exists()
    offline = go_offline_unless_reachable() if hub else False  # before datasets reads its settings
    import datasets  # about 1.5 s: only for hub names and dataset folders

    apply_offline()  # datasets read its own offline switch when it was imported

    config_name = None
    if ":" in name and not Path(name).exists():  # "dataset:config" selects a configuration
        name, config_name = name.split(":", 1)
    source = f"{name} [{split}]"
    saved = Path(name).is_dir() and any((Path(name) / f).exists() for f in ("state.json", "dataset_dict.json"))
    if Path(name).is_dir() and not saved:
        _check_one_format(Path(name))
        _check_json_depth(Path(name), max_decompressed_mb=max_decompressed_mb)
    try:
        if saved:
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, config_name, split=split)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[0]  # (an error message, not data)
        raise DataError(f"{source}: cannot read these files as one dataset: {cause}") from None
    except FileNotFoundError as e:
        if offline:
            raise DataError(unreachable_message("data", name)) from None
        raise DataError(f"{name}: no such local file or Hugging Face dataset ({e})") from None
    except (ConnectionError, OSError) as e:
        if offline:
            raise DataError(unreachable_message("data", name)) from None
        raise DataError(
            f"{name}: cannot load this Hugging Face dataset ({e}); without network access, give a "
            "local file or folder, or set HF_DATASETS_CACHE to a cache that holds it"
        ) from None
    except (ValueError, KeyError) as e:
        raise DataError(f"{source}: cannot load this split: {e}") from None
    return dataset, source


_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


def _check_one_format(folder: Path) -> None:
    """A local data folder must hold one kind of data file: ``datasets`` reads only the most common
    kind and silently drops the others (or fails deep inside when their columns differ)."""
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    kinds: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        name = path.name
        for suffix in _COMPRESSION:
            name = name.removesuffix(suffix)
        suffix = Path(name).suffix
        if suffix.lower() == ".md":  # README.md and other notes: documentation, not data
            continue
        module = _EXTENSION_TO_MODULE.get(suffix, _EXTENSION_TO_MODULE.get(suffix.lower()))
        if module is not None:
            kinds.setdefault(module[0], []).append(str(relative))
    if len(kinds) > 1:
        found = "; ".join(
            f"{kind}: {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}" for kind, files in kinds.items()
        )
        raise DataError(
            f"{folder}: data folder mixes kinds of files ({found}); datasets would read only one kind: "
            "keep one format per folder, or give the file itself"
        )


def _check_json_depth(folder: Path, *, max_decompressed_mb: int = MAX_DECOMPRESSED_MB) -> None:
    """pyarrow's JSON reader, which ``datasets`` uses, crashes the process (a segmentation fault) on
    deeply nested JSON; Python's parser raises RecursionError there, so JSON files of a folder are
    parsed once here first (which also bounds what a gzipped one decompresses to before ``datasets``
    reads it). Malformed files are left to ``datasets``, which reports them."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        name = path.name.lower().removesuffix(".gz")
        if (
            not path.is_file()
            or any(part.startswith(".") for part in relative.parts)
            or not name.endswith((".json", ".jsonl", ".ndjson"))
        ):
            continue
        text, _ = _read_text(path, max_decompressed_mb=max_decompressed_mb)
        try:
            json.loads(text)
            continue
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read (no SQuAD-format file nests so deep)") from None
        except ValueError:
            pass  # JSON Lines, or malformed
        for n, line in _json_lines(text):
            try:
                json.loads(line)
            except RecursionError:
                raise DataError(
                    f"{path}: JSON nested too deeply to read at line {n} (no SQuAD-format file nests so deep)"
                ) from None
            except ValueError:
                pass


def load_hub_dataset(
    name: str,
    split: str,
    *,
    strict: bool = False,
    labelled: bool = True,
    max_decompressed_mb: int = MAX_DECOMPRESSED_MB,
) -> LoadedData:
    """Read and validate a Hugging Face dataset (see ``_open_hf_dataset``)."""
    dataset, source = _open_hf_dataset(name, split, max_decompressed_mb=max_decompressed_mb)
    return _from_dataset(dataset, source, strict, labelled)


def source_fingerprint(source: str, split: str | None = None, *, max_decompressed_mb: int = MAX_DECOMPRESSED_MB) -> str:
    """What identifies a source's content, without parsing it: the same as ``LoadedData.fingerprint``
    (a local data folder's JSON files are checked first: see ``_check_json_depth``)."""
    if source.startswith("sample:"):
        source = str(sample_path(source.split(":", 1)[1]))
    if looks_like_path(source) and not Path(source).expanduser().is_dir():
        return "sha256:" + hashlib.sha256(_read_bytes(Path(source).expanduser())).hexdigest()
    dataset, _ = _open_hf_dataset(source, split or "train", max_decompressed_mb=max_decompressed_mb)
    return f"datasets:{dataset._fingerprint}"


def looks_like_path(source: str) -> bool:
    return source.lower().endswith(_FILE_SUFFIXES) or "/" in source or "\\" in source or Path(source).exists()


def load_source(
    source: str,
    split: str | None = None,
    *,
    strict: bool = False,
    labelled: bool = True,
    max_decompressed_mb: int = MAX_DECOMPRESSED_MB,
) -> LoadedData:
    """Load examples from a file, a shipped sample or a Hugging Face dataset name."""
    if not isinstance(source, str) or not source.strip():
        raise DataError("data source is empty: give a file path, a dataset name or sample:en-train")
    options = {"strict": strict, "labelled": labelled, "max_decompressed_mb": max_decompressed_mb}
    if source.startswith("sample:"):
        return load_file(sample_path(source.split(":", 1)[1]), **options)
    if Path(source).expanduser().is_dir():
        return load_hub_dataset(str(Path(source).expanduser()), split or "train", **options)
    if looks_like_path(source):
        return load_file(source, **options)
    return load_hub_dataset(source, split or "train", **options)


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
