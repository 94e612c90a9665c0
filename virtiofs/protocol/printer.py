"""Readable one-line renderings of FUSE messages, driven by the opcode table (go-fuse print.go).

``format_request(req)``, ``format_reply(opcode, reply)``, ``format_notify(note)`` render one
message; ``CaptureDecoder`` follows a whole exchange (a capture file or a request stream):
it pairs replies with their requests by ``unique``, learns the negotiated minor and flags from
INIT, and renders every record, malformed ones included (``!`` lines), without ever raising
on what it reads.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import ProtocolError
from . import constants as C
from . import structs as S
from .capturefile import Direction, Record, decode_capture
from .codec import Reply, Request, decode_reply, decode_request
from .constants import InitFlags, Opcode
from .dirents import decode_dirents
from .notify import Notification, decode_notify
from .opcodes import BY_NUMBER
from .schema import codec

_OUT = codec(S.OutHeader)

_FLAG_FIELDS: dict[tuple[type[Any], str], type[enum.IntFlag]] = {
    (S.SetattrIn, "valid"): C.SetattrValid,
    (S.OpenOut, "open_flags"): C.OpenFlags,
    (S.Attr, "flags"): C.AttrFlags,
    (S.ReleaseIn, "release_flags"): C.ReleaseFlags,
    (S.GetattrIn, "getattr_flags"): C.GetattrFlags,
    (S.WriteIn, "write_flags"): C.WriteFlags,
    (S.ReadIn, "read_flags"): C.ReadFlags,
    (S.IoctlIn, "flags"): C.IoctlFlags,
    (S.FsyncIn, "fsync_flags"): C.FsyncFlags,
    (S.LkIn, "lk_flags"): C.LkFlags,
    (S.PollIn, "flags"): C.PollFlags,
    (S.SetupMappingIn, "flags"): C.SetupMappingFlags,
    (S.Rename2In, "flags"): C.RenameFlags,
}
_OCTAL = {"mode", "umask"}
_RESERVED = ("padding", "dummy", "unused", "spare", "reserved")
_DATA_SHOWN = 24


def _flag_names(kind: type[enum.IntFlag], value: int) -> str:
    names = [m.name for m in kind if m.value & value and m.name]
    rest = value & ~sum(m.value for m in kind)
    if rest:
        names.append(hex(rest))
    return "|".join(names) if names else "0"


def format_struct(value: Any) -> str:
    """``Name{field=value …}``; reserved all-zero fields are left out."""
    if value is None:
        return ""
    cls = type(value)
    parts = []
    for name, field in zip(value._fields, value, strict=True):
        if name.startswith(_RESERVED) and not field:
            continue
        if isinstance(field, bytes):
            if not any(field):
                continue
            text = _bytes(field)
        elif isinstance(field, tuple) and hasattr(field, "_fields"):
            text = format_struct(field)
        elif (cls, name) in _FLAG_FIELDS and field:
            text = _flag_names(_FLAG_FIELDS[(cls, name)], field)
        elif name in _OCTAL:
            text = oct(field)
        elif name in ("flags", "flags2") and cls in (S.InitIn, S.InitOut) and field:
            text = _flag_names(InitFlags, field if name == "flags" else field << 32)
        else:
            text = str(field)
        parts.append(f"{name}={text}")
    return f"{cls.__name__}{{{' '.join(parts)}}}"


def _bytes(data: bytes | memoryview) -> str:
    raw = bytes(data[:_DATA_SHOWN])
    more = f"…+{len(data) - _DATA_SHOWN}" if len(data) > _DATA_SHOWN else ""
    return repr(raw) + more


def format_request(req: Request) -> str:
    """One line: opcode, unique, nodeid, caller, then the decoded arguments."""
    h = req.header
    out = [f"-> {req.spec.name} unique={h.unique:#x} nodeid={h.nodeid} "
           f"uid={h.uid} gid={h.gid} pid={h.pid}"]
    if req.arg is not None:
        out.append(format_struct(req.arg))
    if req.names:
        out.append("names=" + ",".join(repr(n) for n in req.names))
    if req.spec.data:
        out.append(f"data[{len(req.data)}]={_bytes(req.data)}")
    if req.items:
        out.append(f"items[{len(req.items)}]=" + ",".join(format_struct(i) for i in req.items[:4])
                   + ("…" if len(req.items) > 4 else ""))
    if req.ext:
        out.append(f"ext={list(req.ext)!r}")
    return " ".join(out)


def format_reply(opcode: Opcode | None, reply: Reply) -> str:
    """One line: the errno or the decoded reply parts (dirents listed by name)."""
    name = opcode.name if opcode is not None else "?"
    head = f"<- {name} unique={reply.unique:#x} len={reply.header.len}"
    if reply.error:
        return f"{head} error=-{reply.error} ({_errno_name(reply.error)})"
    parts = []
    for part in reply.parts:
        if isinstance(part, bytes):
            if opcode in (Opcode.READDIR, Opcode.READDIRPLUS):
                parts.append(_dirents(part, opcode is Opcode.READDIRPLUS))
            else:
                parts.append(f"data[{len(part)}]={_bytes(part)}")
        else:
            parts.append(format_struct(part))
    return " ".join([head, *parts])


def _dirents(data: bytes, plus: bool) -> str:
    try:
        entries = decode_dirents(data, plus)
    except ProtocolError as exc:
        return f"dirents[{len(data)}] malformed: {exc}"
    names = ",".join(f"{e.name.decode(errors='replace')}@{e.offset}" for e in entries)
    return f"dirents[{len(entries)}]={names}"


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, "?")


def format_notify(note: Notification) -> str:
    """One line for a notification (server -> kernel)."""
    out = [f"<= NOTIFY_{note.code.name}", format_struct(note.arg)]
    if note.name:
        out.append(f"name={note.name!r}")
    if note.data:
        out.append(f"data[{len(note.data)}]={_bytes(note.data)}")
    if note.nodeids:
        out.append(f"nodeids={list(note.nodeids)}")
    return " ".join(p for p in out if p)


class CaptureDecoder:
    """Renders a sequence of captured records, one line each, tracking the connection state."""

    def __init__(self) -> None:
        self.minor = C.KERNEL_MINOR_VERSION
        self.flags = 0
        self.pending: dict[int, Request] = {}

    def feed(self, record: Record) -> str:
        """The line for one record; malformed input gives a ``!`` line, never an exception."""
        try:
            if record.direction is Direction.REQUEST:
                return self._request(record.data)
            if record.direction is Direction.NOTIFY:
                return format_notify(decode_notify(record.data))
            line = self._reply(record.data)
            if record.direction is Direction.REFUSED:
                line += "  [refused by the kernel]"
            return line
        except ProtocolError as exc:
            return f"!  {record.direction.name.lower()} of {len(record.data)} bytes: {exc}"

    def _request(self, data: bytes) -> str:
        note = ""
        try:
            req = decode_request(data, minor=self.minor, flags=self.flags)
        except ProtocolError:
            # A bare request stream has no INIT reply to say whether SETXATTR_EXT was
            # negotiated: the SETXATTR struct size is then a guess, so try the other one.
            if len(data) < 8 or int.from_bytes(data[4:8], "little") != Opcode.SETXATTR:
                raise
            other = self.flags ^ InitFlags.SETXATTR_EXT
            req = decode_request(data, minor=self.minor, flags=other)
            note = "  [SETXATTR_EXT assumed " + ("on]" if other & InitFlags.SETXATTR_EXT
                                                 else "off]")
        if not req.spec.no_reply or req.opcode is Opcode.INTERRUPT:
            self.pending[req.unique] = req
        return format_request(req) + note

    def _reply(self, data: bytes) -> str:
        unique = int.from_bytes(data[8:16], "little") if len(data) >= 16 else 0
        req = self.pending.pop(unique, None)
        if req is None:
            # A reply to nothing we saw: the header is all that can be read.
            if len(data) < _OUT.size:
                raise ProtocolError(f"reply of {len(data)} bytes", field="len", offset=0)
            h = _OUT.unpack(data)
            return (f"<- ? unique={h.unique:#x} len={h.len} error={h.error} "
                    f"body[{len(data) - _OUT.size}] (no such request)")
        minor = self.minor
        if req.opcode is Opcode.INIT:
            minor = min(req.arg.minor, C.KERNEL_MINOR_VERSION)
        xattr = req.arg.size if req.opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) else None
        reply = decode_reply(req.opcode, data, minor=minor, xattr_size=xattr)
        if req.opcode is Opcode.INIT and not reply.error:
            out = reply.value
            self.minor = min(req.arg.minor, out.minor)
            self.flags = out.flags | (out.flags2 << 32 if out.flags & InitFlags.INIT_EXT else 0)
        return format_reply(req.opcode, reply)

    def lines(self, records: Iterable[Record]) -> Iterator[str]:
        """The lines of ``records`` in order."""
        for record in records:
            yield self.feed(record)


def format_capture(blob: bytes) -> Iterator[str]:
    """Every line of a capture file or raw request stream (a broken frame ends it with ``!``)."""
    decoder = CaptureDecoder()
    records = decode_capture(blob)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except ProtocolError as exc:
            yield f"!  capture framing: {exc}"
            return
        yield decoder.feed(record)


def opcode_name(number: int) -> str:
    """The table's name for an opcode number, or ``OPCODE_<n>``."""
    spec = BY_NUMBER.get(number)
    return spec.name if spec is not None else f"OPCODE_{number}"
