"""Where data comes from, read a piece at a time: local files (plain or gzipped UTF-8, hashed as
they are read), their JSON Lines and their JSON values, the samples shipped with the package, and
Hugging Face datasets.

A JSON file is read by json's own scanner (``JSONDecoder.raw_decode``) one value at a time: the
members of the top-level object and the items of a top-level array (or of one such member) are
parsed alone, from a window of the text that holds little more than the value. The values, and the
messages of malformed JSON (line, column and json's words), are those ``json.loads`` gives for the
whole text.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from qa_dist.data.compressed import MAX_DECOMPRESSED_MB, gunzip_stream
from qa_dist.errors import DataError
from qa_dist.runtime.hub import apply_offline, go_offline_unless_reachable, unreachable_message

SAMPLES = {
    "en-train": "squad_v2_sample_train.json",
    "en-dev": "squad_v2_sample_dev.json",
    "en-train-v1": "squad_v1_sample_train.json",
    "zh-train": "cmrc2018_sample_train.json",
    "zh-dev": "cmrc2018_sample_dev.json",
    "zh-char-tokenizer": "zh-char-tokenizer",
}
_FILE_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
LINE_PIECE = 1 << 18
"""Bytes read from a file (or decompressed from a gzipped one) at a time for JSON Lines; a JSON text
is read ``WINDOW`` bytes at a time, the least its window holds anyway."""


def sample_path(name: str) -> Path:
    """Path of a sample shipped with the package (``en-train``, ``en-dev``, ``zh-train``, ...)."""
    if name not in SAMPLES:
        raise DataError(f"sample:{name}: no such sample; available: " + ", ".join(f"sample:{k}" for k in SAMPLES))
    return Path(str(resources.files("qa_dist") / "samples" / SAMPLES[name]))


def looks_like_path(source: str) -> bool:
    return source.lower().endswith(_FILE_SUFFIXES) or "/" in source or "\\" in source or Path(source).exists()


def _cannot_read(path: Path, error: OSError) -> DataError:
    if isinstance(error, FileNotFoundError):
        return DataError(f"{path}: file not found")
    if isinstance(error, IsADirectoryError):
        return DataError(f"{path}: is a directory, expected a .json, .json.gz or .jsonl file")
    return DataError(f"{path}: cannot read: {error.strerror}")


def open_file(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except OSError as e:
        raise _cannot_read(path, e) from None


def _hashed_reads(f: BinaryIO, path: Path, digest):
    def read(n: int) -> bytes:
        try:
            data = f.read(n)
        except OSError as e:
            raise _cannot_read(path, e) from None
        digest.update(data)
        return data

    return read


def file_sha256(path: Path, *, gzip_limit_mb: int | None = None) -> str:
    """``sha256:`` and the hex digest of the file's bytes (gzipped files are hashed as they are).
    With ``gzip_limit_mb``, the file is also checked to be gzip that decompresses to that many MB at
    most (its pieces are counted and dropped)."""
    digest = hashlib.sha256()
    with open_file(path) as f:
        read = _hashed_reads(f, path, digest)
        if gzip_limit_mb is None:
            while read(1 << 20):
                pass
        else:
            for _ in gunzip_stream(read, path, gzip_limit_mb, 1 << 20):
                pass
            while read(1 << 20):  # (what zero padding after the last member left unread)
                pass
    return "sha256:" + digest.hexdigest()


def text_pieces(
    path: Path, digest, *, piece: int = LINE_PIECE, max_decompressed_mb: int = MAX_DECOMPRESSED_MB
) -> Iterator[str]:
    """The text of a (possibly gzipped, ``.gz``) UTF-8 file in pieces of ``piece`` bytes at most
    (decoded), a leading byte order mark dropped; ``digest`` is updated with the file's bytes as they are read. A gzipped file may
    decompress to ``max_decompressed_mb`` MB (of 2**20 bytes) at most. Bytes that are not UTF-8 are
    an error once the text before them is given."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    lines = 1  # the line the next piece starts on
    with open_file(path) as f:
        read = _hashed_reads(f, path, digest)
        if path.name.endswith(".gz"):
            pieces = gunzip_stream(read, path, max_decompressed_mb, piece)
        else:
            pieces = iter(lambda: read(piece), b"")
        for data in _with_end(pieces, b""):
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.object: this piece after what the decoder held back
                yield e.object[: e.start].decode("utf-8")
                line = lines + e.object[: e.start].count(b"\n")
                raise DataError(f"{path}: not UTF-8 (invalid byte 0x{e.object[e.start]:02x} at line {line})") from None
            lines += data.count(b"\n")
            if text:
                yield text


