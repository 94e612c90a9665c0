"""The capture format ``virtiofs capture`` writes and ``virtiofs decode`` reads.

A file is the magic ``b"FUSECAP1"`` followed by records ``{u8 direction; u8 pad[3]; u32 len}``
+ ``len`` raw bytes, little-endian, in the order they crossed /dev/fuse.  Directions:
``REQUEST`` (kernel -> server, exactly what read(2) returned), ``REPLY`` (server -> kernel,
exactly what write(2) was given), ``NOTIFY`` (server -> kernel, unsolicited) and
``REFUSED`` (a reply the kernel's write(2) refused: the record holds the reply bytes).

Sans-I/O like the rest of the package: bytes in, records out.  Also reads a plain stream of
concatenated requests (each framed by its ``in_header.len``), what a simple tracer would dump.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import NamedTuple

from ..errors import ProtocolError

MAGIC = b"FUSECAP1"
_RECORD = struct.Struct("<B3xI")


class Direction(enum.IntEnum):
    """Who sent a captured message."""

    REQUEST = 0
    REPLY = 1
    NOTIFY = 2
    REFUSED = 3


class Record(NamedTuple):
    """One captured message."""

    direction: Direction
    data: bytes


def encode_record(direction: Direction, data: bytes | bytearray | memoryview) -> bytes:
    """One record's bytes (append to a file that starts with ``MAGIC``)."""
    return _RECORD.pack(int(direction), len(data)) + bytes(data)


def decode_capture(blob: bytes | bytearray | memoryview) -> Iterator[Record]:
    """The records of a capture file, or of a raw concatenated request stream.

    Raises ``ProtocolError`` on a truncated record, an unknown direction, or a raw stream whose
    framing (``in_header.len``) does not add up.
    """
    view = memoryview(blob)
    if bytes(view[:len(MAGIC)]) == MAGIC:
        pos = len(MAGIC)
        while pos < len(view):
            if len(view) - pos < _RECORD.size:
                raise ProtocolError("truncated capture record header", offset=pos)
            kind, length = _RECORD.unpack_from(view, pos)
            pos += _RECORD.size
            if length > len(view) - pos:
                raise ProtocolError(f"capture record of {length} bytes past the end",
                                    offset=pos)
            try:
                direction = Direction(kind)
            except ValueError:
                raise ProtocolError(f"unknown capture direction {kind}",
                                    offset=pos - _RECORD.size) from None
            yield Record(direction, bytes(view[pos:pos + length]))
            pos += length
        return
    pos = 0
    while pos < len(view):
        if len(view) - pos < 4:
            raise ProtocolError("trailing bytes shorter than a length field", offset=pos)
        (length,) = struct.unpack_from("<I", view, pos)
        if length < 40 or length > len(view) - pos:
            raise ProtocolError(f"in_header.len {length} does not frame the stream",
                                field="len", offset=pos)
        yield Record(Direction.REQUEST, bytes(view[pos:pos + length]))
        pos += length
