"""Reading back the JSON files qa-dist writes (markers, manifests, states) from directories others
can write: whatever a file holds, the reader gets a value or ``Damaged``, never another exception."""

from __future__ import annotations

import json
import math
import os
import stat
import types
import typing
from pathlib import Path
from typing import Any

MAX_RECORD_BYTES = 64 << 20
"""The largest record read back: qa-dist's markers and states are kilobytes (a checkpoint's
``COMPLETE`` lists a few hundred files); a bigger file is damage, not data, and is not read."""


class Damaged(ValueError):
    """A record that exists but cannot be what qa-dist wrote: the reason, in a few words."""


def read_json(path: str | Path, *, limit: int = MAX_RECORD_BYTES) -> Any:
    """The JSON value in ``path``. FileNotFoundError where there is none (the caller knows what a
    missing record means); ``Damaged`` for anything else that is wrong: too big, not UTF-8, not
    JSON, nested deeper than Python's parser goes, a number too long to convert, unreadable."""
    path = Path(path)
    try:
        # Non-blocking: a FIFO planted in a record's place must not hang the reader.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Damaged(f"unreadable ({e.strerror or type(e).__name__})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:  # refused unread
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Damaged("not a regular file")
        raise Damaged(f"{st.st_size:,} bytes, more than the {limit:,} a record may hold")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise Damaged(f"unreadable ({e.strerror or type(e).__name__})") from None
    if len(data) > limit:  # (it grew since)
        raise Damaged(f"more than the {limit:,} bytes a record may hold")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Damaged("not UTF-8") from None
    except RecursionError:
        raise Damaged("nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer longer than int() converts
        raise Damaged(f"not JSON ({str(e).splitlines()[0][:80]})") from None


def finite(value: Any) -> float | None:
    """A JSON number as a finite float, or None (not a number, a bool, NaN, an infinity, or an
    integer too large for a float: what a planted record may hold where a time is expected)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type ``hint`` names: ``int`` (not a bool), ``float`` (an int
    too), ``str``, ``bool``, ``X | None``; what dataclass fields of records use."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"fits: no rule for {hint!r}")


def dataclass_from_json(cls: type, value: Any, *, what: str):
    """``cls(**value)`` for a dataclass whose fields are plain JSON types, or ``Damaged`` naming
    the first key that is unknown or of the wrong type. Missing keys take their defaults (a record
    written before a field existed)."""
    if not isinstance(value, dict):
        raise Damaged(f"{what} is {type(value).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    for key, item in value.items():
        if key not in hints:
            raise Damaged(f"{what} has an unknown key {str(key)[:40]!r}")
        if not fits(item, hints[key]):
            raise Damaged(f"{what}: {key} is {type(item).__name__}, not {hints[key]}")
    return cls(**value)
