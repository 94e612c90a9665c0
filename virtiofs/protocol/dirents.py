"""Directory entries: ``fuse_dirent`` and ``fuse_direntplus`` records, 8-byte aligned.

A READDIR reply is a packed run of records; the kernel ignores a truncated trailing record and
fails the whole reply with EIO on a zero-length, over-long (> FUSE_NAME_MAX) or '/'-bearing name
(fs/fuse/readdir.c), so the encoder refuses those names up front.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import NamedTuple

from ..errors import LocalProtocolError, ProtocolError
from . import constants as C
from . import structs as S
from .schema import codec

_DIRENT = codec(S.Dirent)
_PLUS = codec(S.DirentPlus)
_ENTRY = codec(S.EntryOut)


def dirent_size(namelen: int, plus: bool = False) -> int:
    """Bytes one record takes (FUSE_DIRENT_SIZE / FUSE_DIRENTPLUS_SIZE)."""
    base = _PLUS.size if plus else _DIRENT.size
    return (base + namelen + C.DIRENT_ALIGN - 1) & ~(C.DIRENT_ALIGN - 1)


class DirEntry(NamedTuple):
    """One directory entry; ``offset`` is the cookie the next READDIR resumes from."""

    ino: int
    offset: int
    type: int
    """The DT_* type (file type bits of st_mode >> 12)."""
    name: bytes
    entry: S.EntryOut | None = None
    """For READDIRPLUS: the entry (nodeid 0 = no lookup count taken)."""


def _check_name(name: bytes) -> None:
    if not name or len(name) > C.NAME_MAX or b"/" in name or b"\0" in name:
        raise LocalProtocolError(f"invalid directory entry name {name[:40]!r}")


def pack_dirent(buf: bytearray, entry: DirEntry, limit: int) -> bool:
    """Append ``entry`` as a fuse_dirent to ``buf`` unless it would exceed ``limit`` bytes."""
    _check_name(entry.name)
    size = dirent_size(len(entry.name))
    if len(buf) + size > limit:
        return False
    start = len(buf)
    buf += _DIRENT.pack(S.Dirent(entry.ino, entry.offset, len(entry.name), entry.type))
    buf += entry.name
    buf += bytes(start + size - len(buf))
    return True


def pack_direntplus(buf: bytearray, entry: DirEntry, limit: int) -> bool:
    """Append ``entry`` as a fuse_direntplus to ``buf`` unless it would exceed ``limit``."""
    _check_name(entry.name)
    size = dirent_size(len(entry.name), plus=True)
    if len(buf) + size > limit:
        return False
    start = len(buf)
    buf += _ENTRY.pack(entry.entry if entry.entry is not None else S.EntryOut())
    buf += _DIRENT.pack(S.Dirent(entry.ino, entry.offset, len(entry.name), entry.type))
    buf += entry.name
    buf += bytes(start + size - len(buf))
    return True


def encode_dirents(entries: Iterable[DirEntry], limit: int = 1 << 30, plus: bool = False) -> bytes:
    """Pack as many entries as fit in ``limit`` bytes."""
    buf = bytearray()
    pack = pack_direntplus if plus else pack_dirent
    for entry in entries:
        if not pack(buf, entry, limit):
            break
    return bytes(buf)


def decode_dirents(data: bytes | memoryview, plus: bool = False, *,
                   strict: bool = False) -> list[DirEntry]:
    """Parse a READDIR/READDIRPLUS body as the kernel does (fs/fuse/readdir.c parse_dirfile).

    A record with ``namelen`` 0 or > FUSE_NAME_MAX, or a '/' or NUL in its name, raises
    ``ProtocolError`` (the kernel fails the whole reply with EIO).  A trailing record that does
    not fit with its padding is ignored as the kernel ignores it, unless ``strict`` (the reply
    validator: a server that sends one loses that entry).
    """
    view = memoryview(data)
    if view.format != "B" or view.itemsize != 1:
        view = view.cast("B")
    out: list[DirEntry] = []
    pos = 0
    fixed = _PLUS.size if plus else _DIRENT.size
    # Every record advances pos by at least `fixed` bytes: the loop is bounded by len/fixed.
    while len(view) - pos >= fixed:
        entry = None
        if plus:
            entry = _ENTRY.unpack(view, pos)
            d = _DIRENT.unpack(view, pos + _ENTRY.size)
        else:
            d = _DIRENT.unpack(view, pos)
        if d.namelen == 0 or d.namelen > C.NAME_MAX:
            raise ProtocolError(f"dirent namelen {d.namelen}", field="namelen", offset=pos,
                                errno=errno.EIO)
        size = dirent_size(d.namelen, plus)
        if size > len(view) - pos:
            break
        name = bytes(view[pos + fixed: pos + fixed + d.namelen])
        if b"/" in name or b"\0" in name:
            raise ProtocolError("dirent name with '/' or NUL", field="name", offset=pos + fixed,
                                errno=errno.EIO)
        out.append(DirEntry(d.ino, d.off, d.type, name, entry))
        pos += size
    if strict and pos != len(view):
        raise ProtocolError(f"{len(view) - pos} bytes of a truncated trailing dirent",
                            field="len", offset=pos, errno=errno.EIO)
    return out
