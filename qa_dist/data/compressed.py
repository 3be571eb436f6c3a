"""Gzipped data files, decompressed within a bound (``data.max_decompressed_mb``): a gzip bomb of a
few MB that decompress to gigabytes stops with an error at the cost of a piece of memory."""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

from qa_dist.config import DataConfig
from qa_dist.errors import DataError

MAX_DECOMPRESSED_MB: int = DataConfig.max_decompressed_mb
"""What a compressed file may decompress to unless told otherwise (``data.max_decompressed_mb``'s default)."""
_INPUT_PIECE = 1 << 16  # compressed bytes fed to zlib at a time
_OUTPUT_PIECE = 1 << 20  # decompressed bytes zlib produces at a time
_NONZERO = re.compile(rb"[^\x00]")


def gzip_size_over(raw: bytes, limit: int) -> bool:
    """Whether the gzip data ``raw`` decompresses to more than ``limit`` bytes. Its members (gzip
    files may be concatenated, and zero bytes may pad the end of one, as ``gzip.decompress``
    accepts) are decompressed as a stream, ``_OUTPUT_PIECE`` bytes at a time that are counted and
    dropped; it stops as soon as the count passes ``limit``. Raises zlib.error or EOFError on data
    that is not gzip."""
    view = memoryview(raw)
    total, start = 0, 0
    while start < len(view):
        member = zlib.decompressobj(wbits=31)  # one gzip member: header, deflate stream, checked trailer
        at = start
        while not member.eof:
            if member.unconsumed_tail:  # input left over when the last piece filled _OUTPUT_PIECE
                piece = member.decompress(member.unconsumed_tail, _OUTPUT_PIECE)
            elif at < len(view):
                piece = member.decompress(view[at : at + _INPUT_PIECE], _OUTPUT_PIECE)
                at += _INPUT_PIECE
            else:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            total += len(piece)
            if total > limit:
                return True
        start = min(at, len(view)) - len(member.unused_data)
        padding_end = _NONZERO.search(raw, start)
        start = padding_end.start() if padding_end else len(view)
    return False


def gunzip(raw: bytes, path: Path, max_decompressed_mb: int = MAX_DECOMPRESSED_MB) -> bytes:
    """The decompressed bytes of the gzip file ``path`` (its content ``raw``), at most
    ``max_decompressed_mb`` MB (of 2**20 bytes); DataError past it or on data that is not gzip."""
    # Two passes over the compressed bytes: the first counts what they decompress to without
    # keeping it, the second (only under the limit) decompresses for real. A gzip bomb (10 MB that
    # decompress to 10 GB) then costs one piece of memory, not the limit: decompressing once while
    # keeping the pieces would hold up to max_decompressed_mb before stopping. The first pass also
    # judges the data: zlib is stricter than gzip.decompress (which skips a header's CRC, for one),
    # so what the second pass reads has all been counted.
    try:
        over = gzip_size_over(raw, max_decompressed_mb << 20)
        data = b"" if over else gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if over:
        raise DataError(
            f"{path}: decompresses to more than {max_decompressed_mb} MB (data.max_decompressed_mb); "
            "a gzip bomb, or raise the limit"
        )
    return data
