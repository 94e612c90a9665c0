"""Encode and decode whole FUSE messages, driven by the opcode table.

Both directions for both roles: a server decodes requests and encodes replies, a client encodes
requests and decodes replies.  Decoding peer bytes raises ``ProtocolError`` and nothing else:
lengths are checked before every unpack (the fuzz invariant, SECURITY.md B6 #7).
"""

from __future__ import annotations

import errno as E
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from ..errors import LocalProtocolError, ProtocolError
from . import constants as C
from . import structs as S
from .constants import Opcode
from .extensions import Extension, decode_extensions, encode_extensions
from .opcodes import BY_NUMBER, DATA, OPCODES, XATTR, OpSpec, reply_struct_size
from .schema import Codec, codec

Buffer = bytes | bytearray | memoryview

_IN = codec(S.InHeader)
_OUT = codec(S.OutHeader)
_IN_SIZE = _IN.size
_OUT_SIZE = _OUT.size
_in_unpack = _IN.unpack
_out_pack = _OUT.pack
_EMPTY = memoryview(b"")


class Request(NamedTuple):
    """A decoded request."""

    header: S.InHeader
    spec: OpSpec
    """The opcode's table row (``spec.opcode`` is the ``Opcode``)."""
    arg: Any
    """The fixed struct after the header (``GetattrIn``, ``WriteIn``, …) or None."""
    names: tuple[bytes, ...] = ()
    """NUL-terminated names, without their NUL."""
    data: memoryview = _EMPTY
    """Trailing bytes: WRITE data, SETXATTR value, IOCTL input, NOTIFY_REPLY data."""
    items: tuple[Any, ...] = ()
    """BATCH_FORGET ``ForgetOne`` entries, REMOVEMAPPING ``RemoveMappingOne`` entries."""
    ext: tuple[Extension, ...] = ()
    """Request extensions (security context, supplementary groups)."""

    @property
    def opcode(self) -> Opcode:
        return self.spec.opcode

    @property
    def unique(self) -> int:
        return self.header.unique

    @property
    def nodeid(self) -> int:
        return self.header.nodeid


class Reply(NamedTuple):
    """A decoded reply: its header, then either an ``error`` or the body parts."""

    header: S.OutHeader
    parts: tuple[Any, ...] = ()
    """Decoded parts in the order of the table's reply row (structs and/or ``bytes``)."""

    @property
    def error(self) -> int:
        """The errno (positive) or 0."""
        return -self.header.error

    @property
    def unique(self) -> int:
        return self.header.unique

    @property
    def value(self) -> Any:
        """The single part of a one-part reply (EntryOut, AttrOut, data…), None if empty."""
        if not self.parts:
            return None
        return self.parts[0] if len(self.parts) == 1 else self.parts


def _unpack_prefix(c: Codec, view: memoryview, offset: int, size: int) -> Any:
    """Unpack a struct of which only ``size`` leading bytes are on the wire (compat sizes)."""
    if size == c.size:
        return c.unpack(view, offset)
    padded = bytes(view[offset:offset + size]) + bytes(c.size - size)
    return c.unpack(padded)


