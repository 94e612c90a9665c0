"""Request extensions (7.36/7.38): records appended after an op's arguments.

``in_header.total_extlen`` counts them in 8-byte units.  Each record starts with
``fuse_ext_header {size, type}``; types 0..31 are the security-context block, whose header
doubles as ``fuse_secctx_header {size, nr_secctx}``; type 32 is the supplementary groups.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from ..errors import LocalProtocolError, ProtocolError
from . import constants as C
from . import structs as S
from .schema import codec

_EXT = codec(S.ExtHeader)
_SECCTX = codec(S.Secctx)
_U32 = struct.Struct("<I")


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class SecurityContext:
    """FUSE_SECURITY_CTX: (xattr name, label) pairs for a new inode."""

    contexts: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class SupplementaryGroups:
    """FUSE_EXT_GROUPS: with FUSE_CREATE_SUPP_GROUP, the parent directory's group."""

    groups: tuple[int, ...]


@dataclass(frozen=True)
class UnknownExtension:
    type: int
    data: bytes


Extension = SecurityContext | SupplementaryGroups | UnknownExtension


def decode_extensions(buf: bytes | memoryview) -> tuple[Extension, ...]:
    """Parse the extension area; any malformation raises ``ProtocolError`` (libfuse 5d2bf19e)."""
    view = memoryview(buf)
    out: list[Extension] = []
    pos = 0
    # Each record is at least 8 bytes, so this loop runs at most len/8 times.
    while pos < len(view):
        if len(view) - pos < _EXT.size:
            raise ProtocolError("truncated extension header", field="ext", offset=pos,
                                errno=errno.EINVAL)
        size, kind = _EXT.unpack(view, pos)
        if size < _EXT.size or size % 8 or size > len(view) - pos:
            raise ProtocolError(f"bad extension size {size}", field="ext.size", offset=pos,
                                errno=errno.EINVAL)
        body = view[pos + _EXT.size: pos + size]
        if kind <= C.MAX_NR_SECCTX:
            out.append(_decode_secctx(body, kind, pos))
        elif kind == C.ExtType.GROUPS:
            if len(body) < 4:
                raise ProtocolError("truncated supplementary groups", field="ext", offset=pos,
                                    errno=errno.EINVAL)
            (count,) = _U32.unpack_from(body)
            if 4 + 4 * count > len(body):
                raise ProtocolError("supplementary group count past the record",
                                    field="nr_groups", offset=pos, errno=errno.EINVAL)
            out.append(SupplementaryGroups(struct.unpack_from(f"<{count}I", body, 4)))
        else:
            out.append(UnknownExtension(kind, bytes(body)))
        pos += size
    return tuple(out)


def _decode_secctx(body: memoryview, count: int, where: int) -> SecurityContext:
    contexts = []
    pos = 0
    for _ in range(count):
        if len(body) - pos < _SECCTX.size:
            raise ProtocolError("truncated security context", field="secctx", offset=where + pos,
                                errno=errno.EINVAL)
        ctxlen = _SECCTX.unpack(body, pos).size
        start = pos + _SECCTX.size
        end_name = bytes(body[start:]).find(b"\0")
        if end_name < 0:
            raise ProtocolError("security context name without NUL", field="secctx.name",
                                offset=where + start, errno=errno.EINVAL)
        name = bytes(body[start:start + end_name])
        label_at = start + end_name + 1
        if ctxlen > len(body) - label_at:
            raise ProtocolError("security context label past the record", field="secctx.size",
                                offset=where + pos, errno=errno.EINVAL)
        contexts.append((name, bytes(body[label_at:label_at + ctxlen])))
        pos = _align8(label_at + ctxlen)
    return SecurityContext(tuple(contexts))


def encode_extensions(extensions: tuple[Extension, ...] | list[Extension]) -> bytes:
    """Build the extension area as the kernel does (records 8-byte aligned)."""
    out = bytearray()
    for ext in extensions:
        if isinstance(ext, SecurityContext):
            if len(ext.contexts) > C.MAX_NR_SECCTX:
                raise LocalProtocolError("too many security contexts")
            body = bytearray()
            for name, label in ext.contexts:
                if b"\0" in name:
                    raise LocalProtocolError("NUL in a security context name")
                rec = _SECCTX.pack(S.Secctx(len(label))) + name + b"\0" + label
                body += rec + bytes(_align8(len(rec)) - len(rec))
            out += _EXT.pack(S.ExtHeader(_EXT.size + len(body), len(ext.contexts))) + body
        elif isinstance(ext, SupplementaryGroups):
            body = bytearray(_U32.pack(len(ext.groups))) + struct.pack(f"<{len(ext.groups)}I", *ext.groups)
            body += bytes(_align8(len(body)) - len(body))
            out += _EXT.pack(S.ExtHeader(_EXT.size + len(body), C.ExtType.GROUPS)) + body
        else:
            body = bytearray(ext.data + bytes(_align8(len(ext.data)) - len(ext.data)))
            out += _EXT.pack(S.ExtHeader(_EXT.size + len(body), ext.type)) + body
    return bytes(out)
