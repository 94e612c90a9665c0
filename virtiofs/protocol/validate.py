"""The reply validator: what the kernel does with a reply, as checks (SECURITY.md B5).

``validate_reply(request, reply)`` raises ``ProtocolError`` for every reply the Linux kernel
would refuse (write fails EINVAL/ENOENT, request fails EIO, inode made bad) or silently
mangle (a truncated trailing dirent is dropped), and returns the decoded ``Reply`` otherwise.
A server runs it on what it builds (tests, debug mode); a driver-side client runs it on every
reply it receives (SECURITY.md B2 "driver side: hostile device").

Sources, per check: ``fs/fuse/dev.c`` (``fuse_dev_do_write``: header length, errno range,
unique, interrupt replies; ``copy_out_args``: sizes, ``out_argvar``), ``fs/fuse/dir.c``
(``fuse_invalid_attr``, ``invalid_nodeid``, ``create_new_entry`` type check, root generation),
``fs/fuse/readdir.c`` (dirent names), ``fs/fuse/file.c`` (write_out.size), ``fs/fuse/xattr.c``
(``fuse_verify_xattr_list``), ``fs/fuse/virtio_fs.c`` 68b69fa0edb2 (len/unique checks).
"""

from __future__ import annotations

import errno as E
import stat
from collections.abc import Sequence
from typing import Any

from ..errors import ProtocolError
from . import constants as C
from . import structs as S
from .codec import Buffer, Reply, Request, decode_reply
from .constants import InitFlags, Opcode
from .dirents import decode_dirents
from .schema import sizeof

_FILE_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                         stat.S_IFIFO, stat.S_IFSOCK})
_LLONG_MAX = (1 << 63) - 1
_ENTRY_OPS = frozenset({Opcode.LOOKUP, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK,
                        Opcode.CREATE, Opcode.TMPFILE})
# create_new_entry / fuse_create_open: a new inode of the type that was asked for.
_CREATED_TYPE = {Opcode.MKDIR: stat.S_IFDIR, Opcode.SYMLINK: stat.S_IFLNK,
                 Opcode.CREATE: stat.S_IFREG, Opcode.TMPFILE: stat.S_IFREG}
_OUT_SIZE = sizeof(S.OutHeader)


def _fail(what: str, request: Request, field: str, offset: int | None = None,
          errno: int = E.EIO) -> ProtocolError:
    return ProtocolError(what, opcode=request.spec.opcode, field=field, offset=offset,
                         errno=errno)


def validate_reply(request: Request, reply: Buffer | Sequence[Buffer], *,
                   minor: int = C.KERNEL_MINOR_VERSION, flags: int = 0) -> Reply:
    """Check ``reply`` (bytes or a gather list) as the kernel would check it for ``request``.

    ``minor``/``flags`` are the negotiated version and INIT flags.  Returns the decoded reply;
    raises ``ProtocolError`` (``errno`` = what the kernel answers the caller: EINVAL for a
    write it refuses, EIO for a request it fails) naming the broken rule.
    """
    raw = reply if isinstance(reply, bytes | bytearray | memoryview) else b"".join(reply)
    spec = request.spec
    op = spec.opcode
    if len(raw) < _OUT_SIZE:
        raise _fail(f"reply of {len(raw)} bytes, shorter than out_header", request, "len", 0,
                    E.EINVAL)
    if op in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.NOTIFY_REPLY):
        raise _fail(f"{op.name} must not be answered", request, "unique", 8, E.ENOENT)
    if op is Opcode.INIT:
        minor = min(minor, request.arg.minor) if request.arg is not None else minor
    xattr_size = request.arg.size if op in (Opcode.GETXATTR, Opcode.LISTXATTR) else None
    decoded = decode_reply(op, raw, minor=minor, xattr_size=xattr_size)
    header = decoded.header
    if header.unique != request.unique:
        # fuse_dev_do_write: request_find fails -> the write gets ENOENT (and unique 0 would be
        # read as a notification).
        raise _fail(f"reply unique {header.unique:#x} != request {request.unique:#x}", request,
                    "unique", 8, E.ENOENT)
    if op is Opcode.INTERRUPT:
        if not header.error:
            raise _fail("an INTERRUPT is answered only with an error (EAGAIN/ENOSYS)",
                        request, "error", 4, E.EINVAL)
        return decoded
    if header.error:
        return decoded
    _check_body(request, decoded, minor, flags)
    return decoded


