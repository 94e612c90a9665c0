"""The driver side of FUSE: what the Linux kernel does for a mount, as a Python object.

:class:`Client` negotiates INIT exactly as ``fs/fuse/inode.c: fuse_send_init`` does (major 7,
minor 45, the flags Linux 6.x offers for a virtio-fs mount), resolves paths with LOOKUP, keeps
lookup counts and gives them back with FORGET / BATCH_FORGET, caches entries, attributes and data
according to ``cache=`` and ``writeback=``, and offers an ``os``-like API::

    with Client(channel, cache="auto") as fs:
        fs.mkdir("/d")
        with fs.open("/d/f", "w") as f:
            f.write(b"hello")
        fs.stat("/d/f").st_size        # 5
        fs.listdir("/d")               # ['f']

Errors from the server are raised as ``OSError(errno, strerror, path)`` (so ``FileNotFoundError``
and friends); a reply that breaks the protocol raises :class:`~virtiofs.errors.ReplyError`, which
is both a ``ProtocolError`` and ``OSError(EIO)`` — what the kernel would give the application.

Cache modes (the client-side counterpart of virtiofsd's ``cache=``):

- ``none``: nothing is cached: every path component is looked up, every ``stat`` sends GETATTR,
  every read and write goes to the server (the kernel with zero timeouts and ``FOPEN_DIRECT_IO``).
- ``auto``: entries and attributes are trusted for the timeouts the server gave; file data is
  cached while the file is open and dropped at the next open unless the server set
  ``FOPEN_KEEP_CACHE`` (close-to-open), and whenever fresh attributes show another size or mtime.
- ``always``: entries and attributes are trusted until this client changes them, whatever the
  timeouts; file data is kept across opens (dropped only on a size/mtime change).

``writeback=True`` holds writes in the client until ``flush``/``fsync``/``close`` (or a dirty
limit) and sends them coalesced; files the server opens with ``FOPEN_DIRECT_IO``, and every file
in ``cache="none"``, are written through regardless.

``client.stats`` counts requests actually sent, per opcode, so tests can assert the caches work.
"""

from __future__ import annotations

import collections
import errno as E
import itertools
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import LocalProtocolError, ProtocolError, ReplyError
from ..protocol import (
    OPCODES,
    DirEntry,
    InitFlags,
    Opcode,
    OpenFlags,
    SecurityContext,
    SetattrValid,
    decode_dirents,
    encode_request_parts,
    reply_struct_size,
)
from ..protocol import structs as S
from ..protocol.constants import (
    DEFAULT_MAX_PAGES_PER_REQ,
    KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
    MAX_MAX_PAGES,
    ROOT_ID,
    GetattrFlags,
    RenameFlags,
)
from ..protocol.opcodes import DATA, XATTR
from ..protocol.schema import codec
from .cache import DataCache, DirtyData, Inode, attr_type, expiry
from .channel import OUT_HEADER_SIZE, Buffer, Channel, ReplyBuffer

if TYPE_CHECKING:
    from .dax import DaxIO  # DAX hook (issue 5)

__all__ = [
    "CacheMode",
    "Client",
    "ClientFile",
    "DirEntryInfo",
    "LINUX_INIT_FLAGS",
    "Negotiated",
    "RequestStats",
]

CacheMode = Literal["none", "auto", "always"]
PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]

PAGE_SIZE = 4096
PATH_MAX = 4096
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
LLONG_MAX = (1 << 63) - 1
MAX_SYMLINKS = 40
"""Linux MAXSYMLINKS: ELOOP after this many links in one path walk."""
READAHEAD = 32 * PAGE_SIZE
"""``init_in.max_readahead``: the default bdi read-ahead (VM_READAHEAD_PAGES) Linux sends."""

LINUX_INIT_FLAGS = (
    InitFlags.ASYNC_READ | InitFlags.POSIX_LOCKS | InitFlags.ATOMIC_O_TRUNC
    | InitFlags.EXPORT_SUPPORT | InitFlags.BIG_WRITES | InitFlags.DONT_MASK
    | InitFlags.SPLICE_WRITE | InitFlags.SPLICE_MOVE | InitFlags.SPLICE_READ
    | InitFlags.FLOCK_LOCKS | InitFlags.HAS_IOCTL_DIR | InitFlags.AUTO_INVAL_DATA
    | InitFlags.DO_READDIRPLUS | InitFlags.READDIRPLUS_AUTO | InitFlags.ASYNC_DIO
    | InitFlags.WRITEBACK_CACHE | InitFlags.NO_OPEN_SUPPORT
    | InitFlags.PARALLEL_DIROPS | InitFlags.HANDLE_KILLPRIV | InitFlags.POSIX_ACL
    | InitFlags.ABORT_ERROR | InitFlags.MAX_PAGES | InitFlags.CACHE_SYMLINKS
    | InitFlags.NO_OPENDIR_SUPPORT | InitFlags.EXPLICIT_INVAL_DATA
    | InitFlags.HANDLE_KILLPRIV_V2 | InitFlags.SETXATTR_EXT | InitFlags.INIT_EXT
    | InitFlags.SECURITY_CTX | InitFlags.CREATE_SUPP_GROUP
    | InitFlags.HAS_EXPIRE_ONLY | InitFlags.DIRECT_IO_ALLOW_MMAP
    | InitFlags.NO_EXPORT_SUPPORT | InitFlags.HAS_RESEND | InitFlags.ALLOW_IDMAP
    | InitFlags.REQUEST_TIMEOUT
    # virtio_fs.c sets fc->auto_submounts, so a virtio-fs mount offers SUBMOUNTS too.
    | InitFlags.SUBMOUNTS
)
"""What ``fuse_send_init`` offers at 7.45 for a virtio-fs mount (fs/fuse/inode.c).

Left out on purpose: PASSTHROUGH (backing files need /dev/fuse ioctls, which a virtio-fs
driver cannot honour), OVER_IO_URING (off unless the module parameter is set), and
MAP_ALIGNMENT / HAS_INODE_DAX, which Linux adds only with ``-o dax`` (our ``dax=`` argument).
"""

_VALID_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                          stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})
_OUT = codec(S.OutHeader)
_INIT_OUT = codec(S.InitOut)
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY


class RequestStats(collections.Counter[Opcode]):
    """Requests sent, per :class:`~virtiofs.protocol.Opcode`; ``stats["GETATTR"]`` works too."""

    def __missing__(self, key: Any) -> int:
        if isinstance(key, str):
            return self[Opcode[key]]
        return 0

    def total(self) -> int:
        return sum(self.values())


@dataclass(frozen=True)
class Negotiated:
    """What INIT settled (the kernel's ``fuse_conn`` fields after ``process_init_reply``)."""

    major: int
    minor: int
    flags: InitFlags
    """The server's flags that we offered (the only ones that mean anything)."""
    max_write: int
    max_pages: int
    max_readahead: int
    time_gran: int
    map_alignment: int
    request_timeout: int
    max_background: int
    congestion_threshold: int

    @property
    def max_read(self) -> int:
        """Largest READ the client sends: ``max_pages`` pages (fuse_conn max_pages)."""
        return self.max_pages * PAGE_SIZE

    @property
    def max_io_write(self) -> int:
        """Largest WRITE payload: ``min(max_write, max_pages * PAGE_SIZE)`` as the kernel."""
        return min(self.max_write, self.max_pages * PAGE_SIZE)


@dataclass(frozen=True)
class DirEntryInfo:
    """One ``scandir`` entry (the attributes of ``os.DirEntry`` that make sense remotely)."""

    name: str | bytes
    path: str | bytes
    ino: int
    d_type: int
    """DT_* (0 = unknown)."""
    _client: Client
    _stat: os.stat_result | None = None

    def inode(self) -> int:
        return self.ino

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._is(stat.S_IFDIR, follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._is(stat.S_IFREG, follow_symlinks)

    def is_symlink(self) -> bool:
        return self._is(stat.S_IFLNK, False)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if self._stat is not None and not (follow_symlinks and self.d_type == stat.S_IFLNK >> 12):
            return self._stat
        return self._client.stat(self.path, follow_symlinks=follow_symlinks)

    def _is(self, kind: int, follow: bool) -> bool:
        if self.d_type and not (follow and self.d_type == stat.S_IFLNK >> 12):
            return self.d_type == kind >> 12
        try:
            return stat.S_IFMT(self.stat(follow_symlinks=follow).st_mode) == kind
        except FileNotFoundError:
            return False

    def __fspath__(self) -> Any:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntryInfo {self.name!r}>"


def _fs_bytes(path: PathLike) -> bytes:
    return os.fsencode(path)


def _raise(err: int, path: PathLike | None = None, path2: PathLike | None = None) -> None:
    msg = os.strerror(err)
    if path is None:
        raise OSError(err, msg)
    if path2 is None:
        raise OSError(err, msg, os.fsdecode(path))
    raise OSError(err, msg, os.fsdecode(path), None, os.fsdecode(path2))


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def stat_result(attr: S.Attr, dev: int = 0) -> os.stat_result:
    """An ``os.stat_result`` from a ``fuse_attr``."""
    at, mt, ct = _signed64(attr.atime), _signed64(attr.mtime), _signed64(attr.ctime)
    an, mn, cn = attr.atimensec, attr.mtimensec, attr.ctimensec
    return os.stat_result((
        attr.mode, attr.ino, dev, attr.nlink, attr.uid, attr.gid, attr.size,
        at, mt, ct,
        at + an / 1e9, mt + mn / 1e9, ct + cn / 1e9,
        at * 10**9 + an, mt * 10**9 + mn, ct * 10**9 + cn,
        attr.blksize, attr.blocks, attr.rdev,
    ))


def _parse_mode(mode: str) -> int:
    """open(2) flags for a Python ``open`` mode string (binary only)."""
    if "t" in mode:
        raise ValueError("the client opens files in binary mode only")
    kinds = [c for c in mode if c in "rwax"]
    if len(kinds) != 1 or set(mode) - set("rwaxb+") or mode.count("+") > 1:
        raise ValueError(f"invalid mode: {mode!r}")
    plus = "+" in mode
    base = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
            "x": os.O_CREAT | os.O_EXCL}[kinds[0]]
    if plus:
        acc = os.O_RDWR
    else:
        acc = os.O_RDONLY if kinds[0] == "r" else os.O_WRONLY
    return base | acc


