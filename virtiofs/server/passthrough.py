"""``PassthroughFS``: serve a host directory as virtiofsd does, without ever leaving it.

Design (virtiofsd's ``src/passthrough``, QEMU's ``passthrough_ll.c``, SECURITY.md B1/B6):

- **Inodes** are keyed by ``(st_dev, st_ino)`` and hold an ``O_PATH`` fd; the FUSE node id is a
  counter (never a pointer, never reused within a connection), lookups are counted and FORGET
  subtracts with saturation (virtiofsd ``forget_one``: "we don't want misbehaving clients to
  cause integer overflow").  Unknown node ids and file handles answer ``EBADF``, never a crash.
- **Confinement**: every name is a single validated component (no ``/``, NUL, ``.``, ``..``,
  empty; at most 255 bytes) resolved with ``openat(parent_fd, name, O_NOFOLLOW)``; an O_PATH fd
  is ``fstat``-ed after it is opened, so a directory swapped for a symlink during a lookup is
  seen as the symlink it became and never followed.  LOOKUP("..") at the root answers the root
  (fuse-backend-rs ``test_lookup_escape_root``).  Creating opens go through ``openat2`` with
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` as a second line of defence.
  Regular files are reopened from their O_PATH fd through ``/proc/self/fd/N`` (the magic link
  points at the very inode we fstat-ed, so no name is resolved again).
- **Special files** (CVE-2020-35517): OPEN only on regular files, OPENDIR only on directories,
  ``EBADF`` otherwise, so a FIFO or device node inside the share is never opened on the host.
  CREATE always passes ``O_EXCL``; an existing name goes through the checked OPEN path.  MKNOD of
  character/block devices is refused unless ``allow_mknod``.
- **Credentials**: creating operations run with the caller's fsuid/fsgid set on the *calling
  thread* (``setfsuid``/``setfsgid`` are per-thread in the kernel and glibc does not broadcast
  them; the supplementary group of FUSE_CREATE_SUPP_GROUP is set with the raw ``setgroups``
  syscall, which is per-thread too, unlike glibc's broadcasting wrapper).  This is what
  virtiofsd does and, unlike ``fchown`` after the fact, it is right under concurrency: the
  kernel checks the directory permission, inherits a setgid directory's group and strips a
  setgid bit the caller may not set, all atomically with the creation, and no other thread's
  operations are affected.  Supplementary groups are dropped at start when running as root
  (CVE-2022-0358).  The calling thread's ``fs_struct`` is unshared (``CLONE_FS``) and its umask
  set to 0 so the request's umask is applied exactly once and per request.
- **killpriv** (HANDLE_KILLPRIV_V2): suid (and sgid when group-executable) cleared on a write
  with ``FUSE_WRITE_KILL_SUIDGID`` or by a non-root caller, on truncation with
  ``FATTR_KILL_SUIDGID`` / ``FUSE_OPEN_KILL_SUIDGID`` or by a non-root caller; the host kernel
  itself clears them on chown.  When an xattr mapping renames ``security.capability`` the mapped
  name is removed on write, truncate and chown (CVE-2021-20263), through ``/proc/self/fd`` so it
  works for O_PATH-only files too (virtiofsd b65ca73).
- **Kernel passthrough** (FUSE_PASSTHROUGH, 7.40): a regular file's O_PATH fd is registered once
  per inode with ``FUSE_DEV_IOC_BACKING_OPEN`` (the kernel insists that every passthrough open of
  an inode uses the same backing file) and closed with ``BACKING_CLOSE`` after the last release.
  Passthrough writes never reach the server, so HANDLE_KILLPRIV_V2 is given up when
  passthrough is on: the kernel then clears suid/sgid and security.capability itself (SETATTR,
  REMOVEXATTR), which reaches the mapped names too.
- **Resources** (CVE-2020-10717): every fd held (O_PATH, open handles, lock-owner fds) is
  counted; past ``max_fds`` a LOOKUP/OPEN/CREATE answers ``EMFILE`` instead of exhausting the
  process.
- **Lifetime**: an fd is closed when its ``_Inode``/``_Handle`` object dies, not when FORGET or
  RELEASE removes it from a table, so an operation racing with a hostile FORGET keeps using its
  own fd and never a reused fd number (QEMU's "introduce inode refcount to prevent
  use-after-free").
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import logging
import os
import platform
import resource
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ..errors import FuseError
from ..protocol import DirEntry, InitFlags
from ..protocol.constants import (
    DEV_IOC_BACKING_CLOSE,
    DEV_IOC_BACKING_OPEN,
    ROOT_ID,
    AttrFlags,
    LkFlags,
    OpenFlags,
    OpenInFlags,
    ReleaseFlags,
    RenameFlags,
    SetattrValid,
    WriteFlags,
)
from ..protocol.schema import codec
from ..protocol.structs import (
    Attr,
    AttrOut,
    CopyFileRangeIn,
    EntryOut,
    FileLock,
    Kstatfs,
    LkIn,
    OpenOut,
    ReleaseIn,
    RemoveMappingOne,
    SetattrIn,
    SetupMappingIn,
    Statx,
    StatxIn,
    StatxOut,
)
from .dax import FH_NONE, DaxServer  # DAX hook (issue 5)
from .filesystem import ConnectionInfo, Context, Filesystem

__all__ = ["PassthroughFS", "XattrMap", "XattrRule"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# System calls Python's os module does not offer (or offers without the flag we need).

_libc = ctypes.CDLL(None, use_errno=True)

# Raw syscall numbers for the calls whose glibc wrapper is unsuitable (setgroups broadcasts to
# every thread through glibc's setxid machinery; openat2 has no wrapper).
_SYSCALLS = {
    "x86_64": {"setgroups": 116, "openat2": 437},
    "aarch64": {"setgroups": 159, "openat2": 437},
}.get(platform.machine(), {"setgroups": -1, "openat2": 437})

_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_STATX_SYNC_TYPE = 0x6000
_CLONE_FS = 0x200
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_STATX_BASIC_STATS = 0x7FF
_STATX_BTIME = 0x800
_OFFSET_MAX = (1 << 63) - 1
_NAME_MAX = 255
_PATH_MAX = 4096
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 65536
_MASK64 = (1 << 64) - 1
_NS = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    func = getattr(_libc, name)
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


_c_int, _c_uint, _c_char_p, _c_void_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_void_p
_setfsuid = _fn("setfsuid", _c_int, _c_uint)
_setfsgid = _fn("setfsgid", _c_int, _c_uint)
_unshare = _fn("unshare", _c_int, _c_int)
_getdents64 = _fn("getdents64", ctypes.c_ssize_t, _c_int, _c_void_p, ctypes.c_size_t)
_renameat2 = _fn("renameat2", _c_int, _c_int, _c_char_p, _c_int, _c_char_p, _c_uint)
_fchownat = _fn("fchownat", _c_int, _c_int, _c_char_p, _c_uint, _c_uint, _c_int)
_utimensat = _fn("utimensat", _c_int, _c_int, _c_char_p, ctypes.POINTER(_Timespec), _c_int)
_fallocate = _fn("fallocate64", _c_int, _c_int, _c_int, ctypes.c_int64, ctypes.c_int64)
_syncfs = _fn("syncfs", _c_int, _c_int)
_statx = _fn("statx", _c_int, _c_int, _c_char_p, _c_int, _c_uint, _c_void_p)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _set_thread_groups(groups: Sequence[int]) -> None:
    """setgroups(2) for the calling thread only (the raw syscall; glibc's applies to all)."""
    number = _SYSCALLS["setgroups"]
    if number < 0:
        raise OSError(errno.ENOSYS, "setgroups syscall number unknown on this machine")
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _syscall(ctypes.c_long(number), ctypes.c_long(len(groups)), array) < 0:
        _raise_errno()


# openat2 through its own function pointer with declared argument types, ``struct open_how``
# packed by ``struct`` (three u64): building c_long/c_char_p/byref wrappers and an _OpenHow per
# call cost ~2.5 µs more per CREATE (pinned, CPU time).  ``_libc["syscall"]`` is a new pointer,
# so setgroups' untyped ``_syscall`` is left alone.
_sys_openat2 = _libc["syscall"]
_sys_openat2.restype = ctypes.c_long
_sys_openat2.argtypes = [ctypes.c_long, _c_int, _c_char_p, _c_void_p, ctypes.c_size_t]
_pack_how = struct.Struct("=QQQ").pack
_OPENAT2_NR = _SYSCALLS["openat2"]
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def _openat2(dirfd: int, name: bytes, flags: int, mode: int, resolve: int) -> int:
    fd: int = _sys_openat2(_OPENAT2_NR, dirfd, name, _pack_how(flags, mode, resolve), _HOW_SIZE)
    if fd < 0:
        _raise_errno()
    return fd


_HAVE_OPENAT2 = True

# --------------------------------------------------------------------------------------------
# Extended attribute name mapping (virtiofsd --xattrmap; doc/xattr-mapping.md).

XattrRuleType = Literal["prefix", "ok", "bad", "unsupported"]


@dataclass(frozen=True)
class XattrRule:
    """One ``:type:scope:key:prepend:`` rule of an xattr mapping."""

    type: XattrRuleType
    client: bool
    """The rule matches names from the client (set/get/removexattr) against ``key``."""
    server: bool
    """The rule matches names from the server (listxattr) against ``prepend``."""
    key: bytes
    prepend: bytes


class XattrMap:
    """virtiofsd's xattr name mapping: a list of rules, the first match wins.

    Client names (GETXATTR/SETXATTR/REMOVEXATTR): a ``prefix`` rule whose ``key`` starts the
    name sends ``prepend + name`` to the host; ``ok`` passes it unchanged; ``bad`` refuses it
    (``EPERM``, ``ENODATA`` for getxattr); ``unsupported`` answers ``ENOTSUP``; no match is
    ``EPERM``.  Server names (LISTXATTR): a ``prefix`` rule whose ``prepend`` starts the name
    strips it; ``ok`` passes it; ``bad``/``unsupported``/no match hide it.  ``:map:key:prepend:``
    (at most one, last) expands as virtiofsd does: with an empty key to
    ``:prefix:all::prepend:`` ``:bad:all:::``, else to ``:prefix:all:key:prepend:``
    ``:bad:server::key:`` ``:bad:client:prepend::`` ``:ok:all:::``.
    """

    def __init__(self, rules: Iterable[XattrRule]) -> None:
        self.rules: tuple[XattrRule, ...] = tuple(rules)

    @classmethod
    def parse(cls, text: str) -> XattrMap:
        """Parse a mapping string; the separator is the first non-blank character of each rule."""
        rules: list[XattrRule] = []
        rest = text.strip()
        seen_map = False
        while rest:
            if seen_map:
                raise ValueError("xattrmap: the 'map' rule must be the last one")
            sep = rest[0]
            fields = rest[1:].split(sep)
            if not fields or fields[0] not in ("prefix", "ok", "bad", "unsupported", "map"):
                raise ValueError(f"xattrmap: unknown rule type in {rest[:40]!r}")
            kind = fields[0]
            if kind == "map":
                if len(fields) < 4:
                    raise ValueError(f"xattrmap: truncated map rule {rest[:40]!r}")
                key, prepend = fields[1].encode(), fields[2].encode()
                consumed = 1 + len(sep.join(fields[:3])) + 1
                rules.extend(cls._expand_map(key, prepend))
                seen_map = True
            else:
                if len(fields) < 5:
                    raise ValueError(f"xattrmap: truncated rule {rest[:40]!r}")
                scope = fields[1]
                if scope not in ("client", "server", "all"):
                    raise ValueError(f"xattrmap: unknown scope {scope!r}")
                rules.append(XattrRule(kind, scope in ("client", "all"),  # type: ignore[arg-type]
                                       scope in ("server", "all"), fields[2].encode(),
                                       fields[3].encode()))
                consumed = 1 + len(sep.join(fields[:4])) + 1
            rest = rest[consumed:].lstrip()
        if not rules:
            raise ValueError("xattrmap: no rules")
        return cls(rules)

    @staticmethod
    def _expand_map(key: bytes, prepend: bytes) -> list[XattrRule]:
        if not key:
            return [XattrRule("prefix", True, True, b"", prepend),
                    XattrRule("bad", True, True, b"", b"")]
        return [XattrRule("prefix", True, True, key, prepend),
                XattrRule("bad", False, True, b"", key),
                XattrRule("bad", True, False, prepend, b""),
                XattrRule("ok", True, True, b"", b"")]

    def to_server(self, name: bytes, *, getting: bool = False) -> bytes:
        """The host name for a client name, or ``FuseError`` (EPERM/ENODATA/ENOTSUP)."""
        for rule in self.rules:
            if rule.client and name.startswith(rule.key):
                if rule.type == "prefix":
                    return rule.prepend + name
                if rule.type == "ok":
                    return name
                if rule.type == "unsupported":
                    raise FuseError(errno.EOPNOTSUPP)
                # "bad": a getxattr of a hidden name looks like an absent one (virtiofsd MR 67).
                raise FuseError(errno.ENODATA if getting else errno.EPERM)
        raise FuseError(errno.ENODATA if getting else errno.EPERM)

    def to_client(self, name: bytes) -> bytes | None:
        """The client name of a host name, or None when the mapping hides it."""
        for rule in self.rules:
            if rule.server and name.startswith(rule.prepend):
                if rule.type == "prefix":
                    stripped = name[len(rule.prepend):]
                    return stripped or None
                if rule.type == "ok":
                    return name
                return None
        return None


# --------------------------------------------------------------------------------------------
# Inodes and handles.


class _FdBudget:
    """Counts the fds the filesystem holds; refuses new ones past ``limit`` (CVE-2020-10717).

    Lock-free: a held fd is one element of a list, and ``append``/``pop``/``len`` are each
    atomic under the GIL.  ``take`` appends first and checks after, so of several threads
    racing for the last slots never more than ``limit`` succeed (one may be refused while
    another's check is pending, as at any limit).  A lock acquire/release pair per take and
    per give measured ~0.5 µs of each LOOKUP/CREATE (pinned, CPU time).
    """

    __slots__ = ("limit", "_held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: list[None] = []

    @property
    def used(self) -> int:
        """How many fds are counted now."""
        return len(self._held)

    def take(self) -> None:
        held = self._held
        held.append(None)
        if len(held) > self.limit:
            held.pop()
            raise FuseError(errno.EMFILE)

    def give(self) -> None:
        try:
            self._held.pop()
        except IndexError:  # pragma: no cover - more gives than takes would be our bug
            pass


_T = TypeVar("_T")

class _Inode:
    """A host inode the kernel knows, pinned by an O_PATH fd closed when the object dies."""

    __slots__ = ("fd", "nodeid", "key", "kind", "nlookup", "budget", "backing_id",
                 "backing_refs", "lock_fds", "lock_pids", "lock")

    def __init__(self, fd: int, nodeid: int, key: tuple[int, int], kind: int,
                 budget: _FdBudget | None) -> None:
        self.fd = fd
        self.nodeid = nodeid
        self.key = key
        self.kind = kind
        """stat.S_IFMT of the inode: a file's type never changes, so it is checked once."""
        self.nlookup = 1
        self.budget = budget
        self.backing_id = -1
        self.backing_refs = 0
        self.lock_fds: dict[int, int] | None = None
        """POSIX lock owner -> the open file description carrying its OFD locks."""
        self.lock_pids: dict[int, int] | None = None
        """POSIX lock owner -> the pid the kernel named when it took a lock (for GETLK)."""
        self.lock = threading.Lock()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            if self.budget is not None:
                self.budget.give()
        if self.lock_fds:
            fds, self.lock_fds = self.lock_fds, None
            for owner_fd in fds.values():
                os.close(owner_fd)
                if self.budget is not None:
                    self.budget.give()

    def __del__(self) -> None:
        self.close()


class _Handle:
    """An open file or directory: its own fd, closed when the last user lets go."""

    __slots__ = ("fd", "inode", "is_dir", "writable", "passthrough", "budget", "lock")

    def __init__(self, fd: int, inode: _Inode, is_dir: bool, writable: bool,
                 budget: _FdBudget) -> None:
        self.fd = fd
        self.inode = inode
        self.is_dir = is_dir
        self.writable = writable
        self.passthrough = False
        self.budget = budget
        self.lock = threading.Lock()
        """Serialises lseek+getdents64 on a directory handle."""

    def __del__(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
            self.budget.give()


_DIRENT64 = struct.Struct("<QqHB")
_FLOCK = struct.Struct("<hhxxxxqqixxxx")
_STATX = codec(Statx)
_new = tuple.__new__
_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_os_open = os.open
_unlink = os.unlink
_O_PATH_CLOEXEC = os.O_PATH | os.O_CLOEXEC
# Plain ints: an IntFlag operand makes ``&`` go through enum's Python-level __and__ (~1 µs).
_FLOCK_UNLOCK = int(ReleaseFlags.FLOCK_UNLOCK)
_PASSTHROUGH = int(OpenFlags.PASSTHROUGH)
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_BENEATH = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_fstat = os.fstat
# What a guest may ask of an open(2): access mode and I/O behaviour.  Everything else
# (O_CREAT, O_EXCL, O_TMPFILE, O_PATH, O_DIRECTORY, O_NOFOLLOW, FMODE_EXEC, O_NOCTTY) is ours to
# decide.  O_DIRECT is dropped on the host side: our reads land in unaligned Python buffers,
# and the host page cache keeps the data coherent anyway.
_OPEN_PASS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_DSYNC | os.O_SYNC | os.O_NOATIME
              | os.O_NONBLOCK)
_KILL_MODE = stat.S_ISUID | stat.S_ISGID


def _kill_mode(mode: int) -> int:
    """The mode after a VFS ``file_remove_privs``: suid always, sgid only if group-executable
    (S_ISGID without S_IXGRP marks mandatory locking, not privilege; fs/inode.c
    ``should_remove_suid``)."""
    new = mode & ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        new &= ~stat.S_ISGID
    return new


def _check_name(name: bytes) -> None:
    """A single path component from an untrusted peer (SECURITY.md B1 #5-#7)."""
    if (type(name) is not bytes or not name or b"/" in name or b"\0" in name
            or name == b"." or name == b".."):
        raise FuseError(errno.EINVAL)
    if len(name) > _NAME_MAX:
        raise FuseError(errno.ENAMETOOLONG)


def _encode_rdev(rdev: int) -> int:
    """The kernel's ``new_encode_dev`` (fuse_attr.rdev is a u32 the kernel decodes with it)."""
    if not rdev:
        return 0
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _decode_rdev(rdev: int) -> int:
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _attr(st: os.stat_result, flags: int = 0) -> Attr:
    # stat_result's indexes 7-9 hold the raw tv_sec (floored, as the kernel keeps it), so the
    # nanoseconds are the *_ns field less sec * 1e9: no divmod, and indexes 0-9 are plain tuple
    # reads (~10% of a GETATTR's Python time, measured).
    # (typeshed types st[7:10] as float; CPython's fill_time stores the int tv_sec there.)
    asec: int = st[7]  # type: ignore[assignment]
    msec: int = st[8]  # type: ignore[assignment]
    csec: int = st[9]  # type: ignore[assignment]
    rdev = st.st_rdev
    return _new(Attr, (st[1], st[6], st.st_blocks, asec & _MASK64, msec & _MASK64,
                       csec & _MASK64, st.st_atime_ns - asec * _NS, st.st_mtime_ns - msec * _NS,
                       st.st_ctime_ns - csec * _NS, st[0], st[3] & 0xFFFFFFFF, st[4], st[5],
                       _encode_rdev(rdev) if rdev else 0, st.st_blksize, flags))


def _oserror(exc: OSError) -> FuseError:
    return FuseError(exc.errno or errno.EIO)


CacheMode = Literal["auto", "always", "none"]


class PassthroughFS(Filesystem):
    """Serve the host directory ``root`` (see the module docstring for the security model).

    ``cache``: ``"none"`` (entry/attr timeouts 0, FOPEN_DIRECT_IO), ``"auto"`` (1 s), ``"always"``
    (86400 s, FOPEN_KEEP_CACHE, negative entries cached).  ``writeback``: ask for
    FUSE_WRITEBACK_CACHE.  ``xattr``: serve extended attributes (ENOSYS otherwise).
    ``readonly``: every modifying request answers EROFS, whatever the mount says.
    ``allow_mknod``: allow character/block device nodes (FIFOs and sockets always are).
    ``killpriv``: negotiate HANDLE_KILLPRIV_V2 and clear suid/sgid as the VFS would.
    ``passthrough``: kernel passthrough I/O for regular files when the kernel and the transport
    offer it (``"auto"``, the default, or ``True``); the kernel cannot combine it with the
    writeback cache, so ``True`` with ``writeback`` is refused while ``"auto"`` then leaves
    passthrough off.  ``False`` serves every read and write in Python.
    ``xattrmap``: a virtiofsd mapping string or an ``XattrMap``.  ``announce_submounts``: flag
    directories on another host device with FUSE_ATTR_SUBMOUNT.  ``max_fds``: how many fds the
    filesystem may hold (default: the raised RLIMIT_NOFILE less a reserve).

    When running as root the constructor drops the process's supplementary groups and raises the
    RLIMIT_NOFILE soft limit to the hard one, as virtiofsd does at start.
    """

    def __init__(self, root: str | os.PathLike[str] | bytes, *, cache: CacheMode = "auto",
                 writeback: bool = False, xattr: bool = True, readonly: bool = False,
                 allow_mknod: bool = False, killpriv: bool = True,
                 passthrough: bool | Literal["auto"] = "auto",
                 xattrmap: str | XattrMap | None = None, announce_submounts: bool = False,
                 max_fds: int | None = None) -> None:
        if cache not in ("auto", "always", "none"):
            raise ValueError(f"cache must be 'auto', 'always' or 'none', not {cache!r}")
        if passthrough not in (True, False, "auto"):
            raise ValueError(f"passthrough must be True, False or 'auto', not {passthrough!r}")
        if passthrough is True and writeback:
            raise ValueError("the kernel refuses FUSE_PASSTHROUGH together with the writeback "
                             "cache (fs/fuse/inode.c process_init_reply); pick one")
        self.cache = cache
        self.writeback = writeback
        self.xattr = xattr
        self.readonly = readonly
        self.allow_mknod = allow_mknod
        self.killpriv = killpriv
        self.passthrough = passthrough
        self.announce_submounts = announce_submounts
        self.xattrmap = XattrMap.parse(xattrmap) if isinstance(xattrmap, str) else xattrmap
        # The host name of the client's security.capability when a mapping renames it: the
        # host kernel only drops the real name on write, so we drop the mapped one
        # (CVE-2021-20263).
        self._cap_name: bytes | None = None
        if self.xattrmap is not None:
            try:
                mapped = self.xattrmap.to_server(b"security.capability")
            except FuseError:
                mapped = None
            if mapped is not None and mapped != b"security.capability":
                self._cap_name = mapped

        timeout = {"none": 0, "auto": 1, "always": 86400}[cache]
        self._timeout = timeout
        self._neg_timeout = timeout if cache == "always" else 0
        self._open_flags_reply = int({"none": OpenFlags.DIRECT_IO
                                      | OpenFlags.PARALLEL_DIRECT_WRITES,
                                      "auto": 0, "always": OpenFlags.KEEP_CACHE}[cache])
        self._dir_flags_reply = (OpenFlags.CACHE_DIR | OpenFlags.KEEP_CACHE
                                 if cache == "always" else 0)

        flags = (Filesystem.init_flags | InitFlags.POSIX_LOCKS | InitFlags.FLOCK_LOCKS
                 | InitFlags.CREATE_SUPP_GROUP | InitFlags.HAS_EXPIRE_ONLY)
        if cache == "none":
            # Entries with a zero timeout make READDIRPLUS pure overhead (virtiofsd turns it off
            # in this mode too).
            flags &= ~(InitFlags.DO_READDIRPLUS | InitFlags.READDIRPLUS_AUTO)
        if cache != "always":
            flags |= InitFlags.AUTO_INVAL_DATA
        else:
            flags |= InitFlags.CACHE_SYMLINKS
        if writeback:
            flags |= InitFlags.WRITEBACK_CACHE
        if killpriv:
            flags |= InitFlags.HANDLE_KILLPRIV_V2
        if passthrough and not writeback:
            flags |= InitFlags.PASSTHROUGH
        if announce_submounts:
            flags |= InitFlags.SUBMOUNTS
        self.init_flags = flags

        # Negotiated state, set by init(); direct method calls (unit tests) see these defaults.
        self._writeback_on = False
        self._submounts_on = False
        self._killpriv_v2 = killpriv
        self._backing_open: Callable[[int], int] | None = None
        self._backing_close: Callable[[int], None] | None = None
        self._dax: DaxServer | None = None  # DAX hook (issue 5): set by init() with a window

        self._root_is_root = os.geteuid() == 0
        self._euid, self._egid = os.geteuid(), os.getegid()
        if self._root_is_root:
            # CVE-2022-0358: supplementary groups (root's group 0 above all) would let a guest
            # user create setgid-root files; glibc applies this to every thread.
            os.setgroups([])
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if hard == resource.RLIM_INFINITY:
                hard = 1 << 20
            if soft != resource.RLIM_INFINITY and soft < hard:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                except (OSError, ValueError):  # pragma: no cover - container limits
                    pass
        if max_fds is None:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if limit == resource.RLIM_INFINITY:
                limit = 1 << 20
            max_fds = max(16, limit - max(64, limit // 16))
        self.budget = _FdBudget(max_fds)

        self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        rootfd = os.open(os.fsencode(root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(rootfd)
        # The root never counts against the budget and is never forgotten.
        self._root = _Inode(rootfd, ROOT_ID, (st.st_dev, st.st_ino), stat.S_IFDIR, None)
        self._inodes: dict[int, _Inode] = {ROOT_ID: self._root}
        self._by_key: dict[tuple[int, int], _Inode] = {self._root.key: self._root}
        self._handles: dict[int, _Handle] = {}
        self._lock = threading.Lock()
        self._next_nodeid = itertools.count(ROOT_ID + 1)
        self._next_fh = itertools.count(1)
        self._thread = threading.local()
        self._closed = threading.Event()
        """Set by ``destroy``: wakes SETLKW waiters."""

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    def init(self, conn: ConnectionInfo) -> None:
        """Record what INIT negotiated; wire kernel passthrough to the transport's hooks.

        Passthrough needs the /dev/fuse fd: the transport offers it as ``conn.extra`` entries
        ``"backing_open"`` (``fd -> backing_id``) and ``"backing_close"`` (``backing_id ->
        None``), or as ``"fuse_fd"`` (an int) on which we issue the ioctls ourselves.  Without
        them (vhost-user, loopback) FUSE_PASSTHROUGH is taken out of ``conn.flags``.
        """
        self._writeback_on = bool(conn.flags & InitFlags.WRITEBACK_CACHE)
        self._submounts_on = self.announce_submounts and bool(conn.flags & InitFlags.SUBMOUNTS)
        self._backing_open = self._backing_close = None
        self._closed.clear()
        if conn.flags & InitFlags.PASSTHROUGH:
            opener = conn.extra.get("backing_open")
            closer = conn.extra.get("backing_close")
            fuse_fd = conn.extra.get("fuse_fd")
            if callable(opener) and callable(closer):
                self._backing_open, self._backing_close = opener, closer
            elif isinstance(fuse_fd, int) and fuse_fd >= 0:
                self._backing_open, self._backing_close = _ioctl_backing(fuse_fd)
            if self._backing_open is None or self._writeback_on:
                conn.flags &= ~InitFlags.PASSTHROUGH
                self._backing_open = self._backing_close = None
            else:
                # The backing files' filesystem must be shallower than this; 1 allows any
                # ordinary host filesystem and still lets overlayfs stack on top of us
                # (FILESYSTEM_MAX_STACK_DEPTH is 2).
                conn.max_stack_depth = max(conn.max_stack_depth, 1)
                # Passthrough writes never reach us, but with HANDLE_KILLPRIV_V2 the kernel
                # leaves suid/sgid clearing to the server (fuse_setattr drops ATTR_KILL_*),
                # so a non-owner write would keep a setuid bit (measured on 6.18).  Without
                # it the kernel clears them itself with a SETATTR(mode), for every write path.
                conn.flags &= ~InitFlags.HANDLE_KILLPRIV_V2
        self._killpriv_v2 = bool(conn.flags & InitFlags.HANDLE_KILLPRIV_V2)
        # DAX hook (issue 5, virtiofs/server/dax.py): a window offered by the transport in
        # conn.extra["dax"] enables SETUPMAPPING/REMOVEMAPPING and advertises map_alignment.
        self._dax = DaxServer.from_conn(conn)

    def destroy(self) -> None:
        """Forget every inode and handle but the root (their fds close as they die)."""
        self._closed.set()
        # The connection is gone and its backing ids with it: nothing to BACKING_CLOSE.
        self._backing_open = self._backing_close = None
        dax, self._dax = self._dax, None  # DAX hook (issue 5): the session's mappings go too
        if dax is not None:
            dax.remove_all()
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            inodes = [i for i in self._inodes.values() if i is not self._root]
            self._inodes = {ROOT_ID: self._root}
            self._by_key = {self._root.key: self._root}
        for handle in handles:
            self._drop_backing(handle)
        del handles, inodes

    def close(self) -> None:
        """Release everything, the root and /proc/self/fd included (the object is then dead)."""
        self.destroy()
        self._root.close()
        if self._proc_fd >= 0:
            os.close(self._proc_fd)
            self._proc_fd = -1

    @property
    def passthrough_active(self) -> bool:
        """Whether OPEN/CREATE currently answer with FOPEN_PASSTHROUGH."""
        return self._backing_open is not None

    # ---------------------------------------------------------------------------------------
    # Tables

    def _inode(self, nodeid: int) -> _Inode:
        inode = self._inodes.get(nodeid)
        if inode is None:
            raise FuseError(errno.EBADF)
        return inode

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None or handle.is_dir:
            raise FuseError(errno.EBADF)
        return handle

    def _dir_handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None or not handle.is_dir:
            raise FuseError(errno.EBADF)
        return handle

    def _register(self, fd: int, st: os.stat_result) -> _Inode:
        """Take one lookup reference on the inode behind the fresh O_PATH ``fd`` (consumed)."""
        key = (st.st_dev, st.st_ino)
        try:
            with self._lock:
                inode = self._by_key.get(key)
                if inode is not None:
                    inode.nlookup += 1
                else:
                    inode = self._new_inode(fd, key, st)
                    fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
        return inode

    def _new_inode(self, fd: int, key: tuple[int, int], st: os.stat_result) -> _Inode:
        """A new table entry adopting ``fd``; call with ``self._lock`` held."""
        self.budget.take()
        inode = _Inode(fd, next(self._next_nodeid), key, st.st_mode & 0o170000, self.budget)
        self._inodes[inode.nodeid] = inode
        self._by_key[key] = inode
        return inode

    def _entry(self, inode: _Inode, st: os.stat_result, parent: _Inode | None = None) -> EntryOut:
        flags = 0
        if (self._submounts_on and parent is not None and inode.kind == stat.S_IFDIR
                and st.st_dev != parent.key[0]):
            flags = AttrFlags.SUBMOUNT
        t = self._timeout
        return _new(EntryOut, (inode.nodeid, 0, t, t, 0, 0, _attr(st, flags)))

    def _lookup_at(self, dirfd: int, name: bytes, parent: _Inode | None) -> EntryOut:
        try:
            fd = os.open(name, _O_PATH_NOFOLLOW, dir_fd=dirfd)
        except OSError as exc:
            raise _oserror(exc) from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise _oserror(exc) from None
        return self._entry(self._register(fd, st), st, parent)

    def _proc(self, inode: _Inode) -> str:
        """The /proc/self/fd magic link of an inode (for path-only system calls)."""
        return f"/proc/self/fd/{inode.fd}"

    def _on_inode(self, inode: _Inode, call: Callable[..., _T], *args: Any,
                  write: bool = False) -> _T:
        """Run a path-or-fd system call (xattrs, truncate) on an inode held by an O_PATH fd.

        Regular files and directories are reopened relative to the ``/proc/self/fd`` directory
        fd opened at start, as C virtiofsd does (``openat(proc_self_fd, "N")``): that works in
        the chroot sandbox, where no /proc is mounted.  Other kinds (symlinks, FIFOs, devices)
        must never be opened (CVE-2020-35517), so they go through the absolute magic link,
        which the namespace sandbox and no sandbox provide.
        """
        if inode.kind in (stat.S_IFREG, stat.S_IFDIR):
            flags = os.O_CLOEXEC | os.O_NONBLOCK
            if inode.kind == stat.S_IFDIR:
                flags |= os.O_RDONLY | os.O_DIRECTORY
            else:
                flags |= os.O_WRONLY if write else os.O_RDONLY
            fd = os.open(str(inode.fd), flags, dir_fd=self._proc_fd)
            try:
                return call(fd, *args)
            finally:
                os.close(fd)
        return call(self._proc(inode), *args)

    def _reopen(self, inode: _Inode, flags: int) -> int:
        """A real fd for a regular file or directory from its O_PATH fd, never for others."""
        if inode.kind == stat.S_IFDIR:
            return os.open(".", flags | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=inode.fd)
        if inode.kind != stat.S_IFREG:
            raise FuseError(errno.EBADF)
        return os.open(str(inode.fd), (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC | os.O_NOCTTY,
                       dir_fd=self._proc_fd)

    def _check_writable(self) -> None:
        if self.readonly:
            raise FuseError(errno.EROFS)

    # ---------------------------------------------------------------------------------------
    # Credentials

    def _thread_setup(self) -> None:
        """Give the calling thread its own umask: the request's umask is applied by hand.

        unshare(CLONE_FS) makes umask (and cwd) per thread, as virtiofsd's workers do.  A
        worker thread keeps umask 0; the main thread (direct calls, tests) gets its umask
        back after each operation, so its own file creations are unaffected.
        """
        state = self._thread
        try:
            restore = state.restore  # set last below: present once the thread is set up
        except AttributeError:
            pass
        else:
            if restore:
                state.saved = os.umask(0)
            return
        if _unshare(_CLONE_FS) != 0:  # pragma: no cover - unshare(CLONE_FS) needs no privilege
            _raise_errno()
        state.saved = os.umask(0)
        state.restore = threading.current_thread() is threading.main_thread()

    def _enter_creds(self, ctx: Context) -> bool:
        """Become the caller (fsuid/fsgid, and its supplementary group) on this thread.

        Always pair with ``_leave_creds(ctx, <result>)`` in a ``finally``.
        """
        self._thread_setup()
        if not self._root_is_root:
            return False
        uid, gid, groups = ctx.uid, ctx.gid, ctx.groups
        if uid == self._euid and gid == self._egid and not groups:
            return False
        if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
            self._leave_creds(ctx, False)
            raise FuseError(errno.EPERM)  # FUSE_INVALID_UIDGID: no mapping for the caller
        if groups:
            _set_thread_groups(groups)
        _setfsgid(gid)
        _setfsuid(uid)
        if _setfsuid(0xFFFFFFFF) != uid or _setfsgid(0xFFFFFFFF) != gid:
            self._leave_creds(ctx, True)
            raise FuseError(errno.EPERM)
        return True

    def _leave_creds(self, ctx: Context, switched: bool) -> None:
        if switched:
            _setfsuid(self._euid)
            _setfsgid(self._egid)
            if ctx.groups:
                _set_thread_groups(())
        state = self._thread
        try:
            if state.restore:
                os.umask(state.saved)
        except AttributeError:  # pragma: no cover - _enter_creds failed before the set-up
            pass

    def _create_mode(self, ctx: Context, mode: int) -> int:
        return mode & 0o7777 & ~ctx.umask

    # ---------------------------------------------------------------------------------------
    # killpriv

    def _kill_privs(self, inode: _Inode, fd: int | None, *, suid: bool) -> None:
        """Clear suid/sgid (``suid``) and the mapped security.capability of ``inode``."""
        if suid and inode.kind == stat.S_IFREG:
            st = os.fstat(inode.fd)
            if st.st_mode & _KILL_MODE:
                new = _kill_mode(st.st_mode)
                if new != st.st_mode:
                    if fd is not None:
                        os.fchmod(fd, stat.S_IMODE(new))
                    else:
                        os.chmod(str(inode.fd), stat.S_IMODE(new), dir_fd=self._proc_fd)
        if self._cap_name is not None:
            try:
                # Through the magic link: fremovexattr on an O_PATH fd fails with EBADF
                # (virtiofsd b65ca73), and FIFOs/symlinks have nothing else.
                self._on_inode(inode, os.removexattr, self._cap_name)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.EPERM):
                    raise

    # ---------------------------------------------------------------------------------------
    # Names and attributes

    def lookup(self, ctx: Context, parent: int, name: bytes) -> EntryOut:
        """Look a single component up; ``.``/``..`` are confined (``..`` at the root is it)."""
        # The hot path (cold stats and missing names are one LOOKUP each): the table lookups,
        # the name check and the registration inline, two system calls on a hit (openat of an
        # O_PATH fd, then fstat of *that* fd: the identity and attributes are those of the
        # inode we keep, whatever the name points to by then) and one on a miss.
        pinode = self._inodes.get(parent)
        if pinode is None:
            raise FuseError(errno.EBADF)
        if (type(name) is not bytes or not 0 < len(name) <= _NAME_MAX or b"/" in name
                or b"\0" in name or name == b"." or name == b".."):
            return self._lookup_special(pinode, name)
        try:
            fd = _os_open(name, _O_PATH_NOFOLLOW, dir_fd=pinode.fd)
        except FileNotFoundError:
            if self._neg_timeout:
                t = self._neg_timeout
                return _new(EntryOut, (0, 0, t, t, 0, 0, Attr()))
            raise FuseError(errno.ENOENT) from None
        except OSError as exc:
            raise _oserror(exc) from None
        try:
            st = _fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise _oserror(exc) from None
        key = (st.st_dev, st.st_ino)
        lock = self._lock
        lock.acquire()
        try:
            inode = self._by_key.get(key)
            if inode is not None:
                inode.nlookup += 1
            else:
                inode = self._new_inode(fd, key, st)
                fd = -1
        finally:
            lock.release()
            if fd >= 0:
                os.close(fd)
        flags = 0
        if (self._submounts_on and inode.kind == stat.S_IFDIR and key[0] != pinode.key[0]):
            flags = AttrFlags.SUBMOUNT
        t = self._timeout
        return _new(EntryOut, (inode.nodeid, 0, t, t, 0, 0, _attr(st, flags)))

    def _lookup_special(self, pinode: _Inode, name: bytes) -> EntryOut:
        """LOOKUP of ``.``/``..`` (confined) or of a name ``_check_name`` refuses."""
        if name == b"." or name == b"..":
            if name == b"." or pinode is self._root:
                st = os.fstat(pinode.fd)
                with self._lock:
                    if self._inodes.get(pinode.nodeid) is not pinode:
                        raise FuseError(errno.ESTALE)
                    pinode.nlookup += 1
                return self._entry(pinode, st)
            return self._lookup_at(pinode.fd, b"..", None)
        _check_name(name)
        raise FuseError(errno.EINVAL)  # pragma: no cover - _check_name raised

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """Saturating subtraction; unknown ids and the root are ignored."""
        dead: list[_Inode] = []
        root = self._root
        with self._lock:
            inodes = self._inodes
            by_key = self._by_key
            for nodeid, nlookup in items:
                inode = inodes.get(nodeid)
                if inode is None or inode is root:
                    continue
                if nlookup > 0:
                    left = inode.nlookup - nlookup
                    if left > 0:
                        inode.nlookup = left
                        continue
                    inode.nlookup = 0
                elif inode.nlookup > 0:
                    continue
                del inodes[nodeid]
                key = inode.key
                if by_key.get(key) is inode:
                    del by_key[key]
                dead.append(inode)
        # The fds close here, outside the table lock, unless an operation still uses them.
        del dead

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> AttrOut:
        inode = self._inodes.get(ino)
        if inode is None:
            raise FuseError(errno.EBADF)
        try:
            st = _fstat(inode.fd)
        except OSError as exc:
            raise _oserror(exc) from None
        return _new(AttrOut, (self._timeout, 0, 0, _attr(st)))

    def setattr(self, ctx: Context, ino: int, attr: SetattrIn) -> AttrOut:
        """chmod/chown/truncate/utimes through the O_PATH fd (or the open handle)."""
        self._check_writable()
        inode = self._inode(ino)
        valid = attr.valid
        handle = self._handles.get(attr.fh) if valid & SetattrValid.FH else None
        if handle is not None and (handle.is_dir or handle.inode is not inode):
            handle = None
        try:
            if valid & SetattrValid.MODE:
                mode = attr.mode & 0o7777
                if handle is not None:
                    os.fchmod(handle.fd, mode)
                else:
                    # chmod through the magic link reaches FIFOs and sockets without opening
                    # them; a symlink answers EOPNOTSUPP as lchmod does.
                    os.chmod(str(inode.fd), mode, dir_fd=self._proc_fd)
            if valid & (SetattrValid.UID | SetattrValid.GID):
                uid = attr.uid if valid & SetattrValid.UID else 0xFFFFFFFF
                gid = attr.gid if valid & SetattrValid.GID else 0xFFFFFFFF
                if _fchownat(inode.fd, b"", uid, gid, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW):
                    _raise_errno()
                # The host kernel clears suid/sgid on chown of a non-directory itself.
                if self._cap_name is not None:
                    self._kill_privs(inode, None, suid=False)
            if valid & SetattrValid.SIZE:
                if inode.kind != stat.S_IFREG:
                    raise FuseError(errno.EISDIR if inode.kind == stat.S_IFDIR else errno.EINVAL)
                if handle is not None and handle.writable:
                    os.ftruncate(handle.fd, attr.size)
                else:
                    self._on_inode(inode, os.truncate, attr.size, write=True)
                kill = bool(valid & SetattrValid.KILL_SUIDGID) or ctx.uid != 0
                if self.killpriv and (kill or self._cap_name is not None):
                    self._kill_privs(inode, None, suid=kill)
            if valid & (SetattrValid.ATIME | SetattrValid.MTIME
                        | SetattrValid.ATIME_NOW | SetattrValid.MTIME_NOW):
                times = (_Timespec * 2)()
                for i, (set_, now, sec, nsec) in enumerate((
                        (SetattrValid.ATIME, SetattrValid.ATIME_NOW, attr.atime, attr.atimensec),
                        (SetattrValid.MTIME, SetattrValid.MTIME_NOW, attr.mtime, attr.mtimensec))):
                    if valid & now:
                        times[i] = _Timespec(0, _UTIME_NOW)
                    elif valid & set_:
                        if nsec >= _NS:
                            raise FuseError(errno.EINVAL)
                        # fuse_setattr_in carries signed seconds in a u64.
                        secs = sec - (1 << 64) if sec >= 1 << 63 else sec
                        times[i] = _Timespec(secs, nsec)
                    else:
                        times[i] = _Timespec(0, _UTIME_OMIT)
                if _utimensat(inode.fd, b"", times, _AT_EMPTY_PATH):
                    _raise_errno()
            st = os.fstat(inode.fd)
        except OSError as exc:
            raise _oserror(exc) from None
        return _new(AttrOut, (self._timeout, 0, 0, _attr(st)))

    def readlink(self, ctx: Context, ino: int) -> bytes:
        inode = self._inode(ino)
        if inode.kind != stat.S_IFLNK:
            raise FuseError(errno.EINVAL)
        try:
            return os.readlink(b"", dir_fd=inode.fd)
        except OSError as exc:
            raise _oserror(exc) from None

    def statfs(self, ctx: Context, ino: int) -> Kstatfs:
        inode = self._inode(ino)
        try:
            s = os.fstatvfs(inode.fd)
        except OSError as exc:
            raise _oserror(exc) from None
        return Kstatfs(blocks=s.f_blocks, bfree=s.f_bfree, bavail=s.f_bavail, files=s.f_files,
                       ffree=s.f_ffree, bsize=s.f_bsize, namelen=s.f_namemax, frsize=s.f_frsize)

    def access(self, ctx: Context, ino: int, mask: int) -> None:
        """faccessat(AT_EACCESS) as the caller: the fsuid is what AT_EACCESS checks."""
        inode = self._inode(ino)
        if self.readonly and mask & os.W_OK:
            raise FuseError(errno.EROFS)
        switched = self._enter_creds(ctx)
        try:
            ok = os.access(str(inode.fd), mask & 7, dir_fd=self._proc_fd, effective_ids=True)
        except OSError as exc:
            raise _oserror(exc) from None
        finally:
            self._leave_creds(ctx, switched)
        if not ok:
            raise FuseError(errno.EACCES)

    def statx(self, ctx: Context, ino: int, arg: StatxIn) -> StatxOut:
        inode = self._inode(ino)
        buf = ctypes.create_string_buffer(_STATX.size)
        flags = _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW | (arg.sx_flags & _AT_STATX_SYNC_TYPE)
        mask = (arg.sx_mask & (_STATX_BASIC_STATS | _STATX_BTIME)) or _STATX_BASIC_STATS
        if _statx(inode.fd, b"", flags, mask, buf):
            raise _oserror(OSError(ctypes.get_errno(), "statx"))
        sx: Statx = _STATX.unpack(buf.raw)
        # Host mount ids, device numbers and DIO alignment are none of the guest's business.
        sx = sx._replace(mask=sx.mask & (_STATX_BASIC_STATS | _STATX_BTIME), dev_major=0,
                         dev_minor=0, spare2=bytes(112))
        return StatxOut(attr_valid=self._timeout, stat=sx)

    # ---------------------------------------------------------------------------------------
    # Namespace

    def _make(self, ctx: Context, parent: int, name: bytes,
              make: Callable[[int], None]) -> EntryOut:
        """Create ``name`` as the caller with ``make(parent_fd)``, then look it up."""
        self._check_writable()
        _check_name(name)
        pinode = self._inode(parent)
        switched = self._enter_creds(ctx)
        try:
            make(pinode.fd)
        except OSError as exc:
            raise _oserror(exc) from None
        finally:
            self._leave_creds(ctx, switched)
        return self._lookup_at(pinode.fd, name, pinode)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int) -> EntryOut:
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            if not self.allow_mknod:
                raise FuseError(errno.EPERM)
        elif kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, 0):
            raise FuseError(errno.EINVAL)
        perm = self._create_mode(ctx, mode)
        device = _decode_rdev(rdev) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return self._make(ctx, parent, name, lambda dirfd: os.mknod(
            name, (kind or stat.S_IFREG) | perm, device, dir_fd=dirfd))

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> EntryOut:
        perm = self._create_mode(ctx, mode)
        return self._make(ctx, parent, name, lambda dirfd: os.mkdir(name, perm, dir_fd=dirfd))

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> EntryOut:
        # The target is data (never followed by us), but it must be a valid C string.
        if type(target) is not bytes or b"\0" in target:
            raise FuseError(errno.EINVAL)
        if not target:
            raise FuseError(errno.ENOENT)
        if len(target) >= _PATH_MAX:
            raise FuseError(errno.ENAMETOOLONG)
        return self._make(ctx, parent, name,
                          lambda dirfd: os.symlink(target, name, dir_fd=dirfd))

    def link(self, ctx: Context, ino: int, newparent: int, newname: bytes) -> EntryOut:
        """Hard link an inode we know into a directory we know: both ends inside the root."""
        self._check_writable()
        _check_name(newname)
        inode = self._inode(ino)
        pinode = self._inode(newparent)
        if inode.kind == stat.S_IFDIR:
            raise FuseError(errno.EPERM)
        try:
            # linkat(AT_SYMLINK_FOLLOW) on the magic link links the inode itself (a symlink
            # included), without resolving any name a guest chose.
            os.link(str(inode.fd), newname, src_dir_fd=self._proc_fd, dst_dir_fd=pinode.fd,
                    follow_symlinks=True)
        except OSError as exc:
            raise _oserror(exc) from None
        return self._lookup_at(pinode.fd, newname, pinode)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        if self.readonly:
            raise FuseError(errno.EROFS)
        if (type(name) is not bytes or not 0 < len(name) <= _NAME_MAX or b"/" in name
                or b"\0" in name or name == b"." or name == b".."):
            _check_name(name)
        pinode = self._inodes.get(parent)
        if pinode is None:
            raise FuseError(errno.EBADF)
        try:
            _unlink(name, dir_fd=pinode.fd)
        except OSError as exc:
            raise _oserror(exc) from None

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._check_writable()
        _check_name(name)
        pinode = self._inode(parent)
        try:
            os.rmdir(name, dir_fd=pinode.fd)
        except OSError as exc:
            raise _oserror(exc) from None

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        self._check_writable()
        _check_name(name)
        _check_name(newname)
        if flags & ~(RenameFlags.NOREPLACE | RenameFlags.EXCHANGE | RenameFlags.WHITEOUT):
            raise FuseError(errno.EINVAL)
        if flags & RenameFlags.WHITEOUT and not self.allow_mknod:
            # A whiteout is a 0/0 character device left behind: a device node by another name.
            raise FuseError(errno.EPERM)
        old = self._inode(parent)
        new = self._inode(newparent)
        try:
            if flags:
                if _renameat2(old.fd, name, new.fd, newname, flags):
                    _raise_errno()
            else:
                os.rename(name, newname, src_dir_fd=old.fd, dst_dir_fd=new.fd)
        except OSError as exc:
            raise _oserror(exc) from None

    # ---------------------------------------------------------------------------------------
    # Files

    def _host_flags(self, flags: int) -> int:
        flags &= _OPEN_PASS
        if self._writeback_on:
            # With the writeback cache the kernel reads pages around partial writes through
            # write-only opens and computes append offsets itself (virtiofsd does the same).
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def _new_handle(self, inode: _Inode, fd: int, flags: int, is_dir: bool) -> tuple[int, _Handle]:
        """Adopt ``fd`` (already counted in the budget) as a new handle."""
        handle = _Handle(fd, inode, is_dir, flags & os.O_ACCMODE != os.O_RDONLY, self.budget)
        fh = next(self._next_fh)
        # One dict store: atomic under the GIL, no table lock needed (fh numbers are unique).
        self._handles[fh] = handle
        return fh, handle

    def _open_reply(self, fh: int, handle: _Handle) -> OpenOut:
        if self._backing_open is not None and handle.inode.kind == stat.S_IFREG:
            backing = self._take_backing(handle)
            if backing >= 0:
                return _new(OpenOut, (fh, _PASSTHROUGH, backing))
        return _new(OpenOut, (fh, self._open_flags_reply, 0))

    def _take_backing(self, handle: _Handle) -> int:
        """The inode's backing id (registered on first use), or -1 to fall back to reads."""
        inode = handle.inode
        opener = self._backing_open
        if opener is None:
            return -1
        with inode.lock:
            if inode.backing_refs == 0:
                try:
                    inode.backing_id = opener(inode.fd)
                except OSError as exc:
                    log.warning("FUSE_DEV_IOC_BACKING_OPEN failed (%s); serving reads in "
                                "user space", exc)
                    return -1
            inode.backing_refs += 1
            handle.passthrough = True
            return inode.backing_id

    def _drop_backing(self, handle: _Handle) -> None:
        if not handle.passthrough:
            return
        handle.passthrough = False
        inode = handle.inode
        with inode.lock:
            inode.backing_refs -= 1
            if inode.backing_refs == 0:
                backing, inode.backing_id = inode.backing_id, -1
                closer = self._backing_close
                if closer is not None:
                    try:
                        closer(backing)
                    except OSError as exc:  # pragma: no cover - the id was ours
                        log.warning("FUSE_DEV_IOC_BACKING_CLOSE(%d) failed: %s", backing, exc)

    def open(self, ctx: Context, ino: int, flags: int, open_flags: int) -> OpenOut:
        """Open a regular file only (CVE-2020-35517): anything else answers EBADF."""
        inode = self._inode(ino)
        if inode.kind != stat.S_IFREG:
            raise FuseError(errno.EISDIR if inode.kind == stat.S_IFDIR else errno.EBADF)
        if self.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise FuseError(errno.EROFS)
        host = self._host_flags(flags)
        self.budget.take()
        try:
            fd = self._reopen(inode, host)
        except OSError as exc:
            self.budget.give()
            raise _oserror(exc) from None
        except BaseException:
            self.budget.give()
            raise
        fh, handle = self._new_handle(inode, fd, host, False)
        if host & os.O_TRUNC and self.killpriv:
            kill = bool(open_flags & OpenInFlags.KILL_SUIDGID) or ctx.uid != 0
            if kill or self._cap_name is not None:
                try:
                    self._kill_privs(inode, fd, suid=kill)
                except OSError as exc:
                    self._release_fh(fh)
                    raise _oserror(exc) from None
        return self._open_reply(fh, handle)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               open_flags: int) -> tuple[EntryOut, OpenOut]:
        """Always ``O_CREAT|O_EXCL``; an existing name goes through LOOKUP + the checked OPEN."""
        if self.readonly:
            raise FuseError(errno.EROFS)
        if (type(name) is not bytes or not 0 < len(name) <= _NAME_MAX or b"/" in name
                or b"\0" in name or name == b"." or name == b".."):
            _check_name(name)
        pinode = self._inodes.get(parent)
        if pinode is None:
            raise FuseError(errno.EBADF)
        host = self._host_flags(flags)
        perm = mode & 0o7777 & ~ctx.umask
        budget = self.budget
        budget.take()
        switched = False
        try:
            switched = self._enter_creds(ctx)
            fd = self._open_beneath(pinode.fd, name, host | _CREATE_FLAGS, perm)
        except FileExistsError:
            budget.give()
            if flags & os.O_EXCL:
                raise FuseError(errno.EEXIST) from None
            fd = -1
        except OSError as exc:
            budget.give()
            raise _oserror(exc) from None
        except BaseException:
            budget.give()
            raise
        finally:
            self._leave_creds(ctx, switched)
        if fd < 0:
            # Someone else created it meanwhile: open the existing file as OPEN would, so a
            # device node or FIFO can never be opened through CREATE.
            entry = self.lookup(ctx, parent, name)
            if entry.nodeid == 0:
                raise FuseError(errno.ENOENT)
            try:
                return entry, self.open(ctx, entry.nodeid, flags & ~os.O_CREAT, open_flags)
            except BaseException:
                self.forget([(entry.nodeid, 1)])
                raise
        return self._adopt_created(fd, host, pinode)

    def _adopt_created(self, fd: int, host: int, pinode: _Inode | None) -> tuple[EntryOut, OpenOut]:
        """Register a freshly created open file: its inode (O_PATH from the fd) and handle."""
        try:
            # The O_PATH fd through the magic link of the fd we created: the very inode, no
            # name resolved again; its fstat gives the identity we register.
            path_fd = _os_open(str(fd), _O_PATH_CLOEXEC, dir_fd=self._proc_fd)
        except OSError as exc:
            os.close(fd)
            self.budget.give()
            raise _oserror(exc) from None
        try:
            st = _fstat(path_fd)
        except OSError as exc:
            os.close(path_fd)
            os.close(fd)
            self.budget.give()
            raise _oserror(exc) from None
        try:
            inode = self._register(path_fd, st)
        except BaseException:
            os.close(fd)
            self.budget.give()
            raise
        fh, handle = self._new_handle(inode, fd, host, False)
        return self._entry(inode, st, pinode), self._open_reply(fh, handle)

    def _open_beneath(self, dirfd: int, name: bytes, flags: int, mode: int) -> int:
        """openat2 confined beneath ``dirfd``, no symlinks, no magic links (openat elsewhere)."""
        global _HAVE_OPENAT2
        if _HAVE_OPENAT2:
            try:
                return _openat2(dirfd, name, flags, mode, _BENEATH)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                _HAVE_OPENAT2 = False
        return os.open(name, flags, mode, dir_fd=dirfd)

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int,
                open_flags: int) -> tuple[EntryOut, OpenOut]:
        self._check_writable()
        pinode = self._inode(parent)
        host = self._host_flags(flags)
        if host & os.O_ACCMODE == os.O_RDONLY:
            host = (host & ~os.O_ACCMODE) | os.O_RDWR
        perm = self._create_mode(ctx, mode)
        self.budget.take()
        switched = False
        try:
            switched = self._enter_creds(ctx)
            fd = os.open(".", host | os.O_TMPFILE | os.O_CLOEXEC, perm, dir_fd=pinode.fd)
        except OSError as exc:
            self.budget.give()
            raise _oserror(exc) from None
        except BaseException:
            self.budget.give()
            raise
        finally:
            self._leave_creds(ctx, switched)
        return self._adopt_created(fd, host, pinode)

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        try:
            return os.pread(handle.fd, size, offset)
        except OSError as exc:
            raise _oserror(exc) from None

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview,
              write_flags: int) -> int:
        self._check_writable()
        handle = self._handle(fh)
        try:
            if self.killpriv:
                kill = bool(write_flags & WriteFlags.KILL_SUIDGID) or ctx.uid != 0
                if kill or self._cap_name is not None:
                    self._kill_privs(handle.inode, handle.fd, suid=kill)
            return os.pwrite(handle.fd, data, offset)
        except OSError as exc:
            raise _oserror(exc) from None

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        """close(2) in the guest: drop the owner's POSIX locks, and flush like a close would."""
        handle = self._handle(fh)
        self._drop_owner(handle.inode, lock_owner)
        try:
            # What a close would do on the host (NFS flushes here); closing a dup never touches
            # our locks, which are OFD locks.
            os.close(os.dup(handle.fd))
        except OSError as exc:
            raise _oserror(exc) from None

    def _release_fh(self, fh: int) -> _Handle | None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            self._drop_backing(handle)
        return handle

    def release(self, ctx: Context, ino: int, arg: ReleaseIn) -> None:
        # Lock-free: get, check, then pop only that very handle (dict operations are atomic
        # under the GIL); of two racing RELEASEs of one fh exactly one pops it.
        handles = self._handles
        fh = arg.fh
        handle = handles.get(fh)
        if handle is None or handle.is_dir or handles.pop(fh, None) is not handle:
            raise FuseError(errno.EBADF)
        if handle.passthrough:
            self._drop_backing(handle)
        if arg.release_flags & _FLOCK_UNLOCK:
            try:
                fcntl.flock(handle.fd, fcntl.LOCK_UN)
            except OSError:
                pass

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        try:
            (os.fdatasync if datasync else os.fsync)(handle.fd)
        except OSError as exc:
            raise _oserror(exc) from None

    def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        self._check_writable()
        handle = self._handle(fh)
        if offset >= 1 << 63 or length >= 1 << 63:
            raise FuseError(errno.EINVAL)
        if _fallocate(handle.fd, mode, offset, length):
            raise _oserror(OSError(ctypes.get_errno(), "fallocate"))

    def lseek(self, ctx: Context, ino: int, fh: int, offset: int, whence: int) -> int:
        handle = self._handle(fh)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise FuseError(errno.EINVAL)
        try:
            return os.lseek(handle.fd, offset, whence)
        except OSError as exc:
            raise _oserror(exc) from None

    def copy_file_range(self, ctx: Context, ino: int, arg: CopyFileRangeIn) -> int:
        self._check_writable()
        src = self._handle(arg.fh_in)
        dst = self._handle(arg.fh_out)
        if arg.flags:
            raise FuseError(errno.EINVAL)
        if arg.off_in >= 1 << 63 or arg.off_out >= 1 << 63:
            raise FuseError(errno.EINVAL)
        try:
            if self.killpriv:
                kill = ctx.uid != 0
                if kill or self._cap_name is not None:
                    self._kill_privs(dst.inode, dst.fd, suid=kill)
            # MAX_RW_COUNT: the kernel never copies more per call anyway.
            return os.copy_file_range(src.fd, dst.fd, min(arg.len, 0x7FFFF000), arg.off_in,
                                      arg.off_out)
        except OSError as exc:
            raise _oserror(exc) from None

    # ---------------------------------------------------------------------------------------
    # Locks: POSIX record locks as OFD locks on one open file description per (inode, owner).
    #
    # Classic F_SETLK locks belong to the *process*: every guest owner would share the daemon's
    # pid (no conflicts between guest processes), and any close() of any fd of the file in the
    # daemon (a RELEASE, our own dup/close in FLUSH) would drop them all.  OFD locks belong to an
    # open file description, so one description per lock owner gives each guest owner its own
    # lock identity with POSIX merge/split semantics, and only our FLUSH for that owner (the
    # guest's close) drops them.  Per-fh descriptions would be wrong too: two opens of the same
    # file by one guest process are one owner and must not conflict.

    def _owner_fd(self, inode: _Inode, owner: int) -> int:
        with inode.lock:
            fds = inode.lock_fds
            if fds is not None and owner in fds:
                return fds[owner]
            if inode.kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise FuseError(errno.EBADF)
            self.budget.take()
            try:
                try:
                    fd = self._reopen(inode, os.O_RDONLY if inode.kind == stat.S_IFDIR
                                      or self.readonly else os.O_RDWR)
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EROFS, errno.ETXTBSY):
                        raise
                    fd = self._reopen(inode, os.O_RDONLY)
            except BaseException:
                self.budget.give()
                raise
            if inode.lock_fds is None:
                inode.lock_fds = {}
            inode.lock_fds[owner] = fd
            return fd

    def _drop_owner(self, inode: _Inode, owner: int) -> None:
        if inode.lock_fds is None and inode.lock_pids is None:
            # No owner ever locked this inode (the common FLUSH): both tables are created
            # under inode.lock and never set back to None while the inode is alive, so the
            # unlocked read answers what the locked one would at this instant.
            return
        with inode.lock:
            fds = inode.lock_fds
            fd = fds.pop(owner, None) if fds is not None else None
            if inode.lock_pids is not None:
                inode.lock_pids.pop(owner, None)
        if fd is not None:
            os.close(fd)
            self.budget.give()

    @staticmethod
    def _flock_struct(lk: FileLock) -> bytes:
        if lk.type not in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK):
            raise FuseError(errno.EINVAL)
        if lk.start > _OFFSET_MAX or lk.end < lk.start:
            raise FuseError(errno.EINVAL)
        length = 0 if lk.end >= _OFFSET_MAX else lk.end - lk.start + 1
        return _FLOCK.pack(lk.type, os.SEEK_SET, lk.start, length, 0)

    def getlk(self, ctx: Context, ino: int, arg: LkIn) -> FileLock:
        inode = self._inode(ino)
        fd = self._owner_fd(inode, arg.owner)
        try:
            out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, self._flock_struct(arg.lk))
        except OSError as exc:
            raise _oserror(exc) from None
        ltype, _, start, length, _pid = _FLOCK.unpack(out)
        if ltype == fcntl.F_UNLCK:
            return FileLock(0, 0, fcntl.F_UNLCK, 0)
        end = _OFFSET_MAX if length == 0 else start + length - 1
        return FileLock(start, end, ltype, self._holder_pid(inode, arg.owner, ltype, start,
                                                            length))

    def _holder_pid(self, inode: _Inode, asker: int, ltype: int, start: int,
                    length: int) -> int:
        """The pid of the owner holding a conflicting lock (0 = unknown: a host process).

        OFD locks carry no pid (l_pid = -1), so it is the pid the kernel gave with that owner's
        SETLK.  The holder is the other owner for which the conflicting range does not conflict
        (a lock never conflicts with its own description).
        """
        with inode.lock:
            pids = dict(inode.lock_pids or {})
            fds = {o: fd for o, fd in (inode.lock_fds or {}).items() if o != asker and o in pids}
        if len(fds) == 1:
            return next(pids[o] for o in fds)
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        for owner, fd in fds.items():
            try:
                seen = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))
            except OSError:
                continue
            if seen[0] == fcntl.F_UNLCK or (seen[0], seen[2], seen[3]) != (ltype, start, length):
                return pids[owner]
        return 0

    def setlk(self, ctx: Context, ino: int, arg: LkIn, wait: bool) -> None:
        """POSIX locks per lock owner (OFD), or a BSD flock on the handle with LkFlags.FLOCK.

        SETLKW polls the non-blocking call with a growing pause (1 ms to 50 ms) instead of
        blocking in fcntl: a blocked worker thread could never be woken, whereas the poll gives
        up with EINTR as soon as the kernel interrupts the request (the guest process got a
        signal) or the filesystem is torn down.
        """
        if arg.lk_flags & LkFlags.FLOCK:
            handle = self._handle(arg.fh)
            op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX,
                  fcntl.F_UNLCK: fcntl.LOCK_UN}.get(arg.lk.type)
            if op is None:
                raise FuseError(errno.EINVAL)
            fd = handle.fd
            # A flock dies with its open file, but the kernel tells us with an asynchronous
            # RELEASE (FLOCK_UNLOCK) that may still be in another reader's hands when the
            # next flock arrives: close(a); flock(b, LOCK_NB) would see a stale conflict.
            # A non-blocking attempt therefore gets a short grace (~15 ms) before EAGAIN.
            self._wait_lock(ctx, wait, lambda: fcntl.flock(fd, op | fcntl.LOCK_NB),
                            grace=0.015)
            return
        inode = self._inode(ino)
        if arg.lk.type == fcntl.F_UNLCK:
            fds = inode.lock_fds
            if fds is None or arg.owner not in fds:
                return  # nothing held by that owner
        request = self._flock_struct(arg.lk)
        fd = self._owner_fd(inode, arg.owner)
        self._wait_lock(ctx, wait, lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request))
        if arg.lk.type != fcntl.F_UNLCK:
            with inode.lock:
                if inode.lock_pids is None:
                    inode.lock_pids = {}
                inode.lock_pids[arg.owner] = arg.lk.pid

    def _wait_lock(self, ctx: Context, wait: bool, attempt: Callable[[], object],
                   grace: float = 0.0) -> None:
        """Try ``attempt`` until it succeeds (``wait``), or for ``grace`` seconds at most."""
        pause = 0.001
        waited = 0.0
        while True:
            try:
                attempt()
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or (
                        not wait and waited >= grace):
                    raise _oserror(exc) from None
            if ctx.interrupted or self._closed.is_set():
                raise FuseError(errno.EINTR)
            self._closed.wait(pause)
            waited += pause
            pause = min(pause * 2, 0.05)

    # ---------------------------------------------------------------------------------------
    # Extended attributes

    def _xattr_inode(self, ino: int) -> _Inode:
        if not self.xattr:
            raise FuseError(errno.ENOSYS)
        return self._inode(ino)

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if type(name) is not bytes or not name or b"\0" in name:
            raise FuseError(errno.EINVAL)
        if len(name) > _XATTR_NAME_MAX:
            raise FuseError(errno.ERANGE)

    def setxattr(self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int) -> None:
        inode = self._xattr_inode(ino)
        self._check_writable()
        self._check_xattr_name(name)
        if len(value) > _XATTR_SIZE_MAX:
            raise FuseError(errno.E2BIG)
        if flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
            raise FuseError(errno.EINVAL)
        host = self.xattrmap.to_server(name) if self.xattrmap is not None else name
        try:
            # Through the magic link: works for O_PATH-only inodes (symlinks, FIFOs, devices)
            # without opening them.
            self._on_inode(inode, os.setxattr, host, value, flags)
        except OSError as exc:
            raise _oserror(exc) from None

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        inode = self._xattr_inode(ino)
        self._check_xattr_name(name)
        host = (self.xattrmap.to_server(name, getting=True) if self.xattrmap is not None
                else name)
        try:
            return self._on_inode(inode, os.getxattr, host)
        except OSError as exc:
            raise _oserror(exc) from None

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        inode = self._xattr_inode(ino)
        try:
            names = [os.fsencode(n) for n in self._on_inode(inode, os.listxattr)]
        except OSError as exc:
            raise _oserror(exc) from None
        if self.xattrmap is None:
            return names
        out = []
        for host in names:
            client = self.xattrmap.to_client(host)
            if client is not None:
                out.append(client)
        return out

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        inode = self._xattr_inode(ino)
        self._check_writable()
        self._check_xattr_name(name)
        host = self.xattrmap.to_server(name) if self.xattrmap is not None else name
        try:
            self._on_inode(inode, os.removexattr, host)
        except OSError as exc:
            raise _oserror(exc) from None

    # ---------------------------------------------------------------------------------------
    # Directories

    def opendir(self, ctx: Context, ino: int, flags: int) -> OpenOut:
        inode = self._inode(ino)
        if inode.kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        self.budget.take()
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=inode.fd)
        except OSError as exc:
            self.budget.give()
            raise _oserror(exc) from None
        fh, _ = self._new_handle(inode, fd, os.O_RDONLY, True)
        return OpenOut(fh, self._dir_flags_reply, 0)

    def _dirents(self, handle: _Handle, offset: int) -> Iterator[tuple[int, int, int, bytes]]:
        """``(ino, cookie, type, name)`` from ``offset`` on: getdents64 and the filesystem's
        own telldir cookies, so every READDIR resumes in O(1) (no re-listing, no snapshot)."""
        buf = ctypes.create_string_buffer(8192)
        while True:
            with handle.lock:
                if handle.fd < 0:
                    return
                try:
                    os.lseek(handle.fd, offset, os.SEEK_SET)
                except OSError as exc:
                    raise _oserror(exc) from None
                n = _getdents64(handle.fd, buf, len(buf))
            if n < 0:
                raise _oserror(OSError(ctypes.get_errno(), "getdents64"))
            if n == 0:
                return
            data = buf.raw[:n]
            pos = 0
            while pos < n:
                ino, cookie, reclen, dtype = _DIRENT64.unpack_from(data, pos)
                if reclen <= 0:  # pragma: no cover - the kernel never produces this
                    return
                end = data.index(b"\0", pos + 19, pos + reclen)
                yield ino, cookie, dtype, data[pos + 19:end]
                pos += reclen
                offset = cookie

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> Iterator[DirEntry]:
        handle = self._dir_handle(fh)
        if offset >= 1 << 63:
            return iter(())
        return (_new(DirEntry, (i, c, t, n, None)) for i, c, t, n in self._dirents(handle, offset))

    def readdirplus(self, ctx: Context, ino: int, fh: int, offset: int) -> Iterator[DirEntry]:
        """Entries with a lookup each (relative to the open directory); "." and ".." and
        entries that vanish meanwhile come without one (nodeid 0: the kernel skips them)."""
        handle = self._dir_handle(fh)
        if offset >= 1 << 63:
            return iter(())
        return self._plus(handle, offset)

    def _plus(self, handle: _Handle, offset: int) -> Iterator[DirEntry]:
        inode = handle.inode
        for i, c, t, name in self._dirents(handle, offset):
            entry = None
            if name != b"." and name != b"..":
                try:
                    entry = self._lookup_at(handle.fd, name, inode)
                except FuseError:
                    entry = None
            yield _new(DirEntry, (i, c, t, name, entry))

    def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        with self._lock:
            handle = self._handles.get(fh)
            if handle is None or not handle.is_dir:
                raise FuseError(errno.EBADF)
            del self._handles[fh]

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        handle = self._dir_handle(fh)
        try:
            (os.fdatasync if datasync else os.fsync)(handle.fd)
        except OSError as exc:
            raise _oserror(exc) from None

    def syncfs(self, ctx: Context, ino: int) -> None:
        inode = self._inode(ino)
        # syncfs(2) refuses O_PATH fds: open the directory (or the root) for reading.
        target = inode if inode.kind == stat.S_IFDIR else self._root
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=target.fd)
        except OSError as exc:
            raise _oserror(exc) from None
        try:
            if _syncfs(fd):
                raise _oserror(OSError(ctypes.get_errno(), "syncfs"))
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------------------------
    # DAX hook (issue 5): the rules live in virtiofs/server/dax.py (DaxServer); here only how
    # to get a descriptor of one of our files.

    def setupmapping(self, ctx: Context, ino: int, arg: SetupMappingIn) -> None:
        dax = self._dax
        if dax is None:
            raise FuseError(errno.ENOSYS)
        inode = self._inode(ino)
        dax.setup(ino, arg, lambda writable: self._dax_fd(inode, arg.fh, writable))

    def removemapping(self, ctx: Context, ino: int, items: Sequence[RemoveMappingOne]) -> None:
        dax = self._dax
        if dax is None:
            raise FuseError(errno.ENOSYS)
        dax.remove(ino, items)

    def _dax_fd(self, inode: _Inode, fh: int, writable: bool) -> int:
        """A new fd of ``inode`` to map: from handle ``fh`` (which must be an open handle of
        this inode), or opened O_RDWR/O_RDONLY for ``fh == FH_NONE``; regular files only."""
        if inode.kind != stat.S_IFREG:
            raise FuseError(errno.EBADF)
        if writable:
            self._check_writable()
        if fh != FH_NONE:
            handle = self._handle(fh)
            if handle.inode is not inode:
                raise FuseError(errno.EBADF)
            try:
                return os.dup(handle.fd)
            except OSError as exc:
                raise _oserror(exc) from None
        try:
            return self._reopen(inode, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise _oserror(exc) from None

    # ---------------------------------------------------------------------------------------
    # Introspection (tests, monitoring)

    def stats(self) -> dict[str, int]:
        """Counts of what the filesystem holds: inodes, handles, fds, budget."""
        return {"inodes": len(self._inodes), "handles": len(self._handles),
                "fds": self.budget.used, "max_fds": self.budget.limit}

    def nlookup(self, nodeid: int) -> int:
        """The lookup count of a node id (0 if unknown)."""
        inode = self._inodes.get(nodeid)
        return inode.nlookup if inode is not None else 0


def _ioctl_backing(fuse_fd: int) -> tuple[Callable[[int], int], Callable[[int], None]]:
    """BACKING_OPEN/BACKING_CLOSE on a /dev/fuse fd (SPEC.md 1.5: struct fuse_backing_map)."""

    def backing_open(fd: int) -> int:
        arg = bytearray(struct.pack("<iIQ", fd, 0, 0))
        # With a mutable buffer, fcntl.ioctl returns the ioctl's return value: the backing id.
        return int(fcntl.ioctl(fuse_fd, DEV_IOC_BACKING_OPEN, arg, True))

    def backing_close(backing_id: int) -> None:
        fcntl.ioctl(fuse_fd, DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("<i", backing_id)), True)

    return backing_open, backing_close