def _check_body(request: Request, reply: Reply, minor: int, flags: int) -> None:
    op = request.spec.opcode
    arg = request.arg
    parts = reply.parts
    if op in _ENTRY_OPS:
        _check_entry(request, parts[0])
    elif op in (Opcode.GETATTR, Opcode.SETATTR):
        _check_attr(request, parts[0].attr, "attr")
    elif op in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS):
        data = parts[0]
        if len(data) > arg.size:
            raise _fail(f"{len(data)} bytes for a request of {arg.size}", request, "len")
        if op is not Opcode.READ:
            plus = op is Opcode.READDIRPLUS
            for entry in decode_dirents(data, plus, strict=True):
                if plus and entry.entry is not None and entry.entry.nodeid:
                    _check_attr(request, entry.entry.attr, "dirent.attr")
    elif op is Opcode.WRITE:
        if parts[0].size > arg.size:
            # fuse_perform_write / fuse_send_write: "if (res > count) return -EIO".
            raise _fail(f"write_out.size {parts[0].size} > requested {arg.size}", request,
                        "size")
    elif op is Opcode.COPY_FILE_RANGE:
        if parts[0].size > arg.len:
            raise _fail(f"copied {parts[0].size} > requested {arg.len}", request, "size")
    elif op is Opcode.COPY_FILE_RANGE_64:
        if parts[0].bytes_copied > arg.len:
            raise _fail(f"copied {parts[0].bytes_copied} > requested {arg.len}", request,
                        "bytes_copied")
    elif op in (Opcode.GETXATTR, Opcode.LISTXATTR) and arg.size:
        data = parts[0]
        if len(data) > arg.size:
            raise _fail(f"{len(data)} xattr bytes for a buffer of {arg.size}", request, "len",
                        errno=E.ERANGE)
        if op is Opcode.LISTXATTR and data:
            # fuse_verify_xattr_list: every name non-empty and NUL-terminated.
            if not data.endswith(b"\0") or b"\0\0" in data or data.startswith(b"\0"):
                raise _fail("xattr list is not NUL-terminated non-empty names", request,
                            "names")
    elif op is Opcode.IOCTL:
        data = parts[1]
        if len(data) > arg.out_size:
            raise _fail(f"{len(data)} ioctl bytes for out_size {arg.out_size}", request, "len")
    elif op is Opcode.INIT:
        _check_init(request, parts[0])


def _check_attr(request: Request, attr: S.Attr, field: str) -> None:
    # fs/fuse/fuse_i.h fuse_invalid_attr: a file type Linux does not know, or a size past
    # LLONG_MAX, fails the request with EIO.
    if stat.S_IFMT(attr.mode) not in _FILE_TYPES:
        raise _fail(f"attr.mode {attr.mode:#o} has no valid file type", request,
                    f"{field}.mode")
    if attr.size > _LLONG_MAX:
        raise _fail(f"attr.size {attr.size} > LLONG_MAX", request, f"{field}.size")


def _check_entry(request: Request, entry: S.EntryOut) -> None:
    op = request.spec.opcode
    if op is Opcode.LOOKUP and entry.nodeid == 0:
        return  # a negative entry, cached for entry_valid
    if op is not Opcode.LOOKUP and entry.nodeid in (0, C.ROOT_ID):
        # invalid_nodeid(): a new entry can be neither "none" nor the root.
        raise _fail(f"{op.name} returned nodeid {entry.nodeid}", request, "nodeid")
    if op is Opcode.LOOKUP and entry.nodeid == C.ROOT_ID and entry.generation != 0:
        # fuse_lookup_name forces it to 0 with a warning (15db16837a35): never send it.
        raise _fail("root entry with a non-zero generation", request, "generation")
    _check_attr(request, entry.attr, "attr")
    want = _CREATED_TYPE.get(op)
    if op is Opcode.MKNOD:
        # A type of 0 is a regular file (mknod(2); the VFS turns it into S_IFREG before any
        # filesystem sees it, and MemoryFS/PassthroughFS do the same for a raw MKNOD).
        want = stat.S_IFMT(request.arg.mode) or stat.S_IFREG
    if want is not None and stat.S_IFMT(entry.attr.mode) != want:
        raise _fail(f"{op.name} returned file type {stat.S_IFMT(entry.attr.mode):#o}, "
                    f"asked for {want:#o}", request, "attr.mode")


def _check_init(request: Request, out: Any) -> None:
    if request.arg is not None and request.arg.major == C.KERNEL_VERSION \
            and out.major != C.KERNEL_VERSION:
        # process_init_reply: a wrong major marks the connection failed (ECONNREFUSED later).
        raise _fail(f"INIT reply major {out.major}", request, "major")
    answered = out.flags | (out.flags2 << 32 if out.flags & InitFlags.INIT_EXT else 0)
    if answered & InitFlags.MAP_ALIGNMENT and out.map_alignment > C.DAX_SHIFT:
        # fuse_dax_check_alignment refuses alignments above the 2 MiB ranges it maps.
        raise _fail(f"map_alignment {out.map_alignment} > {C.DAX_SHIFT}", request,
                    "map_alignment")