def decode_request(buf: Buffer, *, minor: int = C.KERNEL_MINOR_VERSION,
                   flags: int = 0) -> Request:
    """Decode one request (in_header + arguments) as the kernel sends it at ``minor``.

    ``flags`` are the negotiated INIT flags (they decide the SETXATTR struct size).  Raises
    ``ProtocolError`` with an ``errno`` to answer (ENOSYS for an unknown opcode, EINVAL or EIO
    for a malformed body) on anything malformed, and nothing else.
    """
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    n = len(view)
    if n < _IN_SIZE:
        raise ProtocolError(f"request of {n} bytes is shorter than in_header", field="len",
                            offset=0)
    header = _in_unpack(view)
    length = header.len
    if length < _IN_SIZE or length > n:
        raise ProtocolError(f"in_header.len {length} does not fit the {n} bytes received",
                            opcode=header.opcode, field="len", offset=0)
    spec = BY_NUMBER.get(header.opcode)
    if spec is None:
        raise ProtocolError(f"unknown opcode {header.opcode}", opcode=header.opcode,
                            field="opcode", offset=4, errno=E.ENOSYS)
    end = length
    ext: tuple[Extension, ...] = ()
    if header.total_extlen:
        extlen = header.total_extlen * 8
        if extlen > end - _IN_SIZE:
            raise ProtocolError("total_extlen past the request", opcode=spec.opcode,
                                field="total_extlen", offset=36, errno=E.EINVAL)
        end -= extlen
        ext = decode_extensions(view[end:length])
    pos = _IN_SIZE
    arg: Any = None
    if spec.request is not None:
        size = spec.request_size(minor, flags)
        if size:
            if end - pos < size:
                raise ProtocolError(f"{spec.name} arguments truncated: {end - pos} of {size} bytes",
                                    opcode=spec.opcode, field=spec.request.__name__,
                                    offset=pos, errno=E.EINVAL)
            arg = _unpack_prefix(codec(spec.request), view, pos, size)
            pos += size
    names: tuple[bytes, ...] = ()
    if spec.names:
        found = []
        for i in range(spec.names):
            nul = _find_nul(view, pos, end)
            if nul < 0:
                raise ProtocolError(f"{spec.name} name {i} has no NUL terminator",
                                    opcode=spec.opcode, field="name", offset=pos, errno=E.EINVAL)
            found.append(bytes(view[pos:nul]))
            pos = nul + 1
        names = tuple(found)
    data = _EMPTY
    items: tuple[Any, ...] = ()
    if spec.data:
        data = view[pos:end]
        if spec.data_size_field is not None and arg is not None:
            want = getattr(arg, spec.data_size_field)
            if want != len(data):
                raise ProtocolError(f"{spec.name} {spec.data_size_field}={want} but "
                                    f"{len(data)} data bytes follow", opcode=spec.opcode,
                                    field=spec.data_size_field, offset=pos, errno=E.EINVAL)
    elif spec.items is not None:
        item = codec(spec.items)
        count = arg.count
        if count * item.size != end - pos:
            raise ProtocolError(f"{spec.name} count={count} but {end - pos} bytes of entries",
                                opcode=spec.opcode, field="count", offset=pos, errno=E.EINVAL)
        unpack = item.unpack
        items = tuple(unpack(view, pos + i * item.size) for i in range(count))
    return Request(header, spec, arg, names, data, items, ext)


def _find_nul(view: memoryview, start: int, end: int) -> int:
    # memoryview has no find(); names are short, so copying the candidate span is cheap. Bound
    # the copy to a name's worst case (NAME_MAX/PATH_MAX-ish) plus the span actually present.
    chunk = bytes(view[start:end])
    at = chunk.find(b"\0")
    return -1 if at < 0 else start + at


def encode_request(opcode: Opcode, unique: int, nodeid: int = 0, arg: Any = None,
                   names: Sequence[bytes] = (), data: Buffer = b"",
                   items: Iterable[Any] = (), *, uid: int = 0, gid: int = 0, pid: int = 0,
                   ext: Sequence[Extension] = (), minor: int = C.KERNEL_MINOR_VERSION,
                   flags: int = 0) -> bytes:
    """Build one request as the kernel would at ``minor`` (the client's encoder)."""
    return b"".join(encode_request_parts(opcode, unique, nodeid, arg, names, data, items,
                                         uid=uid, gid=gid, pid=pid, ext=ext, minor=minor,
                                         flags=flags))


def encode_request_parts(opcode: Opcode, unique: int, nodeid: int = 0, arg: Any = None,
                         names: Sequence[bytes] = (), data: Buffer = b"",
                         items: Iterable[Any] = (), *, uid: int = 0, gid: int = 0, pid: int = 0,
                         ext: Sequence[Extension] = (), minor: int = C.KERNEL_MINOR_VERSION,
                         flags: int = 0) -> list[Buffer]:
    """Like ``encode_request`` but as a gather list, so WRITE data is never copied."""
    spec = OPCODES[opcode]
    parts: list[Buffer] = [b""]
    if spec.request is not None:
        size = spec.request_size(minor, flags)
        if size:
            if not isinstance(arg, spec.request):
                raise LocalProtocolError(f"{spec.name} needs a {spec.request.__name__}")
            parts.append(codec(spec.request).pack(arg)[:size])
    elif arg is not None:
        raise LocalProtocolError(f"{spec.name} takes no fixed argument")
    if len(names) != spec.names:
        raise LocalProtocolError(f"{spec.name} takes {spec.names} names")
    for name in names:
        if b"\0" in name:
            raise LocalProtocolError("NUL inside a name")
        parts.append(bytes(name) + b"\0")
    if spec.items is not None:
        item = codec(spec.items)
        parts.append(b"".join(item.pack(x) for x in items))
    if data:
        if not spec.data:
            raise LocalProtocolError(f"{spec.name} carries no data")
        parts.append(data)
    extlen = 0
    if ext:
        ext_bytes = encode_extensions(tuple(ext))
        extlen = len(ext_bytes) // 8
        parts.append(ext_bytes)
    total = sum(len(p) for p in parts) + _IN_SIZE
    parts[0] = _IN.pack(S.InHeader(total, int(opcode), unique, nodeid, uid, gid, pid, extlen, 0))
    return parts


