"""The sans-I/O FUSE session: request bytes in, one reply gather list out.

``Session(fs).handle(request)`` decodes one request, calls the matching ``Filesystem`` method and
returns the reply as a list of buffers (``os.writev``-ready), or ``None`` for requests that get no
reply (FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY).  It never touches a file descriptor: the
/dev/fuse loop, the vhost-user queue workers and the user-space driver are thin loops around it
(h11's model, STYLE.md point 1).

Guarantees, whatever the filesystem does (SECURITY.md B5, DESIGN.md "Errors"):

- exactly one reply per request that gets one, none for the others;
- the reply's ``unique`` is the request's and its ``len`` is the number of bytes in the list;
- its ``error`` is 0 or ``-errno`` with errno in (0, 512): a ``FuseError`` with another errno, any
  other exception, a result of the wrong type or an oversized result becomes ``-EIO`` (logged);
- a request that cannot be decoded is answered with the decoder's errno when its header is
  readable, and dropped (logged) when it is not.

INIT is negotiated as libfuse's ``do_init`` does it: EPROTO for major < 7, our version back for a
major > 7 (the kernel then sends a new INIT), ``min(minor)`` otherwise, flags = the kernel's offer
AND ``fs.init_flags``, a reply sized for the kernel's minor.  Every request before INIT, and a
second INIT, is answered EIO.

Decoding and encoding are the protocol layer's (``decoder_for`` fixed to the negotiated
minor and flags, ``encode_reply_parts``), both driven by ``OPCODES``.  At INIT the dispatch
table gets one *runner* per opcode: a closure with the ``Filesystem`` method (or the adapter
that unpacks the request into its arguments) and the reply encoder bound once.  The
per-request work here is one dict lookup, one lazy ``Context`` (a slot; fields are read from
the in_header only if the handler asks) and the call; benchmarks/devfuse.py ``micro``
measures ``handle`` per opcode.
"""

from __future__ import annotations

import dataclasses
import errno as E
import itertools
import logging
import struct
import sys
import threading
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

from ..errors import FuseError, LocalProtocolError, ProtocolError
from ..protocol import constants as C
from ..protocol import structs as S
from ..protocol.codec import Request, decoder_for, encode_reply_parts
from ..protocol.constants import (
    FsyncFlags,
    GetattrFlags,
    InitFlags,
    NotifyCode,
    NotifyInvalEntryFlags,
    Opcode,
)
from ..protocol.dirents import DirEntry, pack_dirent, pack_direntplus
from ..protocol.extensions import SecurityContext, SupplementaryGroups
from ..protocol.notify import encode_notify
from ..protocol.opcodes import BY_NUMBER, OPCODES, OpSpec
from ..protocol.schema import codec
from .filesystem import ConnectionInfo, Context, Filesystem

__all__ = ["Session", "Buffer", "ReplyParts", "DEFAULT_MAX_WRITE", "DEFAULT_MAX_READAHEAD",
           "read_buffer_size"]

log = logging.getLogger("virtiofs.session")

Buffer = bytes | bytearray | memoryview
ReplyParts = list[Buffer]

PAGE_SIZE = 4096
DEFAULT_MAX_WRITE = 1 << 20
"""1 MiB = the kernel's default ``fuse_max_pages_limit`` (256 pages): fewest round trips."""
DEFAULT_MAX_READAHEAD = 1 << 20
_MIN_MAX_WRITE = PAGE_SIZE
# The kernel caps COPY_FILE_RANGE (the u32-reply opcode) at UINT_MAX & PAGE_MASK per call.
_COPY_FILE_RANGE_32_MAX = 0xFFFFF000
_XATTR_SIZE_MAX = 1 << 16
_READ_MAX = 1 << 25
# Interrupts whose request is not (yet) in flight are remembered, boundedly: the request may
# still be queued in a worker pool; uniques are never reused, so a stale entry is harmless.
_MAX_PENDING_INTERRUPTS = 1024

_IN = codec(S.InHeader)
_IN_SIZE = _IN.size
_prefix = struct.Struct("<IIQ").unpack_from
"""len, opcode, unique: what an error reply needs from a header that did not decode."""
_OUT_SIZE = codec(S.OutHeader).size
_out_pack = struct.Struct(codec(S.OutHeader).format).pack
# Plain ints: an IntFlag ``&`` costs microseconds (enum construction) on the hot path.
_GETATTR_FH = int(GetattrFlags.FH)
_FDATASYNC = int(FsyncFlags.FDATASYNC)

# A Context is built for every request: a frozen dataclass's __init__ costs ~1.4 µs here
# (object.__setattr__ per field), filling its __dict__ directly ~0.6 µs, the lazy
# _RequestContext below ~0.15 µs.
_new_object = object.__new__
_CONTEXT_FIELDS = ("uid", "gid", "pid", "umask", "groups", "security_context", "unique",
                   "interrupts")
if tuple(f.name for f in dataclasses.fields(Context)) != _CONTEXT_FIELDS:  # pragma: no cover
    raise AssertionError("Context changed: update the session's fast Context construction")


def read_buffer_size(max_write: int) -> int:
    """Smallest safe read buffer for a session with ``max_write``.

    A /dev/fuse read needs at least max(8 KiB, in_header + write_in + max_write) (FACTS.md);
    one more page keeps a SETXATTR of XATTR_SIZE_MAX (64 KiB) readable when max_write is small.
    """
    need = max(max_write, _XATTR_SIZE_MAX) + PAGE_SIZE
    return max(C.MIN_READ_BUFFER, need + _IN_SIZE + codec(S.WriteIn).size)


def _as_bytes(value: Any) -> Buffer:
    if type(value) is bytes or type(value) is bytearray:
        result: Buffer = value
        return result
    view = memoryview(value)
    if view.itemsize != 1 or view.ndim != 1:
        view = view.cast("B")
    return view