def _with_end(pieces, end):
    """The pieces that are not empty, then ``end`` (empty) to say that there are no more."""
    yield from (piece for piece in pieces if piece)
    yield end


def read_text(path: Path, *, max_decompressed_mb: int = MAX_DECOMPRESSED_MB) -> str:
    """The whole text of a (possibly gzipped) UTF-8 file."""
    return "".join(text_pieces(path, hashlib.sha256(), max_decompressed_mb=max_decompressed_mb))


def _nested_too_deeply(path: Path, line: int | None = None) -> DataError:
    where = f" at line {line}" if line else ""
    return DataError(f"{path}: JSON nested too deeply to read{where} (no SQuAD-format file nests so deep)")


def _too_many_digits(path: Path, line: int | None = None) -> DataError:
    # ValueError out of json: an integer longer than Python converts (sys.get_int_max_str_digits)
    where = f" at line {line}" if line else ""
    return DataError(f"{path}: a number of more than {sys.get_int_max_str_digits()} digits{where}")


def parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """``text`` parsed; ``line``: where it starts in ``path`` (one line of a JSONL file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno + (line or 1) - 1}, column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise _nested_too_deeply(path, line) from None
    except ValueError:
        raise _too_many_digits(path, line) from None


def json_lines(pieces: Iterator[str]) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSONL text, split on "\\n" only (JSON Lines' separator, with an
    optional "\\r" before it): ``str.splitlines`` also splits at U+2028, U+0085 and other characters
    that are valid raw inside a JSON string. Blank lines (JSON whitespace only) are skipped."""
    n, partial = 0, []
    for piece in _with_end(pieces, ""):
        if piece and "\n" not in piece:
            partial.append(piece)
            continue
        lines = piece.split("\n")
        lines[0] = "".join([*partial, lines[0]])
        partial = [lines.pop()] if piece else []
        for line in lines:
            n += 1
            line = line.removesuffix("\r")
            if line.strip(" \t\r"):
                yield n, line


_WHITESPACE = re.compile(r"[ \t\n\r]*")
WINDOW = 1 << 20
"""Characters added to a JSON text's window at a time: a value cut off by its end is parsed again
from its start with more text, which costs about half a value per window."""
_DECODER = json.JSONDecoder()
_MARGIN = 16
"""A value cut off by the end of the window fails within this many characters of it ("-Infinit" is
the longest prefix that does), or as an unterminated string: only such errors may want more text."""


