"""Notifications: unsolicited server -> kernel messages (``unique = 0``, ``error = code``)."""

from __future__ import annotations

import errno
import struct
from typing import Any, NamedTuple

from ..errors import LocalProtocolError, ProtocolError
from . import structs as S
from .constants import NotifyCode
from .opcodes import NOTIFICATIONS
from .schema import codec

_OUT = codec(S.OutHeader)


class Notification(NamedTuple):
    """A decoded notification."""

    code: NotifyCode
    arg: Any
    """The code's struct (NotifyInvalEntryOut, …) or None (RESEND, INC_EPOCH)."""
    name: bytes = b""
    data: bytes = b""
    """STORE data."""
    nodeids: tuple[int, ...] = ()
    """PRUNE node ids."""


def encode_notify(code: NotifyCode, arg: Any = None, name: bytes = b"", data: bytes = b"",
                  nodeids: tuple[int, ...] = ()) -> bytes:
    """Build a notification.  Lengths inside ``arg`` (namelen, size, count) are checked."""
    row = NOTIFICATIONS[code]
    body = b""
    if row.struct is not None:
        if not isinstance(arg, row.struct):
            raise LocalProtocolError(f"{code.name} needs a {row.struct.__name__}")
        body = codec(row.struct).pack(arg)
    if row.name:
        if arg.namelen != len(name) or b"\0" in name:
            raise LocalProtocolError("namelen must equal len(name), without NUL")
        body += name + b"\0"
    elif name:
        raise LocalProtocolError(f"{code.name} carries no name")
    if row.data:
        if arg.size != len(data):
            raise LocalProtocolError("size must equal len(data)")
        body += data
    if row.nodeids:
        if arg.count != len(nodeids):
            raise LocalProtocolError("count must equal len(nodeids)")
        body += struct.pack(f"<{len(nodeids)}Q", *nodeids)
    return _OUT.pack(S.OutHeader(_OUT.size + len(body), int(code), 0)) + body


def decode_notify(buf: bytes | memoryview) -> Notification:
    """Parse a notification; ``ProtocolError`` on anything malformed."""
    view = memoryview(buf)
    if len(view) < _OUT.size:
        raise ProtocolError("notification shorter than out_header", field="len", offset=0)
    header = _OUT.unpack(view)
    if header.len != len(view) or header.unique != 0:
        raise ProtocolError("not a notification (len or unique)", field="len", offset=0)
    try:
        code = NotifyCode(header.error)
    except ValueError:
        raise ProtocolError(f"unknown notify code {header.error}", field="error", offset=4,
                            errno=errno.EINVAL) from None
    row = NOTIFICATIONS[code]
    pos = _OUT.size
    arg: Any = None
    if row.struct is not None:
        c = codec(row.struct)
        if len(view) - pos < c.size:
            raise ProtocolError(f"{code.name} truncated", field=row.struct.__name__, offset=pos)
        arg = c.unpack(view, pos)
        pos += c.size
    name = data = b""
    nodeids: tuple[int, ...] = ()
    if row.name:
        if len(view) - pos != arg.namelen + 1 or view[pos + arg.namelen] != 0:
            raise ProtocolError(f"{code.name} name length mismatch", field="namelen", offset=pos)
        name = bytes(view[pos:pos + arg.namelen])
        if b"\0" in name:
            # encode_notify refuses it too: a name is namelen bytes, the NUL only ends it.
            raise ProtocolError(f"{code.name} name has an interior NUL", field="name",
                                offset=pos)
        pos = len(view)
    if row.data:
        if len(view) - pos != arg.size:
            raise ProtocolError(f"{code.name} size mismatch", field="size", offset=pos)
        data = bytes(view[pos:])
        pos = len(view)
    if row.nodeids:
        if len(view) - pos != 8 * arg.count:
            raise ProtocolError("PRUNE count mismatch", field="count", offset=pos)
        nodeids = struct.unpack_from(f"<{arg.count}Q", view, pos)
        pos = len(view)
    if pos != len(view):
        raise ProtocolError(f"{code.name} has trailing bytes", field="len", offset=pos)
    return Notification(code, arg, name, data, nodeids)