_IN_PACK = struct.Struct("<IIQQIIIHH").pack
_OUT_UNPACK = struct.Struct("<IiQ").unpack_from


class _Plan:
    """How to encode requests of one opcode and decode their replies, for the negotiated
    minor and flags (what the protocol layer's ``encode_request_parts``/``decode_reply`` do,
    precomputed once: they cost ~15 µs a message here, this path ~3)."""

    __slots__ = ("opcode", "op", "arg_cls", "arg_pack", "arg_size", "names", "data", "parts",
                 "reply_size", "single", "variable", "minor")

    def __init__(self, opcode: Opcode, minor: int, flags: int) -> None:
        spec = OPCODES[opcode]
        self.opcode = opcode
        self.op = int(opcode)
        self.minor = minor
        self.arg_cls = spec.request
        self.arg_size = spec.request_size(minor, flags)
        self.arg_pack = codec(spec.request).pack if spec.request is not None else None
        self.names = spec.names
        self.data = spec.data
        parts: list[tuple[Any, int] | None] = []
        size = OUT_HEADER_SIZE
        for part in spec.reply:
            if part is DATA or part is XATTR:
                parts.append(None)
            else:
                assert isinstance(part, type)
                n = reply_struct_size(part, minor)
                parts.append((codec(part), n))
                size += n
        self.parts = parts
        self.reply_size = size
        """Bytes of the fixed reply parts, out_header included."""
        self.variable = any(p is None for p in parts)
        self.single = parts[0] if len(parts) == 1 and parts[0] is not None else None

    def encode(self, unique: int, nodeid: int, arg: Any, names: Sequence[bytes],
               data: Buffer, uid: int, gid: int, pid: int) -> list[Buffer]:
        parts: list[Buffer] = [b""]
        total = 40
        if self.arg_size:
            if type(arg) is not self.arg_cls:
                raise LocalProtocolError(f"{self.opcode.name} needs a "
                                         f"{getattr(self.arg_cls, '__name__', None)}")
            assert self.arg_pack is not None
            packed = self.arg_pack(arg)
            parts.append(packed if len(packed) == self.arg_size else packed[:self.arg_size])
            total += self.arg_size
        if len(names) != self.names:
            raise LocalProtocolError(f"{self.opcode.name} takes {self.names} names")
        for name in names:
            if b"\0" in name:
                raise LocalProtocolError("NUL inside a name")
            parts.append(name + b"\0")
            total += len(name) + 1
        if data:
            if not self.data:
                raise LocalProtocolError(f"{self.opcode.name} carries no data")
            parts.append(data)
            total += len(data)
        parts[0] = _IN_PACK(total, self.op, unique, nodeid, uid, gid, pid, 0, 0)
        return parts

    def decode(self, view: memoryview, xattr_size: int | None = None) -> tuple[int, Any]:
        """``(errno, None)`` or ``(0, value)``; breaks of the rules raise ``ReplyError``.

        The checks of ``decode_reply`` (SECURITY.md B5): errno in (-512, 0), no body with an
        error, fixed parts of the exact size for the negotiated minor, nothing after them.
        (``out_header.len`` and ``unique`` were checked by the channel.)
        """
        n = len(view)
        error = _OUT_UNPACK(view)[1]
        if error:
            if not -512 < error < 0:
                raise ReplyError(f"{self.opcode.name} error {error} outside (-512, 0)",
                                 opcode=self.opcode, field="error", offset=4)
            if n != OUT_HEADER_SIZE:
                raise ReplyError(f"{self.opcode.name} error reply with a {n - 16}-byte body",
                                 opcode=self.opcode, field="len", offset=0)
            return -error, None
        single = self.single
        if single is not None:
            c, size = single
            if n != OUT_HEADER_SIZE + size:
                raise ReplyError(f"{self.opcode.name} reply body of {n - 16} bytes, "
                                 f"{size} expected", opcode=self.opcode, field="len")
            if size == c.size:
                return 0, c.unpack(view, OUT_HEADER_SIZE)
            return 0, c.unpack(bytes(view[16:]) + bytes(c.size - size))
        values: list[Any] = []
        pos = OUT_HEADER_SIZE
        for part in self.parts:
            if part is None:
                if self.opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) and not xattr_size:
                    c = codec(S.GetxattrOut)
                    if n - pos != c.size:
                        raise ReplyError(f"{self.opcode.name} size reply of {n - pos} bytes",
                                         opcode=self.opcode, field="len")
                    values.append(c.unpack(view, pos))
                else:
                    values.append(bytes(view[pos:]))
                pos = n
                continue
            c, size = part
            if n - pos < size:
                raise ReplyError(f"{self.opcode.name} reply part {c.cls.__name__} truncated",
                                 opcode=self.opcode, field=c.cls.__name__, offset=pos)
            values.append(c.unpack(view, pos) if size == c.size else
                          c.unpack(bytes(view[pos:pos + size]) + bytes(c.size - size)))
            pos += size
        if pos != n:
            raise ReplyError(f"{self.opcode.name} reply has {n - pos} bytes too many",
                             opcode=self.opcode, field="len", offset=pos)
        if not values:
            return 0, None
        return 0, values[0] if len(values) == 1 else tuple(values)