class JsonText:
    """A JSON text read from ``pieces`` (str) through a window: ``peek`` the next character, parse
    one ``value``, or walk the ``members`` of an object or the ``items`` of an array whose first
    character is next. Errors are DataError lines naming ``path`` as :func:`parse_json` gives them."""

    def __init__(self, pieces: Iterator[str], path: Path):
        self.path = path
        self._pieces = pieces
        self._text, self._at = "", 0  # the window and the cursor in it
        self._lines, self._column = 0, 0  # newlines before the window; characters of its first line before it
        self._end = False
        self._more(WINDOW)
        if self._text.startswith("\ufeff"):  # a second byte order mark: json.loads refuses a str with one
            raise self._error("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)

    def _more(self, wanted: int) -> None:
        """Drop the window's text before the cursor and add ``wanted`` characters or more."""
        text, at = self._text, self._at
        newlines = text.count("\n", 0, at)
        self._lines += newlines
        self._column = at - text.rfind("\n", 0, at) - 1 if newlines else self._column + at
        parts, added = ([text[at:]] if at < len(text) else []), 0  # (join of one piece: no copy)
        while added < wanted and not self._end:
            piece = next(self._pieces, None)
            if piece is None:
                self._end = True
            else:
                parts.append(piece)
                added += len(piece)
        self._text, self._at = "".join(parts), 0

    def line(self) -> int:
        """The line the cursor is on."""
        return self._lines + self._text.count("\n", 0, self._at) + 1

    def _error(self, message: str, at: int) -> DataError:
        newline = self._text.rfind("\n", 0, at)
        column = at - newline if newline >= 0 else self._column + at + 1
        line = self._lines + self._text.count("\n", 0, at) + 1
        return DataError(f"{self.path}: malformed JSON at line {line}, column {column}: {message}")

    def fail(self, message: str) -> DataError:
        """The error ``message`` (in json's words) at the cursor."""
        return self._error(message, self._at)

    def peek(self) -> str:
        """The next character that is not JSON whitespace ("" at the end), the cursor on it."""
        if self._at < len(self._text) and (c := self._text[self._at]) not in " \t\n\r":
            return c
        while True:
            self._at = _WHITESPACE.match(self._text, self._at).end()
            if self._at < len(self._text) or self._end:
                return self._text[self._at : self._at + 1]
            self._more(WINDOW)

    def value(self) -> Any:
        """The JSON value at the cursor, parsed; the cursor after it."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self._text, self._at)
            except json.JSONDecodeError as e:
                if self._end or (e.pos < len(self._text) - _MARGIN and not e.msg.startswith("Unterminated string")):
                    raise self._error(e.msg, e.pos) from None
            except RecursionError:
                raise _nested_too_deeply(self.path) from None
            except ValueError:
                raise _too_many_digits(self.path) from None
            else:  # a number at the end of the window may go on after it
                if end < len(self._text) or self._end or type(value) not in (int, float):
                    self._at = end
                    return value
            self._more(max(WINDOW, len(self._text) - self._at))  # doubles what a long value is parsed from

    def _step(self, close: str) -> bool:
        """After a member or an item: True at the ``close`` of its container (passed), False at a
        comma (passed, and the whitespace after it)."""
        c = self.peek()
        if c == close:
            self._at += 1
            return True
        if c != ",":
            raise self.fail("Expecting ',' delimiter")
        self._at += 1
        self.peek()
        return False

    def members(self) -> Iterator[str]:
        """The keys of the object at the cursor, in order, the cursor on each one's value after it
        is yielded: the caller reads the value (``value``, ``items``) before asking for the next."""
        self._at += 1
        if self.peek() == "}":
            self._at += 1
            return
        while True:
            if self.peek() != '"':
                raise self.fail("Expecting property name enclosed in double quotes")
            key = self.value()
            if self.peek() != ":":
                raise self.fail("Expecting ':' delimiter")
            self._at += 1
            self.peek()
            yield key
            if self._step("}"):
                return

    def items(self) -> Iterator[Any]:
        """The items of the array at the cursor, parsed one at a time; the cursor after it at the end."""
        self._at += 1
        if self.peek() == "]":
            self._at += 1
            return
        while True:
            yield self.value()
            if self._step("]"):
                return


def open_hf_dataset(name: str, split: str, *, max_decompressed_mb: int = MAX_DECOMPRESSED_MB):
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
        text = read_text(path, max_decompressed_mb=max_decompressed_mb)
        try:
            json.loads(text)
            continue
        except RecursionError:
            raise _nested_too_deeply(path) from None
        except ValueError:
            pass  # JSON Lines, or malformed
        for n, line in json_lines(iter([text])):
            try:
                json.loads(line)
            except RecursionError:
                raise _nested_too_deeply(path, n) from None
            except ValueError:
                pass
