"""Hypothesis strategies for every FUSE message, built from ``OPCODES`` and the schemas.

For fuzzing parsers and servers (ours or yours).  Field ranges come from the construct types
(``Int64ul`` -> 0..2**64-1, ``Int32sl`` -> signed, ``Bytes(n)`` -> n bytes); lengths and counts
that describe trailing bytes are kept consistent, so every *valid* example is a message the
kernel could send (requests) or accept (replies: ``validate.validate_reply`` passes).

- ``structs(cls)``: any declared struct.
- ``requests()`` -> ``RequestExample`` (``.encode()`` gives the bytes); ``request_bytes()``.
- ``exchanges()`` -> ``(RequestExample, ReplyExample | None)``: a request and a valid reply to
  it (None for FORGET-class requests); ``reply_bytes()`` -> ``(Request, bytes)``.
- ``notifications()`` -> ``NotifyExample``; ``notify_bytes()``.
- ``dirents(plus)``, ``dirent_bytes(plus)``, ``extensions()``, ``extension_bytes()``.
- ``malformed=True`` on every ``*_bytes`` strategy: broken messages (truncated, wrong len,
  unterminated or extra names, size fields that disagree with the body, bad extension
  headers, random mutations and plain random bytes).  A broken example may happen to be
  valid; the property to test is that a decoder returns a message or raises ``ProtocolError``.

Hypothesis is a test dependency: import this module only where hypothesis is installed
(``virtiofs.protocol`` itself never imports it).
"""

from __future__ import annotations

import errno
import functools
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from . import constants as C
from . import structs as S
from .codec import (
    Request,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
    init_in_size,
)
from .constants import InitFlags, NotifyCode, Opcode
from .dirents import DirEntry, encode_dirents
from .extensions import (
    Extension,
    SecurityContext,
    SupplementaryGroups,
    UnknownExtension,
    encode_extensions,
)
from .notify import encode_notify
from .opcodes import NOTIFICATIONS, OPCODES, OpSpec, reply_struct_size
from .schema import codec, field_types

__all__ = [
    "NotifyExample", "ReplyExample", "RequestExample", "dirent_bytes", "dirents",
    "extension_bytes", "extensions", "exchanges", "file_names", "malformed_bytes",
    "notifications", "notify_bytes", "reply_bytes", "request_bytes", "requests", "structs",
]

_RESERVED = ("padding", "dummy", "unused", "spare", "reserved")
_VALID_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                stat.S_IFIFO, stat.S_IFSOCK)
_LLONG_MAX = (1 << 63) - 1
_FMT_RANGES = {
    "B": (0, 0xFF), "H": (0, 0xFFFF), "I": (0, 0xFFFFFFFF), "L": (0, 0xFFFFFFFF),
    "Q": (0, (1 << 64) - 1), "b": (-0x80, 0x7F), "h": (-0x8000, 0x7FFF),
    "i": (-(1 << 31), (1 << 31) - 1), "l": (-(1 << 31), (1 << 31) - 1),
    "q": (-(1 << 63), (1 << 63) - 1),
}


def _is_reserved(name: str) -> bool:
    return name.startswith(_RESERVED) or name in ("unused4", "unused5")


def _field_strategy(kind: Any, name: str, zero_reserved: bool) -> st.SearchStrategy[Any]:
    if isinstance(kind, type):
        return structs(kind, zero_reserved=zero_reserved)
    fmt = getattr(kind, "fmtstr", None)
    if fmt is not None:
        lo, hi = _FMT_RANGES[fmt[-1]]
        if zero_reserved and _is_reserved(name):
            return st.just(0)
        # Hypothesis already weights bounded integers towards their ends, where parsers break.
        return st.integers(lo, hi)
    size = int(kind.sizeof())
    if zero_reserved:
        return st.just(bytes(size))
    return st.binary(min_size=size, max_size=size)