class Client:
    """A FUSE client (driver side) over a :class:`~virtiofs.client.channel.Channel`.

    ``uid``/``gid``/``pid`` go into every in_header; ``umask`` is applied the way the kernel
    does (by us unless the server negotiates DONT_MASK, and sent along in MKNOD/MKDIR/CREATE).
    ``timeout`` bounds every request (None: the server's ``request_timeout`` if it set one,
    else wait forever); on expiry an INTERRUPT is sent. ``max_inodes`` bounds the inode table:
    unused inodes past it are forgotten (BATCH_FORGET, up to ``forget_batch`` at a time).
    """

    def __init__(self, channel: Channel, *, cache: CacheMode = "auto", writeback: bool = False,
                 uid: int = 0, gid: int = 0, pid: int | None = None, umask: int = 0o022,
                 timeout: float | None = 60.0, max_inodes: int = 8192, forget_batch: int = 64,
                 readdir_size: int = PAGE_SIZE, data_cache_bytes: int = 64 << 20,
                 dirty_limit: int = 8 << 20, init_flags: InitFlags = LINUX_INIT_FLAGS,
                 dax: object = False) -> None:
        if cache not in ("none", "auto", "always"):
            raise ValueError(f"cache must be none, auto or always, not {cache!r}")
        self.channel = channel
        self.cache: CacheMode = cache
        self.writeback = writeback
        self.uid, self.gid = uid, gid
        self.pid = os.getpid() if pid is None else pid
        self.umask = umask
        self.timeout = timeout
        self.max_inodes = max_inodes
        self.forget_batch = max(1, forget_batch)
        self.readdir_size = readdir_size
        self.data_cache_bytes = data_cache_bytes
        self.dirty_limit = dirty_limit
        self.stats = RequestStats()
        self._unique = itertools.count(2, 2)  # kernel uniques are even (FUSE_REQ_ID_STEP)
        self._lock = threading.RLock()
        self._inodes: collections.OrderedDict[int, Inode] = collections.OrderedDict()
        self._entries: dict[tuple[int, bytes], tuple[int, float]] = {}
        self._forgets: list[tuple[int, int]] = []
        self._active = 0
        self._cached_data = 0
        self._lock_owner = itertools.count(0x5EED_0000_0001)
        self._no: set[Opcode] = set()
        """Opcodes the server answered ENOSYS to: the kernel stops sending them."""
        self._closed = False
        self._files: set[ClientFile] = set()
        self._plans: dict[Opcode, _Plan] = {}
        root = Inode(ROOT_ID)
        self._inodes[ROOT_ID] = root
        # DAX hook (issue 5, virtiofs/client/dax.py): ``dax`` is True (the channel's window) or
        # a DaxWindow; Linux offers MAP_ALIGNMENT only with -o dax.
        self.dax: DaxIO | None = None
        want_dax = dax is not None and dax is not False  # a DaxWindow with no mapping is falsy
        if want_dax:
            init_flags |= InitFlags.MAP_ALIGNMENT
        self.conn = self._init(init_flags)
        if want_dax:
            from .dax import attach_dax
            self.dax = attach_dax(self, dax)

    # ------------------------------------------------------------------------------ plumbing

    @property
    def flags(self) -> InitFlags:
        return self.conn.flags

    def _has(self, flag: InitFlags) -> bool:
        return bool(self.conn.flags & flag)

    def _plan(self, opcode: Opcode) -> _Plan:
        plan = self._plans.get(opcode)
        if plan is None:
            plan = _Plan(opcode, self.conn.minor, int(self.conn.flags))
            self._plans[opcode] = plan
        return plan

    def _transact(self, opcode: Opcode, nodeid: int, arg: Any = None,
                  names: Sequence[bytes] = (), data: Buffer = b"", *, extra: int = 0,
                  ext: Sequence[Any] = ()) -> ReplyBuffer:
        """Send one request; the caller owns (and must release) the reply buffer."""
        if self._closed:
            raise LocalProtocolError("client is closed")
        plan = self._plans.get(opcode) or self._plan(opcode)
        unique = next(self._unique)
        if ext:
            parts = encode_request_parts(opcode, unique, nodeid, arg, names, data,
                                         uid=self.uid, gid=self.gid, pid=self.pid, ext=ext,
                                         minor=self.conn.minor, flags=int(self.conn.flags))
        else:
            parts = plan.encode(unique, nodeid, arg, names, data, self.uid, self.gid, self.pid)
        self.stats[opcode] += 1
        rb = self.channel.request(parts, plan.reply_size + extra, timeout=self._timeout())
        if rb.interrupted:
            self.stats[Opcode.INTERRUPT] += 1
        return rb

    def _timeout(self) -> float | None:
        if self.timeout is not None:
            return self.timeout
        conn = getattr(self, "conn", None)
        if conn is not None and conn.request_timeout:
            return float(conn.request_timeout)
        return None

    def _call(self, opcode: Opcode, nodeid: int, arg: Any = None, names: Sequence[bytes] = (),
              data: Buffer = b"", *, extra: int = 0, xattr_size: int | None = None,
              ext: Sequence[Any] = (), path: PathLike | None = None,
              path2: PathLike | None = None) -> Any:
        """One request → the reply's value; errno replies raise OSError."""
        plan = self._plans.get(opcode) or self._plan(opcode)
        with self._transact(opcode, nodeid, arg, names, data, extra=extra, ext=ext) as rb:
            err, value = plan.decode(rb.view, xattr_size)
        if err:
            if err == E.ENOSYS:
                self._no.add(opcode)
            _raise(err, path, path2)
        return value

    def _send_noreply(self, opcode: Opcode, nodeid: int, arg: Any,
                      items: Sequence[Any] = ()) -> None:
        parts = encode_request_parts(opcode, next(self._unique), nodeid, arg, items=items,
                                     uid=self.uid, gid=self.gid, pid=self.pid,
                                     minor=self.conn.minor, flags=int(self.conn.flags))
        self.stats[opcode] += 1
        self.channel.send(parts)

    # ------------------------------------------------------------------------------ INIT

    def _init(self, offer: InitFlags) -> Negotiated:
        """FUSE_INIT as ``fuse_send_init``; checks the answer as ``process_init_reply``."""
        arg = S.InitIn(KERNEL_VERSION, KERNEL_MINOR_VERSION, READAHEAD,
                       int(offer) & 0xFFFFFFFF, int(offer) >> 32)
        parts = encode_request_parts(Opcode.INIT, next(self._unique), 0, arg,
                                     uid=self.uid, gid=self.gid, pid=self.pid)
        self.stats[Opcode.INIT] += 1
        with self.channel.request(parts, OUT_HEADER_SIZE + _INIT_OUT.size,
                                  timeout=self.timeout) as rb:
            view = rb.view
            head = _OUT.unpack(view)
            body = bytes(view[OUT_HEADER_SIZE:])
        if head.error:
            if not -512 < head.error < 0 or body:
                raise ReplyError(f"INIT error reply {head.error} with {len(body)} body bytes",
                                 opcode=Opcode.INIT, field="error")
            raise ConnectionRefusedError(E.ECONNREFUSED,
                                         f"INIT refused: {os.strerror(-head.error)}")
        # out_argvar: INIT replies may be shorter than 64 bytes (older servers); the rest reads
        # as zeros, as in the kernel's copy_out_args.
        if len(body) < 8:
            raise ReplyError(f"INIT reply body of {len(body)} bytes", opcode=Opcode.INIT,
                             field="len")
        out = _INIT_OUT.unpack(body + bytes(_INIT_OUT.size - len(body)))
        if out.major != KERNEL_VERSION:
            # process_init_reply: a major other than ours fails the connection (ECONNREFUSED).
            raise ConnectionRefusedError(E.ECONNREFUSED,
                                         f"server speaks FUSE {out.major}.{out.minor}")
        minor = min(out.minor, KERNEL_MINOR_VERSION)
        raw = out.flags
        if out.flags & InitFlags.INIT_EXT:
            raw |= out.flags2 << 32
        flags = InitFlags(raw & int(offer))
        max_write = max(4096, out.max_write if minor >= 5 else 4096)
        if flags & InitFlags.MAX_PAGES:
            max_pages = min(max(out.max_pages, 1), MAX_MAX_PAGES)
        else:
            max_pages = DEFAULT_MAX_PAGES_PER_REQ
        map_alignment = out.map_alignment if flags & InitFlags.MAP_ALIGNMENT else 0
        if map_alignment > 21:
            # fuse_dax_check_alignment: the kernel refuses DAX alignments above 2 MiB.
            raise ReplyError(f"map_alignment {map_alignment} > 21", opcode=Opcode.INIT,
                             field="map_alignment")
        tg = out.time_gran if minor >= 23 and 1 <= out.time_gran <= 10**9 else 1
        return Negotiated(
            major=out.major, minor=minor, flags=flags, max_write=max_write, max_pages=max_pages,
            max_readahead=min(out.max_readahead, READAHEAD), time_gran=tg,
            map_alignment=map_alignment,
            request_timeout=out.request_timeout if flags & InitFlags.REQUEST_TIMEOUT else 0,
            max_background=out.max_background, congestion_threshold=out.congestion_threshold)

    # ------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close open files, send queued FORGETs, then DESTROY (the kernel's unmount).

        Like the kernel (``fuse_kill_sb_anon``: ``fuse_sb_destroy`` before the inodes are
        evicted), the inodes still held are not forgotten one by one: DESTROY ends them all.
        Queued FORGETs go first and the hiprio queue is drained, so the server never sees a
        FORGET after DESTROY.
        """
        if self._closed:
            return
        try:
            for f in list(self._files):
                try:
                    f.close()
                except OSError:
                    pass
            if self.dax is not None:  # DAX hook: REMOVEMAPPING of every range first
                self.dax.close()
            self._flush_forgets(force=True)
            self.channel.drain(5.0)
            try:
                self._call(Opcode.DESTROY, 0)
            except OSError:
                pass
        finally:
            self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop_caches(self) -> None:
        """Forget every cached entry, attribute, data block and unused inode (``echo 3 >
        /proc/sys/vm/drop_caches``): the unused inodes are FORGET'ed at once."""
        self.flush_all()
        with self._lock:
            self._entries.clear()
            for ino in self._inodes.values():
                ino.names.clear()
                ino.attr_expiry = 0.0
                ino.attr_stale = True
                ino.link = None
                if ino.data is not None:
                    self._cached_data -= ino.data.nbytes
                    ino.data = None
                if ino.nodeid != ROOT_ID and not ino.opens and ino.nlookup:
                    self._forgets.append((ino.nodeid, ino.nlookup))
                    ino.nlookup = 0
            for nodeid in [n for n, i in self._inodes.items() if n != ROOT_ID and not i.opens]:
                del self._inodes[nodeid]
                if self.dax is not None:  # DAX hook: ranges go back before the FORGET
                    self.dax.forget(nodeid)
        self._flush_forgets(force=True)

    def flush_all(self) -> None:
        """Write out every file's held (writeback) data."""
        for f in list(self._files):
            if f.writable_flag:
                f.flush()

    # ------------------------------------------------------------------------------ inodes

    def _enter(self) -> None:
        with self._lock:
            self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and len(self._inodes) > self.max_inodes:
                self._evict()
        if len(self._forgets) >= self.forget_batch:
            self._flush_forgets()

    def _evict(self) -> None:
        """Drop least-recently-used inodes nobody holds, queueing their FORGETs."""
        excess = len(self._inodes) - self.max_inodes
        victims = []
        for nodeid, ino in self._inodes.items():
            if excess <= 0:
                break
            if nodeid == ROOT_ID or ino.opens or ino.dirty:
                continue
            victims.append(ino)
            excess -= 1
        for ino in victims:
            self._drop_inode(ino)

    def _drop_inode(self, ino: Inode) -> None:
        del self._inodes[ino.nodeid]
        for key in ino.names:
            self._entries.pop(key, None)
        ino.names.clear()
        if ino.data is not None:
            self._cached_data -= ino.data.nbytes
            ino.data = None
        if self.dax is not None:  # DAX hook: ranges go back before the FORGET
            self.dax.forget(ino.nodeid)
        if ino.nlookup:
            self._forgets.append((ino.nodeid, ino.nlookup))
            ino.nlookup = 0

    def _flush_forgets(self, force: bool = False) -> None:
        """Send queued FORGETs: one FORGET for a single inode, BATCH_FORGET otherwise."""
        with self._lock:
            if not self._forgets or (not force and len(self._forgets) < self.forget_batch):
                return
            todo, self._forgets = self._forgets, []
        # 256 entries keep a BATCH_FORGET within one page of entries, like the kernel's
        # fuse_read_batch_forget, which sizes its batches to the reader's buffer.
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            if len(chunk) == 1:
                nodeid, n = chunk[0]
                self._send_noreply(Opcode.FORGET, nodeid, S.ForgetIn(n))
            else:
                self._send_noreply(Opcode.BATCH_FORGET, 0, S.BatchForgetIn(len(chunk)),
                                   [S.ForgetOne(n, c) for n, c in chunk])

    def _check_attr(self, attr: S.Attr, opcode: Opcode) -> None:
        # fuse_invalid_attr: an unknown file type or a size past LLONG_MAX is EIO.
        if stat.S_IFMT(attr.mode) not in _VALID_TYPES or attr.size > LLONG_MAX:
            raise ReplyError(f"{opcode.name} reply with invalid attributes (mode "
                             f"{attr.mode:#o}, size {attr.size})", opcode=opcode, field="attr")

    def _got_entry(self, entry: S.EntryOut, opcode: Opcode, parent: int | None,
                   name: bytes | None, want_type: int | None = None) -> Inode:
        """Account one lookup reference the server gave us and cache what came with it."""
        if entry.nodeid == 0 or (entry.nodeid == ROOT_ID and opcode is not Opcode.LOOKUP):
            raise ReplyError(f"{opcode.name} reply with nodeid {entry.nodeid}", opcode=opcode,
                             field="nodeid")
        self._check_attr(entry.attr, opcode)
        if want_type is not None and attr_type(entry.attr) != want_type:
            raise ReplyError(f"{opcode.name} made a {attr_type(entry.attr):#o} where a "
                             f"{want_type:#o} was asked for", opcode=opcode, field="attr.mode")
        generation = 0 if entry.nodeid == ROOT_ID else entry.generation
        now = time.monotonic()
        with self._lock:
            ino = self._inodes.get(entry.nodeid)
            if ino is None:
                ino = Inode(entry.nodeid, generation)
                self._inodes[entry.nodeid] = ino
            else:
                self._inodes.move_to_end(entry.nodeid)
                if ino.generation != generation or (ino.attr is not None
                                                    and ino.type != attr_type(entry.attr)):
                    # fuse_iget: same nodeid, another generation or file type: a new inode.
                    self._reset_inode(ino)
                    ino.generation = generation
            if entry.nodeid != ROOT_ID:
                ino.nlookup += 1
            self._set_attr(ino, entry.attr, expiry(entry.attr_valid, entry.attr_valid_nsec, now))
            if parent is not None and name is not None and self.cache != "none":
                key = (parent, name)
                self._entries[key] = (entry.nodeid,
                                      expiry(entry.entry_valid, entry.entry_valid_nsec, now))
                ino.names.add(key)
        return ino

    def _reset_inode(self, ino: Inode) -> None:
        ino.attr, ino.attr_expiry, ino.link, ino.bad = None, 0.0, None, False
        ino.attr_stale = False
        if ino.data is not None:
            self._cached_data -= ino.data.nbytes
            ino.data = None

    def _set_attr(self, ino: Inode, attr: S.Attr, deadline: float) -> None:
        if ino.data is not None and ino.data.stamp is not None:
            stamp = (attr.mtime, attr.mtimensec, attr.size)
            if stamp != ino.data.stamp:
                # FUSE_AUTO_INVAL_DATA: size or mtime moved under us, the pages are stale.
                self._cached_data -= ino.data.nbytes
                ino.data.clear()
        ino.attr = attr
        ino.attr_expiry = deadline
        ino.attr_stale = False

    def _attr_fresh(self, ino: Inode) -> bool:
        if self.cache == "none" or ino.attr is None or ino.attr_stale:
            return False
        return self.cache == "always" or time.monotonic() < ino.attr_expiry

    def _invalidate_attr(self, ino: Inode | int | None) -> None:
        if isinstance(ino, int):
            ino = self._inodes.get(ino)
        if ino is not None:
            # "always" trusts attributes whatever the timeout, so a change we made must mark
            # them stale or the next stat would not ask.
            ino.attr_expiry = 0.0
            ino.attr_stale = True

    def _drop_entry(self, parent: int, name: bytes) -> None:
        with self._lock:
            hit = self._entries.pop((parent, name), None)
            if hit is not None:
                ino = self._inodes.get(hit[0])
                if ino is not None:
                    ino.names.discard((parent, name))

    # ------------------------------------------------------------------------------ paths

    def _lookup(self, parent: int, name: bytes, path: PathLike) -> Inode:
        if name == b".":
            return self._inodes[parent]
        if self.cache != "none":
            hit = self._entries.get((parent, name))
            if hit is not None and (self.cache == "always" or time.monotonic() < hit[1]):
                if hit[0] == 0:
                    _raise(E.ENOENT, path)
                ino = self._inodes.get(hit[0])
                if ino is not None:
                    with self._lock:
                        if ino.nodeid in self._inodes:
                            self._inodes.move_to_end(ino.nodeid)
                    return ino
        if len(name) > 1024:
            # The kernel never sends a name past FUSE_NAME_MAX (1024); shorter over-long
            # names are the server's to refuse (ENAMETOOLONG from its filesystem).
            _raise(E.ENAMETOOLONG, path)
        entry: S.EntryOut = self._call(Opcode.LOOKUP, parent, None, (name,), path=path)
        if entry.nodeid == 0:
            # A negative entry: ENOENT, cached for entry_valid (fuse_lookup_name).
            if self.cache != "none":
                with self._lock:
                    self._entries[(parent, name)] = (0, expiry(entry.entry_valid,
                                                               entry.entry_valid_nsec))
            _raise(E.ENOENT, path)
        return self._got_entry(entry, Opcode.LOOKUP, parent, name)

    def _walk(self, path: PathLike, stack: list[int] | None = None,
              links: int = 0) -> tuple[list[int], bytes, int]:
        """Resolve all but the last component of ``path`` (relative to the directory stack
        ``stack``, the root when None; an absolute path restarts at the root).

        Returns the stack of directory nodeids (``..`` pops it, as the kernel follows dentry
        parents, so ``..`` at the root stays there), the last name and the symlinks followed
        so far (ELOOP past MAXSYMLINKS).
        """
        raw = _fs_bytes(path)
        comps = [c for c in raw.split(b"/") if c]
        stack = [ROOT_ID] if stack is None or raw.startswith(b"/") else list(stack)
        i = 0
        while i < len(comps) - 1:
            c = comps[i]
            i += 1
            if c == b".":
                continue
            if c == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            ino = self._lookup(stack[-1], c, path)
            if ino.type == stat.S_IFLNK:
                links += 1
                if links > MAX_SYMLINKS:
                    _raise(E.ELOOP, path)
                target = self._readlink_ino(ino, path)
                if target.startswith(b"/"):
                    stack = [ROOT_ID]
                comps = [t for t in target.split(b"/") if t] + comps[i:]
                i = 0
                continue
            if ino.type != stat.S_IFDIR:
                _raise(E.ENOTDIR, path)
            stack.append(ino.nodeid)
        return stack, (comps[-1] if comps else b"."), links

    def _resolve(self, path: PathLike, follow: bool = True) -> Inode:
        """The inode a path names (following a final symlink when ``follow``)."""
        if path == "/" or path == b"/":
            return self._inodes[ROOT_ID]
        stack, last, links = self._walk(path)
        trailing_slash = _fs_bytes(path).endswith(b"/")
        while True:
            if last == b"..":
                if len(stack) > 1:
                    stack.pop()
                return self._inodes_get(stack[-1])
            if last == b".":
                return self._inodes_get(stack[-1])
            ino = self._lookup(stack[-1], last, path)
            if ino.type != stat.S_IFLNK or not (follow or trailing_slash):
                if trailing_slash and ino.type != stat.S_IFDIR:
                    _raise(E.ENOTDIR, path)
                return ino
            links += 1
            if links > MAX_SYMLINKS:
                _raise(E.ELOOP, path)
            target = self._readlink_ino(ino, path)
            stack, last, links = self._walk(target, stack, links)

    def _inodes_get(self, nodeid: int) -> Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:  # pragma: no cover - held directories are never evicted mid-walk
            raise LocalProtocolError(f"inode {nodeid} vanished during a walk")
        return ino

    def _parent(self, path: PathLike) -> tuple[int, bytes]:
        """(parent nodeid, final name) for operations that create or remove a name."""
        stack, last, _ = self._walk(path)
        if last in (b".", b".."):
            _raise(E.EINVAL if last == b"." else E.ENOTEMPTY, path)
        parent = self._inodes_get(stack[-1])
        if parent.type not in (0, stat.S_IFDIR):
            _raise(E.ENOTDIR, path)
        return parent.nodeid, last

    # ------------------------------------------------------------------------------ attributes

    def _getattr(self, ino: Inode, fh: int | None = None, path: PathLike | None = None) -> S.Attr:
        if ino.dirty:
            self._write_dirty(ino)
        if ino.bad:
            _raise(E.EIO, path)
        if self._attr_fresh(ino):
            assert ino.attr is not None
            return ino.attr
        arg = S.GetattrIn(GetattrFlags.FH if fh is not None else 0, 0, fh or 0)
        out: S.AttrOut = self._call(Opcode.GETATTR, ino.nodeid, arg, path=path)
        self._take_attr(ino, out, Opcode.GETATTR)
        assert ino.attr is not None
        return ino.attr

    def _take_attr(self, ino: Inode, out: S.AttrOut, opcode: Opcode) -> None:
        self._check_attr(out.attr, opcode)
        with self._lock:
            if ino.attr is not None and ino.type != attr_type(out.attr):
                # fuse_change_attributes on a type change: fuse_make_bad(), EIO from now on.
                ino.bad = True
                raise ReplyError(f"{opcode.name} changed the file type of nodeid {ino.nodeid} "
                                 f"from {ino.type:#o} to {attr_type(out.attr):#o}",
                                 opcode=opcode, field="attr.mode")
            self._set_attr(ino, out.attr, expiry(out.attr_valid, out.attr_valid_nsec))

    def getattr(self, nodeid: int = ROOT_ID) -> S.Attr:
        """Attributes of a nodeid the client holds (cached per the cache mode)."""
        self._enter()
        try:
            return self._getattr(self._inodes_get(nodeid))
        finally:
            self._leave()

    def stat(self, path: PathLike, *, follow_symlinks: bool = True) -> os.stat_result:
        """``os.stat`` of a path."""
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            return stat_result(self._getattr(ino, path=path))
        finally:
            self._leave()

    def lstat(self, path: PathLike) -> os.stat_result:
        """``os.lstat``: a final symlink is not followed."""
        return self.stat(path, follow_symlinks=False)

    def exists(self, path: PathLike) -> bool:
        try:
            self.stat(path)
        except FileNotFoundError:
            return False
        return True

    def isdir(self, path: PathLike) -> bool:
        try:
            return stat.S_ISDIR(self.stat(path).st_mode)
        except FileNotFoundError:
            return False

    def isfile(self, path: PathLike) -> bool:
        try:
            return stat.S_ISREG(self.stat(path).st_mode)
        except FileNotFoundError:
            return False

    def _setattr(self, ino: Inode, arg: S.SetattrIn, path: PathLike | None) -> S.Attr:
        out: S.AttrOut = self._call(Opcode.SETATTR, ino.nodeid, arg, path=path)
        self._take_attr(ino, out, Opcode.SETATTR)
        assert ino.attr is not None
        return ino.attr

    def chmod(self, path: PathLike, mode: int, *, follow_symlinks: bool = True) -> None:
        """``os.chmod``."""
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            self._setattr(ino, S.SetattrIn(valid=SetattrValid.MODE, mode=mode & 0o7777), path)
        finally:
            self._leave()

    def chown(self, path: PathLike, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """``os.chown`` (-1 leaves an id unchanged)."""
        valid = 0
        if uid != -1:
            valid |= SetattrValid.UID
        if gid != -1:
            valid |= SetattrValid.GID
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            mode = 0
            if valid and ino.type != stat.S_IFDIR:
                # chown_common + notify_change: a chown of a non-directory kills set-user-ID
                # (and set-group-ID when group-executable); the VFS folds that into the same
                # SETATTR as a mode change, whatever the server (fs/attr.c).
                cur = self._getattr(ino, path=path).mode
                kill = cur & stat.S_ISUID
                if cur & stat.S_ISGID and cur & stat.S_IXGRP:
                    kill |= stat.S_ISGID
                if kill:
                    valid |= SetattrValid.MODE
                    mode = cur & 0o7777 & ~kill
            self._setattr(ino, S.SetattrIn(valid=valid, uid=max(uid, 0), gid=max(gid, 0),
                                           mode=mode), path)
        finally:
            self._leave()

    def utime(self, path: PathLike, times: tuple[float, float] | None = None, *,
              ns: tuple[int, int] | None = None, follow_symlinks: bool = True) -> None:
        """``os.utime``: explicit times, or "now" (FATTR_ATIME_NOW | FATTR_MTIME_NOW)."""
        if times is not None and ns is not None:
            raise ValueError("utime: give times or ns, not both")
        if times is not None:
            ns = (int(times[0] * 1e9), int(times[1] * 1e9))
        if ns is None:
            arg = S.SetattrIn(valid=SetattrValid.ATIME | SetattrValid.MTIME
                              | SetattrValid.ATIME_NOW | SetattrValid.MTIME_NOW)
        else:
            a, m = ns
            arg = S.SetattrIn(valid=SetattrValid.ATIME | SetattrValid.MTIME,
                              atime=(a // 10**9) & (2**64 - 1), atimensec=a % 10**9,
                              mtime=(m // 10**9) & (2**64 - 1), mtimensec=m % 10**9)
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            self._setattr(ino, arg, path)
        finally:
            self._leave()

    def truncate(self, path: PathLike, length: int) -> None:
        """``os.truncate``."""
        if length < 0:
            _raise(E.EINVAL, path)
        self._enter()
        try:
            ino = self._resolve(path, True)
            if ino.type == stat.S_IFDIR:
                _raise(E.EISDIR, path)
            if ino.dirty:
                self._write_dirty(ino)
            self._setattr(ino, S.SetattrIn(valid=SetattrValid.SIZE, size=length), path)
            self._truncate_cache(ino, length)
        finally:
            self._leave()

    def _truncate_cache(self, ino: Inode, length: int) -> None:
        with self._lock:
            if ino.data is not None:
                before = ino.data.nbytes
                ino.data.truncate(length)
                self._cached_data -= before - ino.data.nbytes
                ino.data.stamp = None if ino.attr is None else \
                    (ino.attr.mtime, ino.attr.mtimensec, ino.attr.size)

    # ------------------------------------------------------------------------------ namespace

    def _secctx(self) -> tuple[Any, ...]:
        # With FUSE_SECURITY_CTX the kernel always appends a context block to the create
        # family; with no LSM answering it carries zero contexts (fs/fuse/dir.c).
        return (SecurityContext(()),) if self._has(InitFlags.SECURITY_CTX) else ()

    def _mode_umask(self, mode: int) -> tuple[int, int]:
        if not self._has(InitFlags.DONT_MASK):
            mode &= ~self.umask
        return mode, self.umask

    def _created(self, entry: S.EntryOut, opcode: Opcode, parent: int, name: bytes,
                 kind: int) -> Inode:
        ino = self._got_entry(entry, opcode, parent, name, kind)
        self._invalidate_attr(parent)
        return ino

    def mkdir(self, path: PathLike, mode: int = 0o777) -> None:
        """``os.mkdir``."""
        self._enter()
        try:
            parent, name = self._parent(path)
            m, um = self._mode_umask(mode & 0o7777)
            entry = self._call(Opcode.MKDIR, parent, S.MkdirIn(m | stat.S_IFDIR, um), (name,),
                               ext=self._secctx(), path=path)
            self._drop_entry(parent, name)
            self._created(entry, Opcode.MKDIR, parent, name, stat.S_IFDIR)
        finally:
            self._leave()

    def makedirs(self, path: PathLike, mode: int = 0o777, exist_ok: bool = False) -> None:
        """``os.makedirs``."""
        raw = _fs_bytes(path)
        comps = [c for c in raw.split(b"/") if c]
        for i in range(1, len(comps) + 1):
            sub = b"/" + b"/".join(comps[:i])
            try:
                self.mkdir(sub, mode)
            except FileExistsError:
                if i == len(comps) and not exist_ok:
                    raise

    def mknod(self, path: PathLike, mode: int = 0o100600, device: int = 0) -> None:
        """``os.mknod``."""
        self._enter()
        try:
            parent, name = self._parent(path)
            kind = stat.S_IFMT(mode) or stat.S_IFREG
            m, um = self._mode_umask(mode & 0o7777)
            entry = self._call(Opcode.MKNOD, parent, S.MknodIn(m | kind, device, um), (name,),
                               ext=self._secctx(), path=path)
            self._drop_entry(parent, name)
            self._created(entry, Opcode.MKNOD, parent, name, kind)
        finally:
            self._leave()

    def symlink(self, target: PathLike, path: PathLike) -> None:
        """``os.symlink(target, path)``: create ``path`` pointing at ``target``."""
        self._enter()
        try:
            parent, name = self._parent(path)
            entry = self._call(Opcode.SYMLINK, parent, None, (name, _fs_bytes(target)),
                               ext=self._secctx(), path=path)
            self._drop_entry(parent, name)
            self._created(entry, Opcode.SYMLINK, parent, name, stat.S_IFLNK)
        finally:
            self._leave()

    def link(self, src: PathLike, dst: PathLike) -> None:
        """``os.link`` (a hard link; ``src`` is not followed if it is a symlink)."""
        self._enter()
        try:
            ino = self._resolve(src, False)
            if ino.type == stat.S_IFDIR:
                _raise(E.EPERM, src, dst)
            parent, name = self._parent(dst)
            entry = self._call(Opcode.LINK, parent, S.LinkIn(ino.nodeid), (name,),
                               path=src, path2=dst)
            self._drop_entry(parent, name)
            self._created(entry, Opcode.LINK, parent, name, ino.type or attr_type(entry.attr))
            self._invalidate_attr(ino)
        finally:
            self._leave()

    def _readlink_ino(self, ino: Inode, path: PathLike) -> bytes:
        if ino.link is not None and self.cache != "none":
            return ino.link
        target: bytes = self._call(Opcode.READLINK, ino.nodeid, extra=PATH_MAX, path=path)
        if not target or b"\0" in target:
            raise ReplyError(f"READLINK answered {target[:40]!r}", opcode=Opcode.READLINK,
                             field="data")
        if self._has(InitFlags.CACHE_SYMLINKS) and self.cache != "none":
            ino.link = target
        return target

    def readlink(self, path: PathLike) -> str | bytes:
        """``os.readlink`` (bytes in, bytes out)."""
        self._enter()
        try:
            ino = self._resolve(path, False)
            if ino.type != stat.S_IFLNK:
                _raise(E.EINVAL, path)
            target = self._readlink_ino(ino, path)
        finally:
            self._leave()
        return target if isinstance(path, bytes) else os.fsdecode(target)

    def unlink(self, path: PathLike) -> None:
        """``os.unlink``."""
        self._remove(path, Opcode.UNLINK)

    remove = unlink

    def rmdir(self, path: PathLike) -> None:
        """``os.rmdir``."""
        self._remove(path, Opcode.RMDIR)

    def _remove(self, path: PathLike, opcode: Opcode) -> None:
        self._enter()
        try:
            parent, name = self._parent(path)
            # The VFS looks the victim up first (may_delete): ENOENT, EISDIR and ENOTDIR never
            # reach the server, and servers rely on it (C virtiofsd answers EIO to an UNLINK
            # or RMDIR of a name it does not know).
            victim = self._lookup(parent, name, path)
            if opcode is Opcode.RMDIR and victim.type != stat.S_IFDIR:
                _raise(E.ENOTDIR, path)
            if opcode is Opcode.UNLINK and victim.type == stat.S_IFDIR:
                _raise(E.EISDIR, path)
            self._drop_entry(parent, name)
            self._call(opcode, parent, None, (name,), path=path)
            self._invalidate_attr(parent)
            # nlink dropped (fs/fuse/dir.c: drop_nlink + invalidate).
            self._invalidate_attr(victim)
        finally:
            self._leave()

    def rename(self, src: PathLike, dst: PathLike, flags: int = 0) -> None:
        """``os.rename`` / renameat2: ``flags`` are ``RenameFlags`` (NOREPLACE, EXCHANGE,
        WHITEOUT). Plain renames use RENAME, flagged ones RENAME2 (fuse_rename2)."""
        self._enter()
        try:
            sp, sn = self._parent(src)
            dp, dn = self._parent(dst)
            # As the VFS: the source must exist (servers such as C virtiofsd answer EIO for an
            # unknown one), and so must the target of an exchange.
            self._lookup(sp, sn, src)
            if flags & RenameFlags.EXCHANGE:
                self._lookup(dp, dn, dst)
            if flags:
                if Opcode.RENAME2 in self._no or self.conn.minor < 23:
                    _raise(E.EINVAL, src, dst)
                try:
                    self._call(Opcode.RENAME2, sp, S.Rename2In(dp, flags), (sn, dn),
                               path=src, path2=dst)
                except OSError as e:
                    # fuse_rename2: a server without RENAME2 makes flagged renames EINVAL.
                    if e.errno == E.ENOSYS:
                        _raise(E.EINVAL, src, dst)
                    raise
            else:
                self._call(Opcode.RENAME, sp, S.RenameIn(dp), (sn, dn), path=src, path2=dst)
            for key in ((sp, sn), (dp, dn)):
                hit = self._entries.get(key)
                if hit is not None:
                    self._invalidate_attr(hit[0])
                self._drop_entry(*key)
            self._invalidate_attr(sp)
            self._invalidate_attr(dp)
        finally:
            self._leave()

    def replace(self, src: PathLike, dst: PathLike) -> None:
        """``os.replace``."""
        self.rename(src, dst)

    # ------------------------------------------------------------------------------ directories

    def _opendir(self, ino: Inode, path: PathLike) -> int | None:
        if Opcode.OPENDIR in self._no and self._has(InitFlags.NO_OPENDIR_SUPPORT):
            return None
        try:
            out: S.OpenOut = self._call(Opcode.OPENDIR, ino.nodeid, S.OpenIn(os.O_RDONLY),
                                        path=path)
        except OSError as e:
            if e.errno == E.ENOSYS and self._has(InitFlags.NO_OPENDIR_SUPPORT):
                return None
            raise
        return out.fh

    def _iterdir(self, ino: Inode, path: PathLike, plus: bool | None = None) -> Iterator[DirEntry]:
        """Every entry of a directory, READDIR(PLUS) continued from each last cookie."""
        fh = self._opendir(ino, path)
        try:
            offset = 0
            seen: set[int] = set()
            use_plus = self._has(InitFlags.DO_READDIRPLUS) if plus is None else plus
            while True:
                # fuse_use_readdirplus: with READDIRPLUS_AUTO only the first call is "plus".
                this_plus = use_plus and (offset == 0
                                          or not self._has(InitFlags.READDIRPLUS_AUTO))
                op = Opcode.READDIRPLUS if this_plus else Opcode.READDIR
                data: bytes = self._call(op, ino.nodeid,
                                         S.ReadIn(fh or 0, offset, self.readdir_size),
                                         extra=self.readdir_size, path=path)
                try:
                    entries = decode_dirents(data, plus=this_plus)
                except ProtocolError as e:
                    raise ReplyError(e.what, opcode=op, field=e.field, offset=e.offset) from None
                if not entries:
                    return
                for d in entries:
                    if this_plus and d.entry is not None and d.entry.nodeid \
                            and d.name not in (b".", b".."):
                        # Every named READDIRPLUS entry with a nodeid is a lookup reference
                        # (fuse_direntplus_link), cached like a LOOKUP answer.
                        self._drop_entry(ino.nodeid, d.name)
                        self._got_entry(d.entry, op, ino.nodeid, d.name)
                    if d.offset in seen:
                        raise ReplyError(f"READDIR cookie {d.offset} repeats", opcode=op,
                                         field="off")
                    seen.add(d.offset)
                    yield d
                offset = entries[-1].offset
        finally:
            if fh is not None:
                try:
                    self._call(Opcode.RELEASEDIR, ino.nodeid, S.ReleaseIn(fh, os.O_RDONLY))
                except OSError:
                    pass

    def scandir(self, path: PathLike = "/") -> Iterator[DirEntryInfo]:
        """``os.scandir``: entries other than ``.`` and ``..``, with their types."""
        as_bytes = isinstance(path, bytes)
        base = _fs_bytes(path).rstrip(b"/")
        self._enter()
        try:
            ino = self._resolve(path, True)
            if ino.type not in (0, stat.S_IFDIR):
                _raise(E.ENOTDIR, path)
            out: list[DirEntryInfo] = []
            for d in self._iterdir(ino, path):
                if d.name in (b".", b".."):
                    continue
                full = base + b"/" + d.name
                st = None
                if d.entry is not None and d.entry.nodeid:
                    st = stat_result(d.entry.attr)
                out.append(DirEntryInfo(
                    d.name if as_bytes else os.fsdecode(d.name),
                    full if as_bytes else os.fsdecode(full), d.ino, d.type, self, st))
        finally:
            self._leave()
        return iter(out)

    def listdir(self, path: PathLike = "/") -> list[Any]:
        """``os.listdir``: names (str, or bytes for a bytes path) without ``.`` and ``..``."""
        as_bytes = isinstance(path, bytes)
        self._enter()
        try:
            ino = self._resolve(path, True)
            if ino.type not in (0, stat.S_IFDIR):
                _raise(E.ENOTDIR, path)
            names = [d.name for d in self._iterdir(ino, path) if d.name not in (b".", b"..")]
        finally:
            self._leave()
        return names if as_bytes else [os.fsdecode(n) for n in names]

    # ------------------------------------------------------------------------------ xattrs

    def _xattr_guard(self, opcode: Opcode, path: PathLike) -> None:
        # fuse_xattr.c: after ENOSYS the kernel answers EOPNOTSUPP without asking again.
        if opcode in self._no:
            _raise(E.EOPNOTSUPP, path)

    def _xattr_call(self, opcode: Opcode, path: PathLike, *args: Any, **kw: Any) -> Any:
        self._xattr_guard(opcode, path)
        try:
            return self._call(opcode, *args, path=path, **kw)
        except OSError as e:
            if e.errno == E.ENOSYS:
                _raise(E.EOPNOTSUPP, path)
            raise

    def getxattr(self, path: PathLike, attribute: str | bytes, *,
                 follow_symlinks: bool = True) -> bytes:
        """``os.getxattr``."""
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            value: bytes = self._xattr_call(Opcode.GETXATTR, path, ino.nodeid,
                                            S.GetxattrIn(XATTR_SIZE_MAX),
                                            (_fs_bytes(attribute),), extra=XATTR_SIZE_MAX,
                                            xattr_size=XATTR_SIZE_MAX)
            return value
        finally:
            self._leave()

    def setxattr(self, path: PathLike, attribute: str | bytes, value: bytes, flags: int = 0, *,
                 follow_symlinks: bool = True) -> None:
        """``os.setxattr`` (``flags``: ``os.XATTR_CREATE`` / ``os.XATTR_REPLACE``)."""
        if len(value) > XATTR_SIZE_MAX:
            _raise(E.E2BIG, path)
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            self._xattr_call(Opcode.SETXATTR, path, ino.nodeid, S.SetxattrIn(len(value), flags),
                             (_fs_bytes(attribute),), value)
            self._invalidate_attr(ino)
        finally:
            self._leave()

    def listxattr(self, path: PathLike = "/", *, follow_symlinks: bool = True) -> list[str]:
        """``os.listxattr``."""
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            raw: bytes = self._xattr_call(Opcode.LISTXATTR, path, ino.nodeid,
                                          S.GetxattrIn(XATTR_LIST_MAX), extra=XATTR_LIST_MAX,
                                          xattr_size=XATTR_LIST_MAX)
        finally:
            self._leave()
        if raw and not raw.endswith(b"\0"):
            # fuse_listxattr: a list not made of NUL-terminated names is EIO.
            raise ReplyError("LISTXATTR data is not NUL-terminated", opcode=Opcode.LISTXATTR,
                             field="data")
        return [os.fsdecode(n) for n in raw.split(b"\0")[:-1]] if raw else []

    def removexattr(self, path: PathLike, attribute: str | bytes, *,
                    follow_symlinks: bool = True) -> None:
        """``os.removexattr``."""
        self._enter()
        try:
            ino = self._resolve(path, follow_symlinks)
            self._xattr_call(Opcode.REMOVEXATTR, path, ino.nodeid, None, (_fs_bytes(attribute),))
            self._invalidate_attr(ino)
        finally:
            self._leave()

    # ------------------------------------------------------------------------------ misc

    def statfs(self, path: PathLike = "/") -> os.statvfs_result:
        """``os.statvfs``."""
        self._enter()
        try:
            ino = self._resolve(path, True)
            out: S.StatfsOut = self._call(Opcode.STATFS, ino.nodeid, path=path)
        finally:
            self._leave()
        st = out.st
        return os.statvfs_result((st.bsize, st.frsize, st.blocks, st.bfree, st.bavail,
                                  st.files, st.ffree, st.ffree, 0, st.namelen))

    statvfs = statfs

    def access(self, path: PathLike, mode: int) -> bool:
        """``os.access``: False for a missing path or a refusal, as the kernel decides it
        without ``default_permissions``: ACCESS to the server (ENOSYS: allowed from then on,
        ``fuse_access``), except that executing a regular file with no x bit is refused
        outright (``fuse_permission``'s MAY_EXEC rule, which binds root too)."""
        self._enter()
        try:
            try:
                ino = self._resolve(path, True)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                return False
            if mode == os.F_OK:
                return True
            if mode & os.X_OK and ino.type == stat.S_IFREG:
                if not self._getattr(ino, path=path).mode & 0o111:
                    return False
            if Opcode.ACCESS in self._no:
                return True
            try:
                self._call(Opcode.ACCESS, ino.nodeid, S.AccessIn(mode), path=path)
            except OSError as e:
                if e.errno == E.ENOSYS:
                    return True
                if e.errno in (E.EACCES, E.EPERM, E.EROFS):
                    return False
                raise
            return True
        finally:
            self._leave()

    # ------------------------------------------------------------------------------ files

    def open(self, path: PathLike, mode: str = "r", *, perm: int = 0o666,
             flags: int | None = None) -> ClientFile:
        """Open a file: a binary file object (read, write, seek, tell, truncate, flush,
        fsync, close; a context manager).  ``mode`` as Python's ``open`` (``t`` refused) or
        raw open(2) ``flags``; ``perm`` is the mode of a created file (before umask)."""
        oflags = _parse_mode(mode) if flags is None else flags
        self._enter()
        try:
            return self._open(path, oflags, perm)
        finally:
            self._leave()

    def _open(self, path: PathLike, oflags: int, perm: int) -> ClientFile:
        ino: Inode | None = None
        created = False
        out: S.OpenOut | None = None
        if oflags & os.O_CREAT:
            parent, name = self._parent(path)
            try:
                ino = self._lookup(parent, name, path)
            except FileNotFoundError:
                ino = None
            if ino is not None:
                if oflags & os.O_EXCL:
                    _raise(E.EEXIST, path)
                if ino.type == stat.S_IFLNK:
                    ino = self._resolve(path, True)
            else:
                ino, out = self._create(parent, name, oflags, perm, path)
                created = True
        else:
            ino = self._resolve(path, True)
        if ino.type == stat.S_IFDIR:
            _raise(E.EISDIR, path)
        fh = 0
        open_flags = 0
        no_release = False
        if out is not None:
            fh, open_flags = out.fh, out.open_flags
        elif created:
            no_release = True
        else:
            fh, open_flags, no_release = self._open_ino(ino, oflags, path)
        f = ClientFile(self, ino, path, fh, oflags, OpenFlags(open_flags), no_release)
        with self._lock:
            ino.opens += 1
            self._files.add(f)
            if self.cache == "auto" and not open_flags & OpenFlags.KEEP_CACHE and ino.data:
                # Close-to-open: a new open drops what an earlier one cached.
                self._cached_data -= ino.data.nbytes
                ino.data.clear()
        if oflags & os.O_TRUNC and not created:
            if not self._has(InitFlags.ATOMIC_O_TRUNC) and oflags & os.O_ACCMODE:
                self._setattr(ino, S.SetattrIn(valid=SetattrValid.SIZE | SetattrValid.FH,
                                               fh=fh, size=0), path)
            else:
                self._invalidate_attr(ino)
            self._truncate_cache(ino, 0)
        if created:
            self._invalidate_attr(ino)
        return f

    def _open_ino(self, ino: Inode, oflags: int, path: PathLike) -> tuple[int, int, bool]:
        if Opcode.OPEN in self._no and self._has(InitFlags.NO_OPEN_SUPPORT):
            return 0, 0, True
        flags = oflags & ~_OPEN_STRIP
        if not self._has(InitFlags.ATOMIC_O_TRUNC):
            flags &= ~os.O_TRUNC
        try:
            out: S.OpenOut = self._call(Opcode.OPEN, ino.nodeid, S.OpenIn(flags), path=path)
        except OSError as e:
            if e.errno == E.ENOSYS and self._has(InitFlags.NO_OPEN_SUPPORT):
                return 0, 0, True
            raise
        return out.fh, out.open_flags, False

    def _create(self, parent: int, name: bytes, oflags: int, perm: int,
                path: PathLike) -> tuple[Inode, S.OpenOut | None]:
        m, um = self._mode_umask(perm & 0o7777)
        flags = oflags & ~os.O_NOCTTY
        if not self._has(InitFlags.ATOMIC_O_TRUNC):
            flags &= ~os.O_TRUNC
        if Opcode.CREATE not in self._no:
            try:
                res = self._call(Opcode.CREATE, parent, S.CreateIn(flags, m | stat.S_IFREG, um),
                                 (name,), ext=self._secctx(), path=path)
            except OSError as e:
                if e.errno != E.ENOSYS:
                    raise
            else:
                entry, out = res
                self._drop_entry(parent, name)
                ino = self._created(entry, Opcode.CREATE, parent, name, stat.S_IFREG)
                return ino, out
        # fuse_atomic_open → fuse_mknod + open when the server has no CREATE.
        entry = self._call(Opcode.MKNOD, parent, S.MknodIn(m | stat.S_IFREG, 0, um), (name,),
                           ext=self._secctx(), path=path)
        self._drop_entry(parent, name)
        ino = self._created(entry, Opcode.MKNOD, parent, name, stat.S_IFREG)
        fh, open_flags, no_release = self._open_ino(ino, oflags & ~os.O_TRUNC, path)
        if no_release:
            return ino, None
        return ino, S.OpenOut(fh, open_flags)

    # -- data path (used by ClientFile) ---------------------------------------------------

    def _direct(self, f: ClientFile) -> bool:
        return self.cache == "none" or bool(f.open_flags & OpenFlags.DIRECT_IO)

    def _read_raw(self, f: ClientFile, offset: int, dest: memoryview) -> int:
        """One READ of ``len(dest)`` bytes at ``offset`` straight into ``dest``; returns the
        bytes the server gave (the data is copied once, from the reply buffer)."""
        size = len(dest)
        arg = S.ReadIn(f.fh, offset, size, 0, 0, f.oflags & ~_OPEN_STRIP)
        with self._transact(Opcode.READ, f.ino.nodeid, arg, extra=size) as rb:
            view = rb.view
            head = _OUT.unpack(view)
            if head.error:
                if not -512 < head.error < 0 or len(view) != OUT_HEADER_SIZE:
                    raise ReplyError(f"READ error {head.error} with {len(view)} bytes",
                                     opcode=Opcode.READ, field="error")
                err = -head.error
            else:
                err = 0
                n = len(view) - OUT_HEADER_SIZE
                dest[:n] = view[OUT_HEADER_SIZE:]
        if err:
            if err == E.ENOSYS:
                self._no.add(Opcode.READ)
            _raise(err, f.name)
        return n

    def _pread(self, f: ClientFile, dest: memoryview, offset: int) -> int:
        """Fill ``dest`` from ``offset``; fewer bytes only at end of file."""
        ino = f.ino
        if ino.dirty:
            self._write_dirty(ino)
        if not len(dest):
            return 0
        if self.dax is not None:  # DAX hook: served from the window when it can be
            got = self.dax.read(f, dest, offset)
            if got is not None:
                return got
        maxr = self.conn.max_read
        if self._direct(f):
            done = 0
            while done < len(dest):
                want = min(maxr, len(dest) - done)
                n = self._read_raw(f, offset + done, dest[done:done + want])
                done += n
                if n == 0 or (n < want and not f.open_flags & OpenFlags.DIRECT_IO):
                    break
            return done
        # Cached: the size comes from the attributes (fuse_cache_read_iter refreshes them
        # when a read reaches past the cached size, or always with AUTO_INVAL_DATA).
        attr = self._getattr(ino, f.fh, f.name)
        size = attr.size
        if offset >= size:
            return 0
        end = min(size, offset + len(dest))
        with self._lock:
            if ino.data is None:
                ino.data = DataCache(block=min(maxr, 128 * 1024))
            if ino.data.stamp is None:
                ino.data.stamp = (attr.mtime, attr.mtimensec, attr.size)
            cache = ino.data
        bs = cache.block
        first, last = offset // bs, (end - 1) // bs
        idx = first
        while idx <= last:
            if idx not in cache.blocks:
                run = idx
                while run + 1 <= last and run + 1 not in cache.blocks \
                        and (run + 2 - idx) * bs <= maxr:
                    run += 1
                buf = bytearray((run - idx + 1) * bs)
                n = self._read_raw(f, idx * bs, memoryview(buf))
                with self._lock:
                    for j in range(idx, run + 1):
                        lo = (j - idx) * bs
                        if lo >= n:
                            break
                        block = bytes(buf[lo:min(lo + bs, n)])
                        cache.blocks[j] = block
                        self._cached_data += len(block)
                if n < len(buf):
                    # Short read: the file ends earlier than the attributes said.
                    end = min(end, idx * bs + n)
                    last = (end - 1) // bs if end > offset else first - 1
                idx = run + 1
            else:
                idx += 1
        done = 0
        pos = offset
        while pos < end:
            b = cache.blocks.get(pos // bs)
            if b is None:
                break
            lo = pos - (pos // bs) * bs
            chunk = b[lo:lo + (end - pos)]
            if not chunk:
                break
            dest[done:done + len(chunk)] = chunk
            done += len(chunk)
            pos += len(chunk)
        if self._cached_data > self.data_cache_bytes:
            self._trim_data()
        return done

    def _trim_data(self) -> None:
        with self._lock:
            for ino in self._inodes.values():
                if ino.data is not None:
                    ino.data.clear()
            self._cached_data = 0

    def _write_raw(self, fh: int, ino: Inode, offset: int, data: memoryview,
                   name: PathLike) -> int:
        done = 0
        maxw = self.conn.max_io_write
        while done < len(data):
            chunk = data[done:done + maxw]
            arg = S.WriteIn(fh, offset + done, len(chunk))
            out: S.WriteOut = self._call(Opcode.WRITE, ino.nodeid, arg, (), chunk, path=name)
            if out.size > len(chunk):
                # fuse_send_write: a server claiming more than was sent is EIO.
                raise ReplyError(f"WRITE of {len(chunk)} bytes answered {out.size}",
                                 opcode=Opcode.WRITE, field="size")
            done += out.size
            if out.size < len(chunk):
                break
        with self._lock:
            if ino.data is not None:
                before = ino.data.nbytes
                ino.data.drop_range(offset, offset + max(done, 1))
                self._cached_data -= before - ino.data.nbytes
                ino.data.stamp = None
            self._invalidate_attr(ino)
        return done

    def _pwrite(self, f: ClientFile, data: memoryview, offset: int) -> int:
        ino = f.ino
        if self.dax is not None:  # DAX hook: non-extending writes go into the window
            put = self.dax.write(f, data, offset)
            if put is not None:
                return put
        if self.writeback and not self._direct(f):
            with self._lock:
                if ino.dirty is None:
                    ino.dirty = DirtyData()
                ino.dirty.add(offset, data)
                ino.dirty_fh = f.fh
                if ino.data is not None:
                    before = ino.data.nbytes
                    ino.data.drop_range(offset, offset + len(data))
                    self._cached_data -= before - ino.data.nbytes
                over = ino.dirty.nbytes > self.dirty_limit
            if over:
                self._write_dirty(ino)
            return len(data)
        return self._write_raw(f.fh, ino, offset, data, f.name)

    def _write_dirty(self, ino: Inode) -> None:
        with self._lock:
            if not ino.dirty or ino.dirty_fh is None:
                return
            extents = ino.dirty.take()
            fh = ino.dirty_fh
            ino.dirty = None
        for off, buf in extents:
            n = self._write_raw(fh, ino, off, memoryview(buf), f"nodeid {ino.nodeid}")
            if n < len(buf):
                _raise(E.EIO)

    def _release(self, f: ClientFile) -> None:
        ino = f.ino
        try:
            if ino.dirty and f.writable_flag:
                self._write_dirty(ino)
            if Opcode.FLUSH not in self._no and not f.open_flags & OpenFlags.NOFLUSH \
                    and not f.no_release:
                try:
                    self._call(Opcode.FLUSH, ino.nodeid, S.FlushIn(f.fh, lock_owner=f.owner),
                               path=f.name)
                except OSError as e:
                    if e.errno != E.ENOSYS:
                        raise
        finally:
            with self._lock:
                ino.opens -= 1
                self._files.discard(f)
            if not f.no_release:
                try:
                    self._call(Opcode.RELEASE, ino.nodeid,
                               S.ReleaseIn(f.fh, f.oflags & ~_OPEN_STRIP, 0, f.owner))
                except OSError:
                    pass  # the kernel ignores RELEASE errors (fuse_release_common)

    def _fsync(self, f: ClientFile, datasync: bool) -> None:
        if f.ino.dirty:
            self._write_dirty(f.ino)
        if Opcode.FSYNC in self._no:
            return
        try:
            self._call(Opcode.FSYNC, f.ino.nodeid, S.FsyncIn(f.fh, int(datasync)), path=f.name)
        except OSError as e:
            if e.errno != E.ENOSYS:
                raise

    def _ftruncate(self, f: ClientFile, size: int) -> None:
        ino = f.ino
        if ino.dirty:
            with self._lock:
                if ino.dirty is not None:
                    ino.dirty.truncate(size)
            self._write_dirty(ino)
        self._setattr(ino, S.SetattrIn(valid=SetattrValid.SIZE | SetattrValid.FH, fh=f.fh,
                                       size=size), f.name)
        self._truncate_cache(ino, size)

    def _size(self, f: ClientFile) -> int:
        if f.ino.dirty:
            self._write_dirty(f.ino)
        self._invalidate_attr(f.ino) if self.cache != "always" else None
        return self._getattr(f.ino, f.fh, f.name).size


class ClientFile:
    """An open file on a :class:`Client` (binary, like ``io.FileIO``)."""

    def __init__(self, client: Client, ino: Inode, name: PathLike, fh: int, oflags: int,
                 open_flags: OpenFlags, no_release: bool) -> None:
        self._client = client
        self.ino = ino
        self.name = name
        self.fh = fh
        self.oflags = oflags
        self.open_flags = open_flags
        self.no_release = no_release
        self.owner = next(client._lock_owner)
        acc = oflags & os.O_ACCMODE
        self.readable_flag = acc in (os.O_RDONLY, os.O_RDWR)
        self.writable_flag = acc in (os.O_WRONLY, os.O_RDWR)
        self.append = bool(oflags & os.O_APPEND)
        self._pos = 0
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ClientFile {os.fsdecode(self.name)!r} fh={self.fh} nodeid={self.ino.nodeid}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nodeid(self) -> int:
        return self.ino.nodeid

    def _check(self, reading: bool | None = None) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file")
        if reading is True and not self.readable_flag:
            raise OSError(E.EBADF, "file not open for reading", os.fsdecode(self.name))
        if reading is False and not self.writable_flag:
            raise OSError(E.EBADF, "file not open for writing", os.fsdecode(self.name))

    def readable(self) -> bool:
        return self.readable_flag

    def writable(self) -> bool:
        return self.writable_flag

    def seekable(self) -> bool:
        return not self.open_flags & (OpenFlags.NONSEEKABLE | OpenFlags.STREAM)

    def readinto(self, buffer: Any) -> int:
        """Read into a writable buffer; returns the bytes read (fewer only at end of file)."""
        self._check(True)
        dest = memoryview(buffer).cast("B")
        with self._lock:
            n = self.pread_into(dest, self._pos)
            self._pos += n
        return n

    def pread_into(self, buffer: Any, offset: int) -> int:
        """Read at ``offset`` without moving the position."""
        self._check(True)
        c = self._client
        c._enter()
        try:
            return c._pread(self, memoryview(buffer).cast("B"), offset)
        finally:
            c._leave()

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.pread_into(buf, offset)
        del buf[n:]
        return bytes(buf)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when ``size`` < 0)."""
        self._check(True)
        if size is None or size < 0:
            chunks = []
            step = self._client.conn.max_read
            while True:
                b = self.read(step)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def readall(self) -> bytes:
        return self.read(-1)

    def write(self, data: Any) -> int:
        """Write all of ``data`` at the position (at the end in append mode)."""
        self._check(False)
        src = memoryview(data).cast("B")
        c = self._client
        c._enter()
        try:
            with self._lock:
                if self.append:
                    self._pos = c._size(self)
                n = c._pwrite(self, src, self._pos)
                self._pos += n
            return n
        finally:
            c._leave()

    def pwrite(self, data: Any, offset: int) -> int:
        self._check(False)
        c = self._client
        c._enter()
        try:
            return c._pwrite(self, memoryview(data).cast("B"), offset)
        finally:
            c._leave()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check()
        with self._lock:
            if whence == os.SEEK_SET:
                pos = offset
            elif whence == os.SEEK_CUR:
                pos = self._pos + offset
            elif whence == os.SEEK_END:
                c = self._client
                c._enter()
                try:
                    pos = c._size(self) + offset
                finally:
                    c._leave()
            else:
                raise ValueError(f"invalid whence {whence}")
            if pos < 0:
                raise OSError(E.EINVAL, "negative seek position", os.fsdecode(self.name))
            self._pos = pos
            return pos

    def tell(self) -> int:
        self._check()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        """Set the file size (default: the current position); the position is unchanged."""
        self._check(False)
        size = self._pos if size is None else size
        if size < 0:
            raise OSError(E.EINVAL, "negative size", os.fsdecode(self.name))
        c = self._client
        c._enter()
        try:
            c._ftruncate(self, size)
        finally:
            c._leave()
        return size

    def flush(self) -> None:
        """Send the writes held back in writeback mode (no FUSE_FLUSH: that is ``close``)."""
        if self._closed:
            return
        if self.ino.dirty and self.writable_flag:
            c = self._client
            c._enter()
            try:
                c._write_dirty(self.ino)
            finally:
                c._leave()

    def fsync(self, datasync: bool = False) -> None:
        """Write held data out and ask the server to make it durable (FSYNC)."""
        self._check()
        c = self._client
        c._enter()
        try:
            c._fsync(self, datasync)
        finally:
            c._leave()

    def stat(self) -> os.stat_result:
        """``os.fstat``."""
        self._check()
        c = self._client
        c._enter()
        try:
            return stat_result(c._getattr(self.ino, self.fh, self.name))
        finally:
            c._leave()

    def close(self) -> None:
        """Flush held writes, then FLUSH and RELEASE (the kernel's close path)."""
        if self._closed:
            return
        self._closed = True
        c = self._client
        c._enter()
        try:
            c._release(self)
        finally:
            c._leave()

    def __enter__(self) -> ClientFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        """Lines, as a binary file iterates."""
        pending = b""
        while True:
            chunk = self.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if pending:
            yield pending