# --------------------------------------------------------------------------------------------
# Adapters: (fs, ctx, nodeid, request) -> reply result.  One per handler name; the hottest
# opcodes skip them (``_DIRECT`` below calls the Filesystem method from the runner itself).

Adapter = Callable[[Filesystem, Context, int, Request], Any]


def _lookup(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    names = req[3]
    return fs.lookup(ctx, nodeid, names[0])


def _forget(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.forget(((nodeid, arg.nlookup),))


def _batch_forget(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    items = req[5]
    if items:
        fs.forget([(item.nodeid, item.nlookup) for item in items])


def _getattr(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fh = arg.fh if arg is not None and arg.getattr_flags & _GETATTR_FH else None
    return fs.getattr(ctx, nodeid, fh)


def _setattr(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return fs.setattr(ctx, nodeid, arg)


def _readlink(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    return fs.readlink(ctx, nodeid)


def _symlink(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    # fs/fuse/dir.c fuse_symlink: in_args[0] is the new entry's name, in_args[1] the target.
    names = req[3]
    return fs.symlink(ctx, nodeid, names[0], names[1])


def _mknod(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    return fs.mknod(ctx, nodeid, names[0], arg.mode, arg.rdev)


def _mkdir(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    return fs.mkdir(ctx, nodeid, names[0], arg.mode)


def _unlink(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    names = req[3]
    fs.unlink(ctx, nodeid, names[0])


def _rmdir(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    names = req[3]
    fs.rmdir(ctx, nodeid, names[0])


def _rename(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    fs.rename(ctx, nodeid, names[0], arg.newdir, names[1], 0)


def _rename2(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    fs.rename(ctx, nodeid, names[0], arg.newdir, names[1], arg.flags)


def _link(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    return fs.link(ctx, arg.oldnodeid, nodeid, names[0])


def _open(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return fs.open(ctx, nodeid, arg.flags, arg.open_flags)


def _read(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    # The kernel never asks for more than max_pages (<= 1 MiB); a hostile peer's u32 size must
    # not make a filesystem build a 4 GiB reply (a short read just means "ask again").
    arg = req[2]
    size = min(arg.size, _READ_MAX)
    result = _as_bytes(fs.read(ctx, nodeid, arg.fh, arg.offset, size))
    if len(result) > size:
        # The kernel would fail the write with EINVAL and the read with EIO (copy_out_args).
        raise LocalProtocolError(f"read returned {len(result)} bytes for a {arg.size}-byte read")
    return result


def _write(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    data = req[4]
    n = fs.write(ctx, nodeid, arg.fh, arg.offset, data, arg.write_flags)
    if type(n) is not int or not 0 <= n <= arg.size:
        # fs/fuse/file.c: write_out.size > requested fails the write with EIO.
        raise LocalProtocolError(f"write returned {n!r} for a {arg.size}-byte write")
    return S.WriteOut(n)


def _statfs(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    st = fs.statfs(ctx, nodeid)
    return st if isinstance(st, S.StatfsOut) else S.StatfsOut(st)


def _release(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.release(ctx, nodeid, arg)


def _fsync(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.fsync(ctx, nodeid, arg.fh, bool(arg.fsync_flags & _FDATASYNC))


def _setxattr(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    data = req[4]
    fs.setxattr(ctx, nodeid, names[0], data.tobytes(), arg.flags)


def _xattr_reply(value: bytes, size: int) -> Any:
    # fuse_getxattr_in.size == 0 asks for the size only; a value longer than a non-zero size is
    # ERANGE (fs/fuse/xattr.c), answered here so a filesystem only ever returns the value.
    if size == 0:
        return S.GetxattrOut(len(value))
    if len(value) > size:
        raise FuseError(E.ERANGE)
    return value


def _getxattr(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    value = fs.getxattr(ctx, nodeid, names[0])
    return _xattr_reply(bytes(_as_bytes(value)), arg.size)


def _listxattr(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    found = fs.listxattr(ctx, nodeid)
    if isinstance(found, bytes | bytearray):
        raise LocalProtocolError("listxattr must return a sequence of names, not bytes")
    joined = b"".join(bytes(n) + b"\0" for n in found)
    return _xattr_reply(joined, arg.size)


def _removexattr(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    names = req[3]
    fs.removexattr(ctx, nodeid, names[0])


def _flush(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.flush(ctx, nodeid, arg.fh, arg.lock_owner)


def _opendir(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return fs.opendir(ctx, nodeid, arg.flags)


def _close_iter(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _readdir(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    buf = bytearray()
    limit = arg.size
    it = iter(fs.readdir(ctx, nodeid, arg.fh, arg.offset))
    try:
        for entry in it:
            if not pack_dirent(buf, entry, limit):
                break
    finally:
        _close_iter(it)
    return buf


def _readdirplus(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    buf = bytearray()
    limit = arg.size
    taken: list[int] = []
    """Node ids whose lookup reference the kernel will take if this reply reaches it."""
    it: Iterable[DirEntry] = iter(fs.readdirplus(ctx, nodeid, arg.fh, arg.offset))
    try:
        for entry in it:
            ref = entry.entry.nodeid if entry.entry is not None else 0
            if ref:
                taken.append(ref)
            if not pack_direntplus(buf, entry, limit):
                # The entry that did not fit took a lookup reference the kernel never sees.
                if ref:
                    taken.pop()
                    fs.forget(((ref, 1),))
                break
    except BaseException:
        # No entry of a failed reply reaches the kernel: give every reference back.
        if taken:
            fs.forget([(ref, 1) for ref in taken])
        raise
    finally:
        _close_iter(it)
    return buf


def _releasedir(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.releasedir(ctx, nodeid, arg.fh)


def _fsyncdir(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.fsyncdir(ctx, nodeid, arg.fh, bool(arg.fsync_flags & _FDATASYNC))


def _getlk(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    lk = fs.getlk(ctx, nodeid, arg)
    return lk if isinstance(lk, S.LkOut) else S.LkOut(lk)


def _setlk(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    # BSD flock arrives here too, as SETLK/SETLKW with FUSE_LK_FLOCK in lk_flags.
    arg = req[2]
    fs.setlk(ctx, nodeid, arg, False)


def _setlkw(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.setlk(ctx, nodeid, arg, True)


def _access(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.access(ctx, nodeid, arg.mask)


def _create(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    names = req[3]
    return tuple(fs.create(ctx, nodeid, names[0], arg.mode, arg.flags, arg.open_flags))


def _tmpfile(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return tuple(fs.tmpfile(ctx, nodeid, arg.mode, arg.flags, arg.open_flags))


def _bmap(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return S.BmapOut(fs.bmap(ctx, nodeid, arg.block, arg.blocksize))


def _ioctl(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    data = req[4]
    out, payload = fs.ioctl(ctx, nodeid, arg, data)
    body = _as_bytes(payload)
    if len(body) > arg.out_size:
        raise LocalProtocolError(f"ioctl returned {len(body)} bytes, out_size {arg.out_size}")
    return (out, body)


def _poll(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return fs.poll(ctx, nodeid, arg)


def _fallocate(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.fallocate(ctx, nodeid, arg.fh, arg.offset, arg.length, arg.mode)


def _lseek(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return S.LseekOut(fs.lseek(ctx, nodeid, arg.fh, arg.offset, arg.whence))


def _copied(n: Any, limit: int) -> int:
    if type(n) is not int or not 0 <= n <= limit:
        raise LocalProtocolError(f"copy_file_range returned {n!r} for {limit} bytes")
    return n


def _copy_file_range(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    # The 7.28 opcode answers a u32 fuse_write_out: never ask for more than it can carry.
    arg = req[2]
    if arg.len > _COPY_FILE_RANGE_32_MAX:
        arg = arg._replace(len=_COPY_FILE_RANGE_32_MAX)
    return S.WriteOut(_copied(fs.copy_file_range(ctx, nodeid, arg), arg.len))


def _copy_file_range_64(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return S.CopyFileRangeOut(_copied(fs.copy_file_range(ctx, nodeid, arg), arg.len))


def _setupmapping(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    fs.setupmapping(ctx, nodeid, arg)


def _removemapping(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    items = req[5]
    fs.removemapping(ctx, nodeid, items)


def _syncfs(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    fs.syncfs(ctx, nodeid)


def _statx(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    arg = req[2]
    return fs.statx(ctx, nodeid, arg)


def _enosys(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
    raise FuseError(E.ENOSYS)


ADAPTERS: dict[str, Adapter] = {
    "lookup": _lookup, "forget": _forget, "batch_forget": _batch_forget, "getattr": _getattr,
    "setattr": _setattr, "readlink": _readlink, "symlink": _symlink, "mknod": _mknod,
    "mkdir": _mkdir, "unlink": _unlink, "rmdir": _rmdir, "rename": _rename,
    "rename2": _rename2, "link": _link, "open": _open, "read": _read, "write": _write,
    "statfs": _statfs, "release": _release, "fsync": _fsync, "setxattr": _setxattr,
    "getxattr": _getxattr, "listxattr": _listxattr, "removexattr": _removexattr,
    "flush": _flush, "opendir": _opendir, "readdir": _readdir, "releasedir": _releasedir,
    "fsyncdir": _fsyncdir, "getlk": _getlk, "setlk": _setlk, "setlkw": _setlkw,
    "access": _access, "create": _create, "bmap": _bmap, "ioctl": _ioctl, "poll": _poll,
    "fallocate": _fallocate, "readdirplus": _readdirplus, "lseek": _lseek,
    "copy_file_range": _copy_file_range, "copy_file_range_64": _copy_file_range_64,
    "setupmapping": _setupmapping, "removemapping": _removemapping, "syncfs": _syncfs,
    "tmpfile": _tmpfile, "statx": _statx,
    # We are not a CUSE server.
    "cuse_init": _enosys,
}
"""Handler name (``OpSpec.handler``) -> adapter calling the ``Filesystem`` method."""

SESSION_OPS = frozenset({Opcode.INIT, Opcode.INTERRUPT, Opcode.DESTROY, Opcode.NOTIFY_REPLY})
"""Opcodes the session answers itself, never a ``Filesystem`` method."""

_UMASK_OPS = frozenset({Opcode.MKNOD, Opcode.MKDIR, Opcode.CREATE, Opcode.TMPFILE})
_SIZE_CAPPED = frozenset({Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS})


def _size_capped(adapter: Adapter, cap: int) -> Adapter:
    """``adapter`` answering EINVAL when the request's ``size`` exceeds ``cap``."""
    def capped(fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> Any:
        size = req[2].size
        if size > cap:
            raise FuseError(E.EINVAL, f"size {size} > {cap}")
        return adapter(fs, ctx, nodeid, req)
    return capped

# Every row of the table is served: by an adapter or by the session (checked at import).
for _op in OPCODES:
    if _op not in SESSION_OPS and _op.name.lower() not in ADAPTERS:  # pragma: no cover
        raise AssertionError(f"no adapter for {_op.name}")


# --------------------------------------------------------------------------------------------
# Request contexts


class _RequestContext(Context):
    """A request's ``Context``, read from its in_header when a handler asks.

    Filling a ``Context``'s eight fields for every request measured ~0.6 µs (pinned, CPU time),
    setting this one slot ~0.15 µs; a field read costs ~60 ns more (a property), and the
    busiest handlers (GETATTR, LOOKUP, FLUSH, RELEASE, FORGET) read none.  Each session makes
    a subclass whose ``interrupts`` is its live set.  Fields stay read-only (the dataclass is
    frozen); ``dataclasses.replace``, ``copy`` and ``pickle`` give a plain ``Context``.
    """

    __slots__ = ("_h",)
    _h: S.InHeader

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Reached only through dataclasses.replace(); the session uses object.__new__.
        return Context(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Context, tuple(getattr(self, name) for name in _CONTEXT_FIELDS))

    @property
    def uid(self) -> int:
        return self._h[4]

    @property
    def gid(self) -> int:
        return self._h[5]

    @property
    def pid(self) -> int:
        return self._h[6]

    @property
    def unique(self) -> int:
        return self._h[2]


class _UmaskContext(_RequestContext):
    """MKNOD/MKDIR/CREATE/TMPFILE: ``umask`` from the request's fixed argument."""

    __slots__ = ("_a",)
    _a: Any

    @property
    def umask(self) -> int:
        a = self._a
        return int(a.umask) if a is not None else 0


_set_header = _RequestContext._h.__set__  # type: ignore[attr-defined]
_set_arg = _UmaskContext._a.__set__


def _ext_context(req: Request, umask: bool, interrupts: Container[int]) -> Context:
    """A plain ``Context`` for a request with extensions (supplementary groups, security
    context): rare, so built the slow, complete way."""
    groups: tuple[int, ...] = ()
    secctx: tuple[tuple[bytes, bytes], ...] = ()
    for ext in req.ext:
        if isinstance(ext, SupplementaryGroups):
            groups = ext.groups
        elif isinstance(ext, SecurityContext):
            secctx = ext.contexts
    h = req.header
    arg = req.arg
    ctx = _new_object(Context)
    ctx.__dict__.update(uid=h.uid, gid=h.gid, pid=h.pid,
                        umask=arg.umask if umask and arg is not None else 0,
                        groups=groups, security_context=secctx, unique=h.unique,
                        interrupts=interrupts)
    return ctx


# --------------------------------------------------------------------------------------------
# Runners: one closure per opcode, made at INIT, doing the whole request after decoding.
#
# Generated from one template so that the hottest opcodes call their ``Filesystem`` method
# (bound once at INIT) without an adapter frame, and every opcode gets the same guarantees.
# Per request: a lazy context, the in-flight mark, the call, the reply encoder bound at INIT.
# benchmarks/devfuse.py ``micro`` measures the result per opcode.

_RUNNER = '''
def make(call, fs, encode, failed, crashed, bad_reply, ctx_cls, umask, add, discard, marks,
         cap):
    def run(req):
        h = req[0]
        unique = h[2]
        if req[6]:
            ctx = _ext_context(req, umask, marks)
        else:
            ctx = _new(ctx_cls)
            _set_header(ctx, h)
            {set_umask}
        add(unique)
        try:
{body}
        except _FuseError as exc:
            return failed(exc, unique)
        except Exception:
            return crashed(unique, h[3])
        finally:
            discard(unique)
            if marks:
                marks.pop(unique, None)
{ret}
    return run
'''
_REPLY = '''
        try:
            return encode(unique, result)
        except Exception:
            return bad_reply(unique, result)
'''
_NO_REPLY = '''
        return None
'''

_DIRECT: dict[Opcode, str] = {
    Opcode.LOOKUP: "result = call(ctx, h[3], req[3][0])",
    Opcode.GETATTR: """
        a = req[2]
        result = call(ctx, h[3], a[2] if a is not None and a[0] & _GETATTR_FH else None)""",
    Opcode.SETATTR: "result = call(ctx, h[3], req[2])",
    # ForgetOne items are (nodeid, nlookup) tuples already: passed as they are.
    Opcode.FORGET: "call(((h[3], req[2][0]),))",
    Opcode.BATCH_FORGET: """
        if req[5]:
            call(req[5])""",
    Opcode.UNLINK: """
        call(ctx, h[3], req[3][0])
        result = None""",
    Opcode.OPEN: """
        a = req[2]
        result = call(ctx, h[3], a[0], a[1])""",
    Opcode.CREATE: """
        a = req[2]
        result = call(ctx, h[3], req[3][0], a[1], a[0], a[3])
        if type(result) is not tuple:
            result = tuple(result)""",
    Opcode.FLUSH: """
        a = req[2]
        call(ctx, h[3], a[0], a[3])
        result = None""",
    Opcode.RELEASE: """
        call(ctx, h[3], req[2])
        result = None""",
    # _read's checks, inline: the kernel never asks for more than max_pages (cap); a hostile
    # u32 size must not make a filesystem build a 4 GiB reply; a longer result would fail the
    # kernel's write with EINVAL and the read with EIO (copy_out_args).
    Opcode.READ: """
        a = req[2]
        size = a[2]
        if size > cap:
            raise _FuseError(_EINVAL, f"size {size} > {cap}")
        if size > _READ_MAX:
            size = _READ_MAX
        result = call(ctx, h[3], a[0], a[1], size)
        t = type(result)
        if t is not bytes and t is not bytearray:
            result = _as_bytes(result)
        if len(result) > size:
            raise _LocalProtocolError(
                f"read returned {len(result)} bytes for a {a[2]}-byte read")""",
    # fs/fuse/file.c: write_out.size > requested fails the write with EIO.
    Opcode.WRITE: """
        a = req[2]
        n = call(ctx, h[3], a[0], a[1], req[4], a[3])
        if type(n) is not int or not 0 <= n <= a[2]:
            raise _LocalProtocolError(f"write returned {n!r} for a {a[2]}-byte write")
        result = _tuple_new(_WriteOut, (n, 0))""",
}
"""Opcodes whose runner calls the ``Filesystem`` method itself (body source, ``call`` bound to
the method); the rest call their adapter: ``result = call(fs, ctx, nodeid, req)``."""
_GENERIC = "result = call(fs, ctx, h[3], req)"
_GENERIC_NO_RESULT = "call(fs, ctx, h[3], req)"

_RUNNER_ENV: dict[str, Any] = {
    "_new": _new_object, "_set_header": _set_header, "_set_arg": _set_arg,
    "_ext_context": _ext_context, "_FuseError": FuseError, "_EINVAL": E.EINVAL,
    "_LocalProtocolError": LocalProtocolError, "_READ_MAX": _READ_MAX, "_as_bytes": _as_bytes,
    "_GETATTR_FH": _GETATTR_FH, "_tuple_new": tuple.__new__, "_WriteOut": S.WriteOut,
}
_MAKERS: dict[tuple[str, bool, bool], Callable[..., Callable[[Request], ReplyParts | None]]] = {}


def _runner_maker(body: str, umask: bool,
                  no_reply: bool) -> Callable[..., Callable[[Request], ReplyParts | None]]:
    """The ``make(...)`` factory of runners with ``body`` (compiled once per shape)."""
    key = (body, umask, no_reply)
    found = _MAKERS.get(key)
    if found is None:
        lines = [line for line in body.strip("\n").splitlines()]
        base = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        body_src = "\n".join(" " * 12 + line[base:] if line.strip() else "" for line in lines)
        source = _RUNNER.format(
            body=body_src, ret=(_NO_REPLY if no_reply else _REPLY).rstrip("\n"),
            set_umask="_set_arg(ctx, req[2])" if umask else "pass")
        env = dict(_RUNNER_ENV)
        exec(compile(source, f"<session runner {len(_MAKERS)}>", "exec"), env)
        found = _MAKERS[key] = env["make"]
    return found


def _reply_encoder(spec: OpSpec, minor: int) -> Callable[[int, Any], ReplyParts]:
    """``encode_reply_parts(spec, unique, result, minor)`` as ``encode(unique, result)``.

    The codec generates one ``encode(unique, result)`` per opcode and minor and finds it per
    call (a dict lookup and a frame: ~0.15-0.2 µs per reply, measured with
    benchmarks/devfuse.py ``micro``); a runner takes it from the codec's table once.  Only
    when the table has that shape: otherwise, the public function, wrapped.
    """
    # (``virtiofs.protocol.codec`` the attribute is schema's ``codec()``: the module by name.)
    table = getattr(sys.modules[Request.__module__], "_encoder_table", None)
    if table is not None:
        try:
            found = table(minor)[int(spec.opcode)]
        except (KeyError, TypeError):
            found = None
        code = getattr(found, "__code__", None)
        if code is not None and code.co_argcount == 2 and not code.co_kwonlyargcount:
            return found  # type: ignore[no-any-return]

    def encode(unique: int, result: Any) -> ReplyParts:
        return encode_reply_parts(spec, unique, result, minor)
    return encode


# --------------------------------------------------------------------------------------------


class Session:
    """One FUSE connection's state and dispatch, without I/O.

    ``fs`` serves the requests.  ``max_write`` is the largest WRITE payload we accept (the
    transport's read buffers must hold ``read_buffer_size(max_write)`` bytes); ``max_readahead``
    caps the kernel's readahead; ``time_gran`` (ns), ``map_alignment`` (log2, DAX),
    ``max_background``/``congestion_threshold`` and ``request_timeout`` (seconds, sent when
    the kernel offers FUSE_REQUEST_TIMEOUT and it is non-zero) go into the INIT reply.
    ``Filesystem.init`` may lower them through the ``ConnectionInfo`` it receives.

    ``handle`` may be called from several threads at once; the filesystem's methods then run
    concurrently.
    """

    def __init__(self, fs: Filesystem, *, max_write: int = DEFAULT_MAX_WRITE,
                 max_readahead: int = DEFAULT_MAX_READAHEAD, time_gran: int = 1,
                 map_alignment: int = 0, max_background: int = 16,
                 congestion_threshold: int = 12, request_timeout: int = 0) -> None:
        if not _MIN_MAX_WRITE <= max_write <= 0xFFFFFFFF:
            raise LocalProtocolError(f"max_write {max_write} outside [4096, 2^32)")
        if not 0 <= map_alignment <= C.DAX_SHIFT:
            # Linux refuses map_alignment > FUSE_DAX_SHIFT (fs/fuse/dax.c).
            raise LocalProtocolError(f"map_alignment {map_alignment} > {C.DAX_SHIFT}")
        self.fs = fs
        self.max_write = max_write
        self.max_readahead = max_readahead
        self.time_gran = time_gran
        self.map_alignment = map_alignment
        self.max_background = max_background
        self.congestion_threshold = congestion_threshold
        self.request_timeout = request_timeout
        self.conn: ConnectionInfo | None = None
        self.extra: dict[str, object] = {}
        """Transport capabilities copied into ``ConnectionInfo.extra`` at INIT (set them before
        the kernel's INIT arrives): /dev/fuse offers ``"backing_open"`` (``fd -> backing id``,
        FUSE_DEV_IOC_BACKING_OPEN) and ``"backing_close"`` (``backing id -> None``) for kernel
        passthrough I/O (FUSE_PASSTHROUGH)."""
        """What INIT negotiated (None before INIT)."""
        self.minor = C.KERNEL_MINOR_VERSION
        """The negotiated minor (min of the kernel's and ours) once initialized."""
        self.flags = InitFlags(0)
        """The negotiated INIT flags."""
        self.initialized = threading.Event()
        """Set once INIT has been answered successfully (cleared by DESTROY)."""
        self.destroyed = False
        self._table: dict[int, Callable[[Request], ReplyParts | None]] = {}
        self._decode = decoder_for()
        """Before INIT: the default version (INIT is sized by the version in its own body)."""
        self._inflight: set[int] = set()
        self._interrupted: dict[int, None] = {}
        # The request contexts of this session: their ``interrupts`` is its live set.
        self._context = type("RequestContext", (_RequestContext,),
                             {"__slots__": (), "interrupts": self._interrupted})
        self._umask_context = type("RequestContext", (_UmaskContext,),
                                   {"__slots__": (), "interrupts": self._interrupted})
        self._lock = threading.Lock()
        self._notify_unique = itertools.count(1)
        self._retrieves: dict[int, Callable[[int, bytes], None]] = {}

    # ---------------------------------------------------------------------------------- state

    @property
    def inflight(self) -> frozenset[int]:
        """Uniques of the requests being handled right now."""
        return frozenset(self._inflight)

    def is_interrupted(self, unique: int) -> bool:
        """Whether the kernel sent an INTERRUPT for request ``unique``."""
        return unique in self._interrupted

    def close(self) -> None:
        """The transport is gone: call ``fs.destroy()`` once if INIT happened and DESTROY did
        not (a /dev/fuse mount never sends DESTROY; the kernel sends it only for fuseblk and
        virtio-fs)."""
        with self._lock:
            call = self.conn is not None and not self.destroyed
            self.destroyed = True
            self._table = {}
            self.initialized.clear()
        if call:
            try:
                self.fs.destroy()
            except Exception:
                log.exception("Filesystem.destroy failed")

    # ----------------------------------------------------------------------------- handling

    def handle(self, request: Buffer) -> ReplyParts | None:
        """Serve one request; the reply as a gather list, or None when none is due."""
        if len(request) < _IN_SIZE:
            log.warning("dropped a %d-byte request: shorter than in_header", len(request))
            return None
        try:
            try:
                req = self._decode(request)
            except ProtocolError as exc:
                _, opcode, unique = _prefix(request)
                spec = BY_NUMBER.get(opcode)
                return self._decode_failed(exc, unique, spec is not None and spec.no_reply)
            run = self._table.get(req[0][1])
            if run is None:
                return self._unserved(req)
            return run(req)
        except Exception:
            # A bug below us (codec, session): the request still gets its one reply, or the
            # process calling into the mount would wait for it forever.
            _, opcode, unique = _prefix(request)
            spec = BY_NUMBER.get(opcode)
            log.exception("internal error on request %d (opcode %d)", unique, opcode)
            if spec is not None and spec.no_reply:
                return None
            return [_out_pack(_OUT_SIZE, -E.EIO, unique)]

    def _runner(self, spec: OpSpec, adapter: Adapter | None, minor: int,
                size_cap: int) -> Callable[[Request], ReplyParts | None]:
        """The runner of ``spec``'s opcode: ``adapter``, or the method itself when direct."""
        opcode = spec.opcode
        name = spec.name
        no_reply = spec.no_reply
        umask = opcode in _UMASK_OPS
        fs = self.fs
        if adapter is None:
            body = _DIRECT[opcode]
            call: Any = getattr(fs, "forget" if opcode is Opcode.BATCH_FORGET else spec.handler)
        else:
            body = _GENERIC_NO_RESULT if no_reply else _GENERIC
            call = adapter

        def failed(exc: FuseError, unique: int) -> ReplyParts | None:
            if no_reply:
                log.warning("%s failed: %s (no reply is due)", name, exc)
                return None
            err = exc.errno
            if type(err) is not int or not 0 < err < C.ERRNO_LIMIT:
                log.error("%s raised FuseError(%r): outside (0, %d), answering EIO",
                          name, err, C.ERRNO_LIMIT)
                err = E.EIO
            return [_out_pack(_OUT_SIZE, -err, unique)]

        def crashed(unique: int, nodeid: int) -> ReplyParts | None:
            log.exception("%s handler failed (unique %d, nodeid %d)%s", name, unique,
                          nodeid, "" if no_reply else "; answering EIO")
            if no_reply:
                return None
            return [_out_pack(_OUT_SIZE, -E.EIO, unique)]

        def bad_reply(unique: int, result: Any) -> ReplyParts:
            log.exception("%s returned a reply that cannot be encoded (unique %d); answering "
                          "EIO", name, unique)
            try:
                undo_lookups(fs, result)
            except Exception:
                log.exception("forget after a failed %s reply", name)
            return [_out_pack(_OUT_SIZE, -E.EIO, unique)]

        make = _runner_maker(body, umask, no_reply)
        inflight = self._inflight
        return make(call, fs, _reply_encoder(spec, minor), failed, crashed, bad_reply,
                    self._umask_context if umask else self._context, umask, inflight.add,
                    inflight.discard, self._interrupted, size_cap)

    def _decode_failed(self, exc: ProtocolError, unique: int, no_reply: bool) -> ReplyParts | None:
        if no_reply:
            log.warning("dropped a malformed request that gets no reply: %s", exc)
            return None
        err = exc.errno if 0 < exc.errno < C.ERRNO_LIMIT else E.EIO
        log.warning("malformed request %d: %s; answering %s", unique, exc,
                    E.errorcode.get(err, err))
        return [_out_pack(_OUT_SIZE, -err, unique)]

    def _unserved(self, req: Request) -> ReplyParts | None:
        """A well-formed request with no row in the table: INIT, or anything before INIT."""
        spec = req.spec
        unique = req.header.unique
        if spec.opcode is Opcode.INIT:
            return self._init(req)
        if spec.no_reply:
            log.warning("dropped %s before INIT", spec.name)
            return None
        log.warning("%s before INIT: answering EIO", spec.name)
        return [_out_pack(_OUT_SIZE, -E.EIO, unique)]

    # --------------------------------------------------------------------- session opcodes

    def _init(self, req: Request) -> ReplyParts:
        unique = req.header.unique
        if self._table:
            log.warning("second INIT: answering EIO")
            return [_out_pack(_OUT_SIZE, -E.EIO, unique)]
        arg = req.arg
        major, kminor = arg.major, arg.minor
        spec = req.spec
        if major < C.KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d, older than 7: EPROTO", major, kminor)
            return [_out_pack(_OUT_SIZE, -E.EPROTO, unique)]
        if major > C.KERNEL_VERSION:
            # fuse.h: the kernel then sends a new INIT with our major.
            log.info("kernel speaks FUSE %d.%d: answering 7.%d and waiting for a new INIT",
                     major, kminor, C.KERNEL_MINOR_VERSION)
            return encode_reply_parts(spec, unique,
                                      S.InitOut(C.KERNEL_VERSION, C.KERNEL_MINOR_VERSION))
        minor = min(kminor, C.KERNEL_MINOR_VERSION)
        offered = arg.flags
        if offered & InitFlags.INIT_EXT:
            offered |= arg.flags2 << 32
        offered_flags = InitFlags(offered)
        conn = ConnectionInfo(
            major=C.KERNEL_VERSION, minor=minor, kernel_flags=offered_flags,
            flags=offered_flags & self.fs.init_flags,
            max_readahead=min(self.max_readahead, arg.max_readahead),
            max_write=self.max_write, max_pages=_pages(self.max_write),
            time_gran=self.time_gran, map_alignment=self.map_alignment,
            max_background=self.max_background,
            congestion_threshold=self.congestion_threshold)
        conn.extra.update(self.extra)
        if self.request_timeout:
            conn.extra["request_timeout"] = self.request_timeout
        try:
            self.fs.init(conn)
        except FuseError as exc:
            err = exc.errno if 0 < exc.errno < C.ERRNO_LIMIT else E.EIO
            log.error("Filesystem.init refused the connection: %s", exc)
            return [_out_pack(_OUT_SIZE, -err, unique)]
        except Exception:
            log.exception("Filesystem.init failed: answering EIO (the mount fails)")
            return [_out_pack(_OUT_SIZE, -E.EIO, unique)]
        flags = InitFlags(conn.flags) & offered_flags
        if InitFlags(conn.flags) & ~offered_flags:
            log.warning("Filesystem.init asked for flags the kernel did not offer: %#x",
                        int(InitFlags(conn.flags) & ~offered_flags))
        if flags >> 32 and offered_flags & InitFlags.INIT_EXT:
            flags |= InitFlags.INIT_EXT
        if not flags & InitFlags.INIT_EXT:
            # flags2 travels only with INIT_EXT (fuse.h 7.36).
            flags &= InitFlags(0xFFFFFFFF)
        request_timeout = int(conn.extra.get("request_timeout", 0))  # type: ignore[call-overload]
        if request_timeout and offered_flags & InitFlags.REQUEST_TIMEOUT:
            flags |= InitFlags.REQUEST_TIMEOUT
        max_write = max(_MIN_MAX_WRITE, min(conn.max_write, self.max_write))
        max_pages = _pages(max_write)
        conn.flags = flags
        conn.max_write = max_write
        conn.max_pages = max_pages if flags & InitFlags.MAX_PAGES else C.DEFAULT_MAX_PAGES_PER_REQ
        out = S.InitOut(
            major=C.KERNEL_VERSION, minor=C.KERNEL_MINOR_VERSION,
            max_readahead=conn.max_readahead, flags=int(flags) & 0xFFFFFFFF,
            max_background=conn.max_background, congestion_threshold=conn.congestion_threshold,
            max_write=max_write, time_gran=conn.time_gran,
            max_pages=max_pages if flags & InitFlags.MAX_PAGES else 0,
            map_alignment=conn.map_alignment if flags & InitFlags.MAP_ALIGNMENT else 0,
            flags2=int(flags) >> 32 if flags & InitFlags.INIT_EXT else 0,
            max_stack_depth=conn.max_stack_depth if flags & InitFlags.PASSTHROUGH else 0,
            request_timeout=request_timeout if flags & InitFlags.REQUEST_TIMEOUT else 0)
        try:
            # Sized for the negotiated minor: 64 bytes from 7.23, 24 before, 8 before 7.5
            # (a longer reply than the kernel expects is EINVAL and a dead mount, FACTS.md).
            reply = encode_reply_parts(spec, unique, out, minor)
        except (LocalProtocolError, struct.error) as exc:
            log.error("INIT reply cannot be built (%s): answering EIO", exc)
            return [_out_pack(_OUT_SIZE, -E.EIO, unique)]
        with self._lock:
            self.minor = minor
            self.flags = flags
            self.conn = conn
            self.destroyed = False
            self._decode = decoder_for(minor, int(flags))
            self._table = self._compile(minor)
        self.initialized.set()
        log.info("FUSE %d.%d negotiated (kernel 7.%d), max_write %d, flags %#x",
                 C.KERNEL_VERSION, minor, kminor, max_write, int(flags))
        return reply

    def _compile(self, minor: int) -> dict[int, Callable[[Request], ReplyParts | None]]:
        """The dispatch table: one runner per opcode of ``OPCODES`` but INIT."""
        session_adapters: dict[Opcode, Adapter] = {
            Opcode.INTERRUPT: self._interrupt, Opcode.DESTROY: self._destroy,
            Opcode.NOTIFY_REPLY: self._notify_reply,
        }
        # The kernel never asks for more than max_pages pages in one READ/READDIR (fs/fuse/
        # file.c, readdir.c); a hostile peer's 4 GiB READ must not make fs.read allocate that
        # much (issue #6, tests/test_resource_bounds.py).
        conn = self.conn
        pages = conn.max_pages if conn is not None and conn.max_pages \
            else C.DEFAULT_MAX_PAGES_PER_REQ
        size_cap = max(self.max_write, pages * PAGE_SIZE)
        table: dict[int, Callable[[Request], ReplyParts | None]] = {}
        for opcode, spec in OPCODES.items():
            if opcode is Opcode.INIT:
                continue
            adapter: Adapter | None = session_adapters.get(opcode)
            if adapter is None and opcode not in _DIRECT:
                adapter = ADAPTERS[spec.handler]
                if opcode in _SIZE_CAPPED:
                    adapter = _size_capped(adapter, size_cap)
            table[int(opcode)] = self._runner(spec, adapter, minor, size_cap)
        return table

    def _interrupt(self, fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> None:
        # No reply: the kernel still waits for the interrupted request's own reply, which the
        # handler gives early (EINTR) when it looks at ctx.interrupted.
        target = req[2].unique
        marks = self._interrupted
        marks[target] = None
        if len(marks) > _MAX_PENDING_INTERRUPTS:
            with self._lock:
                try:
                    stale = list(itertools.islice(marks, len(marks) - _MAX_PENDING_INTERRUPTS))
                except RuntimeError:  # a worker finished meanwhile; prune next time
                    stale = []
            for old in stale:
                if old not in self._inflight:
                    marks.pop(old, None)
        log.debug("INTERRUPT for %d (%s)", target,
                  "in flight" if target in self._inflight else "not in flight")

    def _destroy(self, fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> None:
        # libfuse do_destroy: back to the pre-INIT state, then reply.
        with self._lock:
            self._table = {}
            self._decode = decoder_for()
            self.conn = None
            self.destroyed = True
            self.initialized.clear()
        fs.destroy()

    def _notify_reply(self, fs: Filesystem, ctx: Context, nodeid: int, req: Request) -> None:
        callback = self._retrieves.pop(ctx.unique, None)
        if callback is None:
            log.warning("NOTIFY_REPLY %d answers no retrieve of ours", ctx.unique)
            return
        callback(req[2].offset, req[4].tobytes())

    # ------------------------------------------------------------------------ notifications

    def _need(self, since: int, what: str) -> None:
        if self.conn is None:
            raise LocalProtocolError(f"{what} before INIT")
        if self.minor < since:
            # libfuse fuse_lowlevel_notify_*: -ENOSYS when the kernel is older.
            raise FuseError(E.ENOSYS, f"{what} needs FUSE 7.{since}, negotiated 7.{self.minor}")

    def notify_inval_inode(self, ino: int, offset: int = 0, length: int = 0) -> bytes:
        """FUSE_NOTIFY_INVAL_INODE: drop cached attributes and the data range (length 0 = to
        the end, negative offset = attributes only)."""
        self._need(12, "inval_inode")
        return encode_notify(NotifyCode.INVAL_INODE, S.NotifyInvalInodeOut(ino, offset, length))

    def notify_inval_entry(self, parent: int, name: bytes, expire_only: bool = False) -> bytes:
        """FUSE_NOTIFY_INVAL_ENTRY: forget the dentry ``name`` in ``parent`` (or only expire
        it, with FUSE_HAS_EXPIRE_ONLY)."""
        self._need(12, "inval_entry")
        flags = 0
        if expire_only:
            if not self.flags & InitFlags.HAS_EXPIRE_ONLY:
                raise FuseError(E.ENOSYS, "expire_only needs FUSE_HAS_EXPIRE_ONLY")
            flags = NotifyInvalEntryFlags.EXPIRE_ONLY
        return encode_notify(NotifyCode.INVAL_ENTRY,
                             S.NotifyInvalEntryOut(parent, len(name), flags), name=name)

    def notify_delete(self, parent: int, child: int, name: bytes) -> bytes:
        """FUSE_NOTIFY_DELETE: ``name`` in ``parent`` (node ``child``) is gone."""
        self._need(18, "delete")
        return encode_notify(NotifyCode.DELETE, S.NotifyDeleteOut(parent, child, len(name)),
                             name=name)

    def notify_store(self, ino: int, offset: int, data: bytes) -> bytes:
        """FUSE_NOTIFY_STORE: put ``data`` into the kernel's page cache of ``ino``."""
        self._need(15, "store")
        return encode_notify(NotifyCode.STORE, S.NotifyStoreOut(ino, offset, len(data)),
                             data=bytes(data))

    def notify_retrieve(self, ino: int, offset: int, size: int,
                        callback: Callable[[int, bytes], None]) -> tuple[bytes, int]:
        """FUSE_NOTIFY_RETRIEVE: ask the kernel for cached data of ``ino``.

        Returns the notification and its ``notify_unique``; ``callback(offset, data)`` runs
        when the kernel's NOTIFY_REPLY comes through ``handle``.  If the notification cannot
        be delivered, give up on it with ``cancel_retrieve(notify_unique)``.
        """
        self._need(15, "retrieve")
        notify_unique = next(self._notify_unique)
        self._retrieves[notify_unique] = callback
        return encode_notify(NotifyCode.RETRIEVE,
                             S.NotifyRetrieveOut(notify_unique, ino, offset, size)), notify_unique

    def cancel_retrieve(self, notify_unique: int) -> None:
        """Forget a retrieve whose notification was refused or timed out."""
        self._retrieves.pop(notify_unique, None)

    def notify_poll(self, kh: int) -> bytes:
        """FUSE_NOTIFY_POLL: wake the poller registered with ``kh``."""
        self._need(11, "poll")
        return encode_notify(NotifyCode.POLL, S.NotifyPollWakeupOut(kh))


def _pages(max_write: int) -> int:
    # libfuse do_init: max_pages = (max_write - 1) / pagesize + 1, within the kernel's limit.
    return min(C.MAX_MAX_PAGES, (max_write - 1) // PAGE_SIZE + 1)


def request_opcode(request: Buffer) -> int:
    """The opcode of a request without decoding it (0 when the header is short)."""
    if len(request) < 8:
        return 0
    return int(struct.unpack_from("<I", request, 4)[0])


def undo_lookups(fs: Filesystem, result: Any) -> None:
    """Give back the lookup reference a reply that never reached the kernel carried."""
    entries: Sequence[Any] = result if isinstance(result, tuple) else (result,)
    refs = [(e.nodeid, 1) for e in entries if isinstance(e, S.EntryOut) and e.nodeid]
    if refs:
        fs.forget(refs)