def encode_error(unique: int, errno: int) -> bytes:
    """A header-only error reply.  ``errno`` must be in (0, 512): the kernel rejects others."""
    if not 0 < errno < C.ERRNO_LIMIT:
        raise LocalProtocolError(f"errno {errno} is outside (0, {C.ERRNO_LIMIT})")
    return _out_pack((_OUT_SIZE, -errno, unique))


def encode_reply_parts(spec: OpSpec, unique: int, result: Any,
                       minor: int = C.KERNEL_MINOR_VERSION) -> list[Buffer]:
    """Gather list of a successful reply to ``spec``'s opcode (header first, len exact).

    ``result`` per the table's reply row: a struct for one-struct replies, bytes-like for
    DATA, a tuple for several parts (CREATE: ``(EntryOut, OpenOut)``; IOCTL:
    ``(IoctlOut, data)``), None for header-only replies; for XATTR rows a ``GetxattrOut`` or
    the value bytes.
    """
    shape = spec.reply
    parts: list[Buffer] = [b""]
    if not shape:
        if result is not None:
            raise LocalProtocolError(f"{spec.name} replies carry no body")
    else:
        values = result if len(shape) > 1 else (result,)
        if len(values) != len(shape):
            raise LocalProtocolError(f"{spec.name} reply has {len(shape)} parts")
        for part, value in zip(shape, values, strict=True):
            if part is DATA or (part is XATTR and not isinstance(value, S.GetxattrOut)):
                parts.append(value)
            elif part is XATTR:
                parts.append(codec(S.GetxattrOut).pack(value))
            else:
                assert isinstance(part, type)
                if not isinstance(value, part):
                    raise LocalProtocolError(
                        f"{spec.name} reply part must be {part.__name__}, not {type(value)}")
                packed = codec(part).pack(value)
                size = reply_struct_size(part, minor)
                parts.append(packed if size == len(packed) else packed[:size])
    total = _OUT_SIZE
    for p in parts:
        total += len(p)
    parts[0] = _out_pack((total, 0, unique))
    return parts


def encode_reply(opcode: Opcode, unique: int, result: Any = None,
                 minor: int = C.KERNEL_MINOR_VERSION) -> bytes:
    """``encode_reply_parts`` joined into bytes."""
    return b"".join(encode_reply_parts(OPCODES[opcode], unique, result, minor))


def decode_reply(opcode: Opcode, buf: Buffer, *, minor: int = C.KERNEL_MINOR_VERSION,
                 xattr_size: int | None = None) -> Reply:
    """Decode a reply to a request of ``opcode`` (the client's decoder).

    Enforces what the kernel enforces (SECURITY.md B5): exact ``len``, errno range, no body
    with an error, fixed parts of the exact size for the negotiated minor.  ``xattr_size`` is
    the size the GETXATTR/LISTXATTR request asked for (0: a ``GetxattrOut`` comes back).
    """
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if len(view) < _OUT_SIZE:
        raise ProtocolError(f"reply of {len(view)} bytes is shorter than out_header",
                            field="len", offset=0)
    header = _OUT.unpack(view)
    if header.len != len(view):
        raise ProtocolError(f"out_header.len {header.len} != {len(view)} bytes", field="len",
                            offset=0, opcode=opcode)
    if header.error:
        if not -C.ERRNO_LIMIT < header.error < 0:
            raise ProtocolError(f"error {header.error} outside (-512, 0)", field="error",
                                offset=4, opcode=opcode)
        if len(view) != _OUT_SIZE:
            raise ProtocolError("error reply with a body", field="len", offset=0, opcode=opcode)
        return Reply(header)
    spec = OPCODES[opcode]
    pos = _OUT_SIZE
    parts: list[Any] = []
    for i, part in enumerate(spec.reply):
        last = i == len(spec.reply) - 1
        if part is XATTR:
            part = DATA if xattr_size else S.GetxattrOut
        if part is DATA:
            if not last:  # pragma: no cover - table invariant
                raise LocalProtocolError("DATA must be the last reply part")
            parts.append(bytes(view[pos:]))
            pos = len(view)
            continue
        assert isinstance(part, type)
        size = reply_struct_size(part, minor)
        if len(view) - pos < size:
            raise ProtocolError(f"{spec.name} reply part {part.__name__} truncated",
                                opcode=opcode, field=part.__name__, offset=pos)
        parts.append(_unpack_prefix(codec(part), view, pos, size))
        pos += size
    if pos != len(view):
        raise ProtocolError(f"{spec.name} reply has {len(view) - pos} bytes too many",
                            opcode=opcode, field="len", offset=pos)
    return Reply(header, tuple(parts))