def structs(cls: type[Any], *, zero_reserved: bool = False,
            **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Any instance of a declared struct (``zero_reserved``: padding/reserved fields are 0).

    ``overrides`` replace the strategy of named fields (``mode=st.just(0o100644)``).
    """
    if not overrides:
        key = (cls, zero_reserved)
        found = _STRUCTS.get(key)
        if found is None:
            found = _STRUCTS[key] = _structs(cls, zero_reserved, {})
        return found
    return _structs(cls, zero_reserved, overrides)


_STRUCTS: dict[tuple[type[Any], bool], st.SearchStrategy[Any]] = {}


def _structs(cls: type[Any], zero_reserved: bool,
             overrides: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    fields = {}
    for name, kind in field_types(cls):
        fields[name] = (overrides[name] if name in overrides
                        else _field_strategy(kind, name, zero_reserved))
    return st.builds(cls, **fields)


@functools.cache
def file_names(max_size: int = 255) -> st.SearchStrategy[bytes]:
    """A single path component as the kernel sends it: 1..255 bytes, no NUL, no '/'."""
    return st.binary(min_size=1, max_size=max_size).filter(
        lambda b: b"\0" not in b and b"/" not in b)


def _perm() -> st.SearchStrategy[int]:
    return st.integers(0, 0o7777)


@functools.cache
def attrs(file_type: int | None = None) -> st.SearchStrategy[S.Attr]:
    """A ``fuse_attr`` the kernel accepts (fuse_invalid_attr): a valid type, size <= LLONG_MAX."""
    types = st.just(file_type) if file_type is not None else st.sampled_from(_VALID_TYPES)
    return st.builds(lambda base, t, p: base._replace(mode=t | p),
                     structs(S.Attr, zero_reserved=True, size=st.integers(0, _LLONG_MAX)),
                     types, _perm())


# --------------------------------------------------------------------------------------------
# Extensions and dirents


@functools.cache
def extensions() -> st.SearchStrategy[tuple[Extension, ...]]:
    """Request extension records: security contexts, supplementary groups, unknown types."""
    secctx = st.builds(
        SecurityContext,
        st.lists(st.tuples(st.binary(max_size=24).filter(lambda b: b"\0" not in b),
                           st.binary(max_size=40)), max_size=3).map(tuple))
    groups = st.builds(SupplementaryGroups,
                       st.lists(st.integers(0, 0xFFFFFFFF), max_size=4).map(tuple))
    # An unknown record cannot say its own length beyond the 8-byte padding: keep it aligned.
    unknown = st.builds(UnknownExtension, st.integers(33, 0xFFFFFFFF),
                        st.binary(max_size=24).map(lambda b: b + bytes(-len(b) % 8)))
    return st.lists(st.one_of(secctx, groups, unknown), max_size=3).map(tuple)


def extension_bytes(*, malformed: bool = False) -> st.SearchStrategy[bytes]:
    """An encoded extension area (``malformed``: broken sizes, counts and truncations)."""
    valid = extensions().map(encode_extensions)
    if not malformed:
        return valid
    return _breakers(valid, header_len_at=0, header_len_fmt="<I")


@functools.cache
def dirents(plus: bool = False, max_size: int = 6) -> st.SearchStrategy[list[DirEntry]]:
    """Directory entries; for ``plus`` each carries a valid ``EntryOut`` (or nodeid 0)."""
    entry = st.none()
    if plus:
        entry = st.builds(lambda e, a, node: e._replace(nodeid=node, attr=a),
                          structs(S.EntryOut, zero_reserved=True), attrs(),
                          st.one_of(st.just(0), st.integers(2, (1 << 64) - 1)))
    one = st.builds(DirEntry, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
                    st.integers(0, 15), file_names(64), entry)
    return st.lists(one, max_size=max_size)


def dirent_bytes(plus: bool = False, *, malformed: bool = False) -> st.SearchStrategy[bytes]:
    """An encoded READDIR/READDIRPLUS body."""
    valid = dirents(plus).map(lambda es: encode_dirents(es, plus=plus))
    if not malformed:
        return valid
    return _breakers(valid, header_len_at=144 if plus else 16, header_len_fmt="<I")


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class RequestExample:
    """The inputs of ``encode_request``; ``encode()`` gives the bytes the kernel would send."""

    opcode: Opcode
    unique: int
    nodeid: int
    arg: Any
    names: tuple[bytes, ...] = ()
    data: bytes = b""
    items: tuple[Any, ...] = ()
    ext: tuple[Extension, ...] = ()
    uid: int = 0
    gid: int = 0
    pid: int = 0
    minor: int = C.KERNEL_MINOR_VERSION
    flags: int = 0

    def encode(self) -> bytes:
        """The request bytes."""
        return encode_request(self.opcode, self.unique, self.nodeid, self.arg, self.names,
                              self.data, self.items, uid=self.uid, gid=self.gid, pid=self.pid,
                              ext=self.ext, minor=self.minor, flags=self.flags)

    def decode(self) -> Request:
        """The request as a server decodes it."""
        return decode_request(self.encode(), minor=self.minor, flags=self.flags)


def _fit(cls: type[Any], value: Any, size: int) -> Any:
    """``value`` as it survives a compat-size prefix on the wire (the tail reads as zeros)."""
    c = codec(cls)
    if size >= c.size:
        return value
    return c.unpack(c.pack(value)[:size] + bytes(c.size - size))


_U64 = st.integers(0, (1 << 64) - 1)
_U32 = st.integers(0, 0xFFFFFFFF)


def _arg_strategy(spec: OpSpec) -> st.SearchStrategy[Any]:
    """Fixed arguments that make sense to a server (types, sizes, counts kept plausible)."""
    found = _ARGS.get(spec.opcode)
    if found is None:
        found = _ARGS[spec.opcode] = _make_arg_strategy(spec)
    return found


_ARGS: dict[Opcode, st.SearchStrategy[Any]] = {}


def _make_arg_strategy(spec: OpSpec) -> st.SearchStrategy[Any]:
    op, cls = spec.opcode, spec.request
    assert cls is not None
    small = st.integers(0, 1 << 16)
    if op is Opcode.MKNOD:
        return structs(cls, zero_reserved=True, mode=st.builds(
            lambda t, p: t | p, st.sampled_from((stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK,
                                                 stat.S_IFIFO, stat.S_IFSOCK)), _perm()))
    if op in (Opcode.CREATE, Opcode.TMPFILE):
        return structs(cls, zero_reserved=True,
                       mode=_perm().map(lambda p: stat.S_IFREG | p))
    if op in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.WRITE):
        return structs(cls, zero_reserved=True, size=small)
    if op in (Opcode.GETXATTR, Opcode.LISTXATTR):
        return structs(cls, zero_reserved=True, size=st.one_of(st.just(0), small))
    if op is Opcode.IOCTL:
        return structs(cls, zero_reserved=True, out_size=small, in_size=st.integers(0, 64))
    if op is Opcode.INIT:
        return structs(cls, zero_reserved=True, major=st.just(C.KERNEL_VERSION),
                       minor=st.integers(0, C.KERNEL_MINOR_VERSION + 5))
    return structs(cls, zero_reserved=True)


@st.composite
def _request(draw: st.DrawFn, spec: OpSpec, minor: int, flags: int,
             with_ext: bool) -> RequestExample:
    arg = None
    if spec.request is not None:
        arg = draw(_arg_strategy(spec))
        if spec.opcode is Opcode.INIT:
            arg = _fit(spec.request, arg, init_in_size(arg.major, arg.minor))
        else:
            size = spec.request_size(minor, flags)
            arg = None if size == 0 else _fit(spec.request, arg, size)
    names = tuple(draw(file_names()) for _ in range(spec.names))
    data = b""
    items: tuple[Any, ...] = ()
    if spec.data:
        field_name = spec.data_size_field
        length = getattr(arg, field_name) if arg is not None and field_name else None
        if length is None or length > 4096:
            data = draw(st.binary(max_size=256))
        else:
            data = draw(st.binary(min_size=length, max_size=length))
        if arg is not None and field_name:
            arg = arg._replace(**{field_name: len(data)})
    if spec.items is not None:
        items = tuple(draw(st.lists(structs(spec.items), max_size=8)))
        assert arg is not None
        arg = arg._replace(count=len(items))
    ext: tuple[Extension, ...] = ()
    if with_ext and spec.extensions:
        ext = draw(extensions())
    return RequestExample(spec.opcode, draw(_U64), draw(_U64), arg, names, data, items, ext,
                          draw(_U32), draw(_U32), draw(_U32), minor, flags)


def requests(opcodes: list[Opcode] | None = None, *, minor: int = C.KERNEL_MINOR_VERSION,
             flags: int | st.SearchStrategy[int] | None = None,
             extensions: bool = True) -> st.SearchStrategy[RequestExample]:
    """Valid requests for ``opcodes`` (default: every one) at ``minor``.

    ``flags`` (the negotiated INIT flags, deciding the SETXATTR size) default to drawing
    with and without SETXATTR_EXT.
    """
    chosen = [OPCODES[o] for o in (opcodes or list(OPCODES))]
    flag_strategy = (st.sampled_from([0, int(InitFlags.SETXATTR_EXT)]) if flags is None
                     else flags if isinstance(flags, st.SearchStrategy) else st.just(flags))
    return st.tuples(st.sampled_from(chosen), flag_strategy).flatmap(
        lambda sf: _request(sf[0], minor, sf[1], extensions))


def request_bytes(*, minor: int = C.KERNEL_MINOR_VERSION, flags: int = 0,
                  malformed: bool = False) -> st.SearchStrategy[bytes]:
    """Encoded requests (``malformed``: broken ones, see the module docstring)."""
    valid = requests(minor=minor, flags=flags).map(lambda r: r.encode())
    if not malformed:
        return valid
    return _breakers(valid, header_len_at=0, header_len_fmt="<I", names_from=40)


# --------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True)
class ReplyExample:
    """A reply to ``request``: ``result`` for ``encode_reply`` or an ``error`` (errno > 0)."""

    request: RequestExample
    result: Any = None
    error: int = 0
    minor: int = C.KERNEL_MINOR_VERSION
    """The minor the reply's fixed sizes follow (INIT: min of both sides)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def encode(self) -> bytes:
        """The reply bytes."""
        if self.error:
            return encode_error(self.request.unique, self.error)
        return encode_reply(self.request.opcode, self.request.unique, self.result, self.minor)


@functools.cache
def _entry(file_type: int | None, lookup: bool) -> st.SearchStrategy[S.EntryOut]:
    nodeids = st.integers(2, (1 << 64) - 1)
    if lookup:
        nodeids = st.one_of(st.just(0), st.just(C.ROOT_ID), nodeids)
    return st.builds(
        lambda e, a, node: e._replace(nodeid=node, attr=a,
                                      generation=0 if node == C.ROOT_ID else e.generation),
        structs(S.EntryOut, zero_reserved=True), attrs(file_type), nodeids)


def _xattr_names(limit: int) -> st.SearchStrategy[bytes]:
    names = st.lists(file_names(16), max_size=4).map(lambda ns: b"".join(n + b"\0" for n in ns))
    return names.filter(lambda b: len(b) <= limit)


@st.composite
def _reply(draw: st.DrawFn, req: RequestExample) -> ReplyExample | None:
    spec = OPCODES[req.opcode]
    op, arg = spec.opcode, req.arg
    if spec.no_reply and op is not Opcode.INTERRUPT:
        return None
    if op is Opcode.INTERRUPT:
        return ReplyExample(req, error=draw(st.sampled_from([errno.EAGAIN, errno.ENOSYS])))
    if draw(st.integers(0, 7)) == 0:
        return ReplyExample(req, error=draw(st.integers(1, C.ERRNO_LIMIT - 1)), minor=req.minor)
    minor = req.minor
    result: Any = None
    if op is Opcode.LOOKUP:
        result = draw(_entry(None, lookup=True))
    elif op in (Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK):
        ftype = {Opcode.MKDIR: stat.S_IFDIR, Opcode.SYMLINK: stat.S_IFLNK}.get(op)
        if op is Opcode.MKNOD:
            ftype = stat.S_IFMT(arg.mode)
        result = draw(_entry(ftype, lookup=False))
    elif op in (Opcode.CREATE, Opcode.TMPFILE):
        result = (draw(_entry(stat.S_IFREG, lookup=False)),
                  draw(structs(S.OpenOut, zero_reserved=True)))
    elif op in (Opcode.GETATTR, Opcode.SETATTR):
        result = draw(structs(S.AttrOut, zero_reserved=True, attr=attrs()))
    elif op is Opcode.READ:
        result = draw(st.binary(max_size=min(arg.size, 512)))
    elif op in (Opcode.READDIR, Opcode.READDIRPLUS):
        plus = op is Opcode.READDIRPLUS
        result = encode_dirents(draw(dirents(plus)), limit=arg.size, plus=plus)
    elif op is Opcode.READLINK:
        result = draw(st.binary(min_size=1, max_size=256))
    elif op is Opcode.WRITE:
        result = S.WriteOut(draw(st.integers(0, arg.size)))
    elif op is Opcode.COPY_FILE_RANGE:
        result = S.WriteOut(draw(st.integers(0, min(arg.len, 0xFFFFFFFF))))
    elif op is Opcode.COPY_FILE_RANGE_64:
        result = S.CopyFileRangeOut(draw(st.integers(0, arg.len)))
    elif op in (Opcode.GETXATTR, Opcode.LISTXATTR):
        if arg.size == 0:
            result = draw(structs(S.GetxattrOut, zero_reserved=True))
        elif op is Opcode.LISTXATTR:
            result = draw(_xattr_names(arg.size))
        else:
            result = draw(st.binary(max_size=min(arg.size, 256)))
    elif op is Opcode.IOCTL:
        result = (draw(structs(S.IoctlOut, zero_reserved=True)),
                  draw(st.binary(max_size=min(arg.out_size, 256))))
    elif op is Opcode.INIT:
        minor = min(arg.minor, C.KERNEL_MINOR_VERSION)
        out = draw(structs(S.InitOut, zero_reserved=True, major=st.just(C.KERNEL_VERSION),
                           minor=st.integers(0, C.KERNEL_MINOR_VERSION),
                           map_alignment=st.integers(0, C.DAX_SHIFT)))
        result = _fit(S.InitOut, out, reply_struct_size(S.InitOut, minor))
    elif op is Opcode.CUSE_INIT:
        result = (draw(structs(S.CuseInitOut, zero_reserved=True)),
                  draw(st.binary(max_size=64)))
    elif spec.reply:
        parts = []
        for part in spec.reply:
            assert isinstance(part, type), spec
            value = draw(structs(part, zero_reserved=True))
            parts.append(_fit(part, value, reply_struct_size(part, minor)))
        result = parts[0] if len(parts) == 1 else tuple(parts)
    if op in (Opcode.LOOKUP, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK,
              Opcode.GETATTR, Opcode.SETATTR):
        part = S.EntryOut if op not in (Opcode.GETATTR, Opcode.SETATTR) else S.AttrOut
        result = _fit(part, result, reply_struct_size(part, minor))
    elif op in (Opcode.CREATE, Opcode.TMPFILE):
        result = (_fit(S.EntryOut, result[0], reply_struct_size(S.EntryOut, minor)), result[1])
    return ReplyExample(req, result, minor=minor)


def exchanges(opcodes: list[Opcode] | None = None, *, minor: int = C.KERNEL_MINOR_VERSION,
              flags: int | None = None) -> st.SearchStrategy[
                  tuple[RequestExample, ReplyExample | None]]:
    """A valid request and a valid reply to it (None where the opcode gets no reply)."""
    return requests(opcodes, minor=minor, flags=flags).flatmap(
        lambda req: st.tuples(st.just(req), _reply(req)))


def reply_bytes(*, minor: int = C.KERNEL_MINOR_VERSION,
                malformed: bool = False) -> st.SearchStrategy[tuple[Request, bytes]]:
    """(the decoded request, encoded reply bytes) (``malformed``: broken replies)."""
    pairs = exchanges(minor=minor).filter(lambda p: p[1] is not None)

    def encoded(p: tuple[RequestExample, ReplyExample | None]) -> tuple[Request, bytes]:
        assert p[1] is not None
        return p[0].decode(), p[1].encode()

    valid = pairs.map(encoded)
    if not malformed:
        return valid
    return valid.flatmap(lambda rb: st.tuples(
        st.just(rb[0]), _breakers(st.just(rb[1]), header_len_at=0, header_len_fmt="<I")))


# --------------------------------------------------------------------------------------------
# Notifications


@dataclass(frozen=True)
class NotifyExample:
    """The inputs of ``encode_notify``."""

    code: NotifyCode
    arg: Any = None
    name: bytes = b""
    data: bytes = b""
    nodeids: tuple[int, ...] = ()

    def encode(self) -> bytes:
        """The notification bytes."""
        return encode_notify(self.code, self.arg, self.name, self.data, self.nodeids)


@st.composite
def _notification(draw: st.DrawFn, code: NotifyCode) -> NotifyExample:
    row = NOTIFICATIONS[code]
    arg = draw(structs(row.struct, zero_reserved=True)) if row.struct is not None else None
    name = data = b""
    nodeids: tuple[int, ...] = ()
    if row.struct is None:
        return NotifyExample(code)
    assert arg is not None
    if row.name:
        name = draw(file_names())
        arg = arg._replace(namelen=len(name))
    if row.data:
        data = draw(st.binary(max_size=256))
        arg = arg._replace(size=len(data))
    if row.nodeids:
        nodeids = tuple(draw(st.lists(_U64, max_size=8)))
        arg = arg._replace(count=len(nodeids))
    return NotifyExample(code, arg, name, data, nodeids)


def notifications(codes: list[NotifyCode] | None = None) -> st.SearchStrategy[NotifyExample]:
    """Valid notifications for ``codes`` (default: every one)."""
    return st.sampled_from(codes or list(NOTIFICATIONS)).flatmap(_notification)


def notify_bytes(*, malformed: bool = False) -> st.SearchStrategy[bytes]:
    """Encoded notifications (``malformed``: broken ones)."""
    valid = notifications().map(lambda n: n.encode())
    if not malformed:
        return valid
    return _breakers(valid, header_len_at=0, header_len_fmt="<I", names_from=16)


# --------------------------------------------------------------------------------------------
# Breaking messages


def _set_u32(buf: bytes, at: int, fmt: str, value: int) -> bytes:
    if len(buf) < at + 4:
        return buf
    return buf[:at] + struct.pack(fmt, value & 0xFFFFFFFF) + buf[at + 4:]


@st.composite
def _broken(draw: st.DrawFn, valid: bytes, header_len_at: int | None, header_len_fmt: str,
            names_from: int | None) -> bytes:
    how = draw(st.sampled_from(["truncate", "extend", "len", "mutate", "nul", "random",
                                "u32"]))
    buf = valid
    if how == "truncate" and buf:
        buf = buf[:draw(st.integers(0, len(buf) - 1))]
        if header_len_at is not None and draw(st.booleans()):
            buf = _set_u32(buf, header_len_at, header_len_fmt, len(buf))  # len follows the cut
    elif how == "extend":
        buf = buf + draw(st.binary(min_size=1, max_size=32))
        if header_len_at is not None and draw(st.booleans()):
            buf = _set_u32(buf, header_len_at, header_len_fmt, len(buf))
    elif how == "len" and header_len_at is not None:
        buf = _set_u32(buf, header_len_at, header_len_fmt,
                       draw(st.one_of(st.integers(0, len(buf) + 64), _U32)))
    elif how == "nul" and names_from is not None and len(buf) > names_from:
        # Names without their terminator, or NULs where names should be.
        at = draw(st.integers(names_from, len(buf) - 1))
        byte = b"/" if buf[at] == 0 else b"\0"
        buf = buf[:at] + byte + buf[at + 1:]
    elif how == "u32" and len(buf) >= 4:
        # Rewrite one aligned 32-bit word: counts, sizes, namelen, opcode, total_extlen.
        at = draw(st.integers(0, len(buf) // 4 - 1)) * 4
        buf = _set_u32(buf, at, "<I", draw(st.one_of(
            st.sampled_from([0, 1, 7, 8, 0xFFFF, 0xFFFFFFFF, len(buf)]), _U32)))
    elif how == "random":
        buf = draw(st.binary(max_size=len(buf) + 64))
    else:
        flips = draw(st.lists(st.tuples(st.integers(0, max(len(buf) - 1, 0)),
                                        st.integers(1, 255)), min_size=1, max_size=4))
        out = bytearray(buf)
        for at, xor in flips:
            if at < len(out):
                out[at] ^= xor
        buf = bytes(out)
    return buf


def _breakers(valid: st.SearchStrategy[bytes], *, header_len_at: int | None,
              header_len_fmt: str, names_from: int | None = None) -> st.SearchStrategy[bytes]:
    return valid.flatmap(lambda v: _broken(v, header_len_at, header_len_fmt, names_from))


def malformed_bytes(kind: str) -> st.SearchStrategy[Any]:
    """Broken messages of ``kind``: "request", "reply", "notify", "dirent", "direntplus",
    "extension"."""
    table: dict[str, Any] = {
        "request": lambda: request_bytes(malformed=True),
        "reply": lambda: reply_bytes(malformed=True),
        "notify": lambda: notify_bytes(malformed=True),
        "dirent": lambda: dirent_bytes(False, malformed=True),
        "direntplus": lambda: dirent_bytes(True, malformed=True),
        "extension": lambda: extension_bytes(malformed=True),
    }
    return table[kind]()  # type: ignore[no-any-return]

