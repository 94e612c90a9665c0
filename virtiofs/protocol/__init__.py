"""The FUSE wire protocol (uapi fuse.h 7.45), sans-I/O: bytes in, typed messages out.

- ``structs``: every struct as a typed ``NamedTuple``; ``schema.schema(cls)`` is its construct
  ``Struct`` (the source of truth) and ``schema.codec(cls)`` the struct fast path derived from it.
- ``OPCODES``: the one table (keyed by ``Opcode``) that drives parsing, building and dispatch.
- ``decode_request``/``encode_request``, ``decode_reply``/``encode_reply``/``encode_error``,
  ``encode_notify``/``decode_notify``, dirents, extensions.
- ``validate_reply``: the kernel's rules for replies (SECURITY.md B5), for tests and clients.
- ``printer.format_message``: one readable line per message (``virtiofs decode``).
- ``virtiofs.protocol.strategies`` (not imported here: needs hypothesis) has Hypothesis
  strategies for every message, valid and malformed.
"""

from . import constants, structs
from .codec import (
    Reply,
    Request,
    decode_reply,
    decode_request,
    decoder_for,
    encode_error,
    encode_reply,
    encode_reply_parts,
    encode_request,
    encode_request_parts,
    init_in_size,
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
from .opcodes import BY_NUMBER, DATA, NOTIFICATIONS, OPCODES, XATTR, OpSpec, reply_struct_size
from .schema import codec, schema, sizeof
from .validate import validate_reply

__all__ = [
    "AttrFlags", "BY_NUMBER", "DATA", "DirEntry", "Extension", "InitFlags", "KERNEL_MINOR_VERSION",
    "KERNEL_VERSION", "NOTIFICATIONS", "Notification", "NotifyCode", "OPCODES", "OpSpec",
    "Opcode", "OpenFlags", "ROOT_ID", "Reply", "Request", "SecurityContext", "SetattrValid",
    "SupplementaryGroups", "UnknownExtension", "XATTR", "codec", "constants", "decode_dirents",
    "decode_notify", "decode_reply", "decode_request", "decoder_for", "dirent_size", "encode_dirents",
    "encode_error", "encode_notify", "encode_reply", "encode_reply_parts", "encode_request",
    "encode_request_parts", "init_in_size", "pack_dirent", "pack_direntplus", "reply_struct_size", "schema",
    "sizeof", "structs", "validate_reply",
]
