"""Gzipped data files, decompressed within a bound (``data.max_decompressed_mb``): a gzip bomb of a
few MB that decompress to gigabytes stops with an error at the cost of a piece of memory."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from qa_dist.config import DataConfig
from qa_dist.errors import DataError

MAX_DECOMPRESSED_MB: int = DataConfig.max_decompressed_mb
"""What a compressed file may decompress to unless told otherwise (``data.max_decompressed_mb``'s default)."""
_INPUT_PIECE = 1 << 16  # compressed bytes fed to zlib at a time
_OUTPUT_PIECE = 1 << 20  # decompressed bytes zlib produces at a time


def _pieces(read: Callable[[int], bytes], output_piece: int = _OUTPUT_PIECE) -> Iterator[bytes]:
    """The decompressed bytes of the gzip data that ``read(n)`` returns (b"" at its end),
    ``output_piece`` bytes at most at a time. Its members (gzip files may be concatenated, and zero
    bytes may pad the end of one, as ``gzip.decompress`` accepts) are read in turn, each fed what
    the last one left over, so many small members cost linear time (``gzip.decompress`` copies the
    rest of the file at each member: quadratic). Raises zlib.error or EOFError on data that is not
    gzip."""
    pending = read(_INPUT_PIECE)
    while pending:
        member = zlib.decompressobj(wbits=31)  # one gzip member: header, deflate stream, checked trailer
        while not member.eof:
            if member.unconsumed_tail:  # input left over when the last piece filled output_piece
                yield member.decompress(member.unconsumed_tail, output_piece)
            elif pending:
                yield member.decompress(pending, output_piece)
                pending = b""
            elif not (pending := read(_INPUT_PIECE)):
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        pending = member.unused_data.lstrip(b"\0")  # zero padding after a member
        while not pending and (more := read(_INPUT_PIECE)):
            pending = more.lstrip(b"\0")


def _over_limit(path: Path, max_decompressed_mb: int) -> DataError:
    return DataError(
        f"{path}: decompresses to more than {max_decompressed_mb} MB (data.max_decompressed_mb); "
        "a gzip bomb, or raise the limit"
    )


def _not_gzip(path: Path, error: Exception) -> DataError:
    return DataError(f"{path}: not a valid gzip file ({error})")


def gunzip_stream(
    read: Callable[[int], bytes], path: Path, max_decompressed_mb: int = MAX_DECOMPRESSED_MB, piece: int = 1 << 18
) -> Iterator[bytes]:
    """The decompressed bytes of the gzip file ``path``, whose bytes ``read(n)`` returns, ``piece``
    bytes at most at a time; DataError on data that is not gzip, or as soon as the pieces pass
    ``max_decompressed_mb`` MB (of 2**20 bytes).

    A reader that must know a file is within the limit before it uses a byte of it reads the
    stream through once first, dropping the pieces: a gzip bomb (10 MB that decompress to 10 GB)
    then costs one piece of memory, not the limit, and the second pass reads exactly what the first
    counted, both walking the members the same way (``_pieces``; with ``gzip.decompress`` instead,
    its laxer header parsing, which skips a header's CRC that zlib checks, would have to agree)."""
    limit, total = max_decompressed_mb << 20, 0
    try:
        for data in _pieces(read, piece):
            total += len(data)
            if total > limit:
                raise _over_limit(path, max_decompressed_mb)
            yield data
    except (EOFError, zlib.error) as e:
        raise _not_gzip(path, e) from None
