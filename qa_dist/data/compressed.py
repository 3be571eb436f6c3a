"""Gzipped data files, decompressed within a bound (``data.max_decompressed_mb``): a gzip bomb of a
few MB that decompress to gigabytes stops with an error at the cost of a piece of memory."""

from __future__ import annotations

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


def _pieces(raw: bytes):
    """The decompressed bytes of the gzip data ``raw``, ``_OUTPUT_PIECE`` bytes at most at a time.
    Its members (gzip files may be concatenated, and zero bytes may pad the end of one, as
    ``gzip.decompress`` accepts) are read in turn from the one buffer, so many small members cost
    linear time (``gzip.decompress`` copies the rest of the file at each member: quadratic). Raises
    zlib.error or EOFError on data that is not gzip."""
    view = memoryview(raw)
    start = 0
    while start < len(view):
        member = zlib.decompressobj(wbits=31)  # one gzip member: header, deflate stream, checked trailer
        at = start
        while not member.eof:
            if member.unconsumed_tail:  # input left over when the last piece filled _OUTPUT_PIECE
                yield member.decompress(member.unconsumed_tail, _OUTPUT_PIECE)
            elif at < len(view):
                yield member.decompress(view[at : at + _INPUT_PIECE], _OUTPUT_PIECE)
                at += _INPUT_PIECE
            else:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        start = min(at, len(view)) - len(member.unused_data)
        padding_end = _NONZERO.search(raw, start)
        start = padding_end.start() if padding_end else len(view)


def gzip_size_over(raw: bytes, limit: int) -> bool:
    """Whether the gzip data ``raw`` decompresses to more than ``limit`` bytes: its pieces are
    counted and dropped, and counting stops as soon as the count passes ``limit``."""
    total = 0
    for piece in _pieces(raw):
        total += len(piece)
        if total > limit:
            return True
    return False


def gunzip(raw: bytes, path: Path, max_decompressed_mb: int = MAX_DECOMPRESSED_MB) -> bytes:
    """The decompressed bytes of the gzip file ``path`` (its content ``raw``), at most
    ``max_decompressed_mb`` MB (of 2**20 bytes); DataError past it or on data that is not gzip."""
    # Two passes over the compressed bytes: the first counts what they decompress to without
    # keeping it, the second (only under the limit) decompresses for real. A gzip bomb (10 MB that
    # decompress to 10 GB) then costs one piece of memory, not the limit: decompressing once while
    # keeping the pieces would hold up to max_decompressed_mb before stopping. Both passes walk the
    # members the same way (_pieces), so the second reads exactly what the first counted; with
    # gzip.decompress there instead, its laxer header parsing (it skips a header's CRC, which zlib
    # checks) would have to be trusted to agree.
    try:
        over = gzip_size_over(raw, max_decompressed_mb << 20)
        data = b"" if over else b"".join(_pieces(raw))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if over:
        raise DataError(
            f"{path}: decompresses to more than {max_decompressed_mb} MB (data.max_decompressed_mb); "
            "a gzip bomb, or raise the limit"
        )
    return data
