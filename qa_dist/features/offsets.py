"""Offset mappings of windows, stored compactly: one base per window and flat character
starts and ends, read back as the tokenizer's ``(start, end)`` lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class OffsetMapping(Sequence):
    """The ``offset_mapping`` column of :func:`build_eval_features`: a read-only sequence with one
    entry per window, held as three flat numpy arrays instead of millions of Python tuples.

    ``offsets[i]`` is window ``i``'s offset mapping as the tutorials index it: a new list with one
    ``(start, end)`` character span per token of a context token and ``None`` for every other token
    (question, special tokens). Iteration, ``len``, slicing and ``==`` with a list of such lists work
    as on a list; :meth:`tolist` gives the plain lists. ``pyarrow.array`` (so ``features_table``
    and ``datasets.Dataset.from_dict``) converts it without a Python loop, through
    ``__arrow_array__``; :func:`qa_dist.postprocess` reads the arrays as they are.
    """

    __slots__ = ("base", "char_start", "char_end")

    def __init__(self, base: np.ndarray, char_start: np.ndarray, char_end: np.ndarray) -> None:
        self.base = np.asarray(base, dtype=np.int64)  # window i owns tokens base[i]:base[i + 1]
        self.char_start = np.asarray(char_start, dtype=np.int32)  # -1: not a context token
        self.char_end = np.asarray(char_end, dtype=np.int32)
        if self.base.ndim != 1 or len(self.base) == 0 or self.base[0] != 0 or self.base[-1] != len(self.char_start):
            raise ValueError("OffsetMapping: base must run from 0 to the number of tokens")
        if self.char_end.shape != self.char_start.shape:
            raise ValueError("OffsetMapping: char_start and char_end differ in length")

    @classmethod
    def concat(cls, parts: list[OffsetMapping]) -> OffsetMapping:
        """The windows of ``parts``, one after another."""
        shifts = np.cumsum([0] + [len(p.char_start) for p in parts[:-1]])
        base = np.concatenate([[0]] + [p.base[1:] + shift for p, shift in zip(parts, shifts, strict=True)])
        return cls(base, np.concatenate([p.char_start for p in parts]), np.concatenate([p.char_end for p in parts]))

    def __len__(self) -> int:
        return len(self.base) - 1

    def _row(self, i: int) -> list:
        lo, hi = int(self.base[i]), int(self.base[i + 1])
        return [
            None if a < 0 else (a, b)
            for a, b in zip(self.char_start[lo:hi].tolist(), self.char_end[lo:hi].tolist(), strict=True)
        ]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self._row(i) for i in range(start, stop, step)]
            stop = max(start, stop)
            lo, hi = self.base[start], self.base[stop]
            return OffsetMapping(self.base[start : stop + 1] - lo, self.char_start[lo:hi], self.char_end[lo:hi])
        n = len(self)
        i = index.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("OffsetMapping index out of range")
        return self._row(i)

    def __iter__(self):
        starts, ends, base = self.char_start.tolist(), self.char_end.tolist(), self.base.tolist()
        for lo, hi in zip(base, base[1:], strict=False):
            yield [None if a < 0 else (a, b) for a, b in zip(starts[lo:hi], ends[lo:hi], strict=True)]

    def tolist(self) -> list[list[tuple[int, int] | None]]:
        """Plain Python lists (as ``json`` or code that mutates rows needs)."""
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OffsetMapping):
            return (
                np.array_equal(self.base, other.base)
                and np.array_equal(self.char_start, other.char_start)
                and np.array_equal(
                    np.where(self.char_start < 0, -1, self.char_end), np.where(other.char_start < 0, -1, other.char_end)
                )
            )
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OffsetMapping({len(self)} windows, {len(self.char_start)} tokens)"

    def __arrow_array__(self, type: Any = None):  # noqa: A002  (the protocol's argument name)
        """``list<fixed_size_list<int32, 2>>`` with null pairs outside the context, or ``type``."""
        import pyarrow as pa  # pyarrow is what calls this: loaded already, and features.py stays free of it

        present = self.char_start >= 0
        values = np.stack([self.char_start, self.char_end], axis=1).reshape(-1)
        pairs = pa.FixedSizeListArray.from_arrays(pa.array(values), 2, mask=pa.array(~present))
        if self.base[-1] < 2**31:
            column = pa.ListArray.from_arrays(pa.array(self.base.astype(np.int32)), pairs)
        else:
            column = pa.LargeListArray.from_arrays(pa.array(self.base), pairs)
        return column if type is None or column.type == type else column.cast(type)

    def __getstate__(self):
        return (self.base, self.char_start, self.char_end)

    def __setstate__(self, state) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            object.__setattr__(self, name, value)
