"""The FUSE wire protocol (uapi fuse.h 7.45), sans-I/O: bytes in, typed messages out.

- ``structs``: every struct as a typed ``NamedTuple``; ``schema.schema(cls)`` is its construct
  ``Struct`` (the source of truth) and ``schema.codec(cls)`` the struct fast path derived from it.
- ``OPCODES``: the one table (keyed by ``Opcode``) that drives parsing, building and dispatch.
- ``decode_request``/``encode_request``, ``decode_reply``/``encode_reply``/``encode_error``,
  ``encode_notify``/``decode_notify``, dirents, extensions.
"""

from . import constants, structs
from .codec import (
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_reply_parts,
    encode_request,
    encode_request_parts,
)
from .constants import (
    KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
    ROOT_ID,
    AttrFlags,
    InitFlags,
    NotifyCode,
    Opcode,
    OpenFlags,
    SetattrValid,
)
from .dirents import (
    DirEntry,
    decode_dirents,
    dirent_size,
    encode_dirents,
    pack_dirent,
    pack_direntplus,
)
from .extensions import Extension, SecurityContext, SupplementaryGroups, UnknownExtension
from .notify import Notification, decode_notify, encode_notify
from .opcodes import DATA, NOTIFICATIONS, OPCODES, XATTR, OpSpec, reply_struct_size
from .schema import codec, schema, sizeof

__all__ = [
    "AttrFlags", "DATA", "DirEntry", "Extension", "InitFlags", "KERNEL_MINOR_VERSION",
    "KERNEL_VERSION", "NOTIFICATIONS", "Notification", "NotifyCode", "OPCODES", "OpSpec",
    "Opcode", "OpenFlags", "ROOT_ID", "Reply", "Request", "SecurityContext", "SetattrValid",
    "SupplementaryGroups", "UnknownExtension", "XATTR", "codec", "constants", "decode_dirents",
    "decode_notify", "decode_reply", "decode_request", "dirent_size", "encode_dirents",
    "encode_error", "encode_notify", "encode_reply", "encode_reply_parts", "encode_request",
    "encode_request_parts", "pack_dirent", "pack_direntplus", "reply_struct_size", "schema",
    "sizeof", "structs",
]
