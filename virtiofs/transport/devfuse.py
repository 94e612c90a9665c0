"""Serve a ``Filesystem`` to the host kernel through /dev/fuse.

    with mount(MemoryFS(), "/mnt/x") as m:     # mounted, INIT answered
        open("/mnt/x/hello", "w").write("hi")
    # unmounted

    serve(MyFS(), "/mnt/x")                     # foreground: until unmounted or SIGINT/SIGTERM

Mounting needs root: ``mount(2)`` with data ``fd=N,rootmode=40000,user_id=U,group_id=G`` (plus
``default_permissions``, ``allow_other``, ``max_read=``), type ``fuse.SUBTYPE``, source the
fsname; no fusermount (FACTS.md).  ``default_permissions`` is on unless asked otherwise: the
kernel then checks permissions from the attributes we return.

Serving: ``threads`` reader threads, each on its own /dev/fuse descriptor cloned from the
mount's with FUSE_DEV_IOC_CLONE, each with one read buffer of ``read_buffer_size(max_write)``
bytes allocated once (a smaller buffer gets EINVAL, FACTS.md).  Blocking reads: the kernel wakes
one reader per request (the /dev/fuse wait queue is exclusive).  A reader hands the request to
the ``Dispatcher`` (inline, or the worker pool for SETLKW) and writes the reply with one
``writev``.  ENOENT on a reply write means the kernel no longer waits for that request
(interrupted or aborted): ignored quietly.  ENODEV on a read means the connection is gone — an
unmount from outside, or ours — and the reader ends; when the last one ends the mount is over.

Unmounting: plain ``umount2``; if the mount is busy, ``MNT_FORCE | MNT_DETACH`` (MNT_FORCE
aborts the FUSE connection, fs/fuse/inode.c ``fuse_umount_begin``, so blocked readers return
and processes still inside get ENOTCONN — what libfuse's lazy unmount plus process exit does).
Only a mount still carrying our device number is ever unmounted.

Notifications (``inval_inode``, ``inval_entry``, ``delete``, ``store``, ``retrieve``) are written
to the mount's descriptor.  Never send one from inside a handler for a request that holds the
same inode's lock in the kernel (an ``inval_entry`` on the directory being looked up blocks
forever — libfuse's documented deadlock); ``retrieve`` needs a free reader to receive the
kernel's answer, so call it from outside the handlers.

Serving a mount from inside the process that uses it (tests, embedders) works, with one
exception: do not ``mmap`` its files from that process.  A page fault holds the process's
mmap lock while the kernel waits for our READ, and a server thread that allocates memory then
waits for that same lock (posix_suite runs its mmap check in a child for this reason).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from ..errors import FuseError, LocalProtocolError
from ..protocol.constants import DEV_IOC_BACKING_CLOSE, DEV_IOC_BACKING_OPEN, DEV_IOC_CLONE
from ..server.dispatch import DEFAULT_POOLED, Dispatcher, WorkerPool
from ..server.filesystem import Filesystem
from ..server.session import (
    DEFAULT_MAX_READAHEAD,
    DEFAULT_MAX_WRITE,
    ReplyParts,
    Session,
    read_buffer_size,
)

__all__ = ["FuseMount", "MountEntry", "MountOptions", "fuse_mounts_under", "is_mountpoint",
           "lazy_unmount", "mount", "mount_entry", "mounted", "serve"]

log = logging.getLogger("virtiofs.devfuse")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2
_INIT_TIMEOUT = 10.0
_END_TIMEOUT = 5.0

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        _libc = lib
    return _libc


def _sys_mount(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes) -> None:
    if _c().mount(source, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target.decode(errors='replace')}: {os.strerror(err)}")


def _sys_umount(target: bytes, flags: int) -> None:
    if _c().umount2(target, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target.decode(errors='replace')}: {os.strerror(err)}")


# ----------------------------------------------------------------------------- mount table


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    dev: tuple[int, int]
    fstype: str
    source: str
    options: str


def _mountinfo() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 6 or len(rest) < 2:
                continue
            major, _, minor = fields[2].partition(":")
            entries.append(MountEntry(_unescape(fields[4]), (int(major), int(minor)), rest[0],
                                      _unescape(rest[1]), fields[5]))
    return entries


def _real(path: str | os.PathLike[str]) -> str:
    # Resolve the parent only: stat()ing the mount point itself would send the kernel to the
    # FUSE server, which may be dead or not yet serving (a hang until INIT, or ENOTCONN).
    raw = os.path.abspath(os.fspath(path)).rstrip("/") or "/"
    if raw == "/":
        return raw
    parent, name = os.path.split(raw)
    return os.path.join(os.path.realpath(parent), name)


def mount_entry(path: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``, or None."""
    real = _real(path)
    found = None
    for entry in _mountinfo():
        if entry.mountpoint == real:
            found = entry
    return found


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted at ``path`` (by the mount table: never touches a possibly
    dead FUSE mount, where ``os.path.ismount`` would get ENOTCONN)."""
    return mount_entry(path) is not None


def fuse_mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """FUSE mount points at or below ``path`` (to check that nothing leaked)."""
    real = _real(path).rstrip("/") + "/"
    return [e.mountpoint for e in _mountinfo()
            if e.fstype.startswith("fuse") and (e.mountpoint + "/").startswith(real)]


def lazy_unmount(path: str | os.PathLike[str]) -> bool:
    """Detach whatever is mounted at ``path`` (MNT_DETACH), repeatedly for stacked mounts.
    True if something was unmounted.  For test cleanup: never raises."""
    done = False
    target = os.fsencode(_real(path))
    # Stacked mounts: at most as many as the mount table holds.
    for _ in range(len(_mountinfo()) + 1):
        if not is_mountpoint(path):
            break
        try:
            _sys_umount(target, MNT_DETACH)
            done = True
        except OSError as exc:
            log.warning("lazy unmount of %s failed: %s", path, exc)
            break
    return done


# ---------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MountOptions:
    """How to mount and serve.

    ``fsname`` is the mount's source (what ``df`` and /proc/mounts show), ``subtype`` makes the
    type ``fuse.SUBTYPE``.  ``threads`` reader threads; ``workers`` pool threads for requests
    that may wait (SETLKW).  ``max_write``/``max_readahead`` go into INIT.
    """

    fsname: str = "virtiofs"
    subtype: str = "virtiofs"
    allow_other: bool = False
    default_permissions: bool = True
    read_only: bool = False
    max_read: int | None = None
    threads: int = 2
    workers: int = 4
    max_write: int = DEFAULT_MAX_WRITE
    max_readahead: int = DEFAULT_MAX_READAHEAD
    uid: int | None = None
    gid: int | None = None

    def validate(self) -> None:
        """Refuse values that could smuggle another mount option (SECURITY.md B6 #16)."""
        if not self.subtype or not all(c.isalnum() or c in "._-" for c in self.subtype):
            raise LocalProtocolError(f"bad subtype {self.subtype!r}")
        if not self.fsname or "\0" in self.fsname:
            raise LocalProtocolError(f"bad fsname {self.fsname!r}")
        if self.threads < 1 or self.workers < 0:
            raise LocalProtocolError("threads must be >= 1 and workers >= 0")
        if self.max_read is not None and not 0 < self.max_read < 1 << 32:
            raise LocalProtocolError(f"bad max_read {self.max_read}")

    def data(self, fd: int) -> str:
        """The mount(2) data string for the /dev/fuse descriptor ``fd``."""
        uid = os.getuid() if self.uid is None else self.uid
        gid = os.getgid() if self.gid is None else self.gid
        parts = [f"fd={int(fd)}", f"rootmode={stat.S_IFDIR:o}", f"user_id={int(uid)}",
                 f"group_id={int(gid)}"]
        if self.default_permissions:
            parts.append("default_permissions")
        if self.allow_other:
            parts.append("allow_other")
        if self.max_read is not None:
            parts.append(f"max_read={int(self.max_read)}")
        return ",".join(parts)


_OPTION_NAMES = frozenset(MountOptions.__dataclass_fields__)


def _options(kw: dict[str, Any]) -> MountOptions:
    unknown = set(kw) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown mount options: {', '.join(sorted(unknown))}")
    opts = MountOptions(**kw)
    opts.validate()
    return opts


# ------------------------------------------------------------------------------------ mount


def _write_failed(exc: OSError) -> None:
    if exc.errno == errno.ENOENT:
        log.debug("reply for an interrupted request dropped by the kernel")
    elif exc.errno in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
        log.debug("reply after the connection ended: %s", exc)
    else:
        # EINVAL here would be a malformed reply: a bug the session must prevent.
        log.error("reply write failed: %s", exc)


class FuseMount:
    """A filesystem mounted through /dev/fuse and being served.

    Created by ``mount()``; usable as a context manager (unmounts on exit).  ``session`` is the
    ``Session``; ``wait()`` blocks until the connection ends; ``unmount()`` ends it.
    """

    def __init__(self, fs: Filesystem, mountpoint: str | os.PathLike[str],
                 options: MountOptions) -> None:
        self.fs = fs
        self.options = options
        self.mountpoint = _real(mountpoint)
        self.session = Session(fs, max_write=options.max_write,
                               max_readahead=options.max_readahead)
        self.pool = WorkerPool(options.workers, name="virtiofs-fuse-worker") \
            if options.workers else None
        self.dispatcher = Dispatcher(self.session, self.pool, pooled=DEFAULT_POOLED)
        self.dev: tuple[int, int] | None = None
        self._fds: list[int] = []
        self._threads: list[threading.Thread] = []
        self._alive = 0
        self._alive_lock = threading.Lock()
        self.ended = threading.Event()
        """Set when every reader has stopped: the connection is over."""
        self._wake = threading.Event()
        self._closed = False
        self._unmount_lock = threading.Lock()
        self._bufsize = read_buffer_size(options.max_write)

    # ---------------------------------------------------------------------------- start

    def _start(self) -> None:
        target = os.fsencode(self.mountpoint)
        if not os.path.isdir(self.mountpoint):
            raise FileNotFoundError(errno.ENOENT if not os.path.exists(self.mountpoint)
                                    else errno.ENOTDIR,
                                    f"mount point {self.mountpoint} is not a directory")
        if is_mountpoint(self.mountpoint):
            raise OSError(errno.EBUSY, f"{self.mountpoint} is already a mount point")
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(fd)
        # Kernel passthrough (FUSE_PASSTHROUGH): the filesystem registers backing files on
        # this descriptor; offered before mount(2) because INIT arrives from inside it.
        self.session.extra.update(backing_open=self.backing_open,
                                  backing_close=self.backing_close)
        try:
            flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if self.options.read_only else 0)
            _sys_mount(os.fsencode(self.options.fsname), target,
                       f"fuse.{self.options.subtype}".encode(), flags,
                       self.options.data(fd).encode())
        except BaseException:
            self._close_fds()
            raise
        entry = mount_entry(self.mountpoint)
        self.dev = entry.dev if entry is not None else None
        try:
            for i in range(self.options.threads):
                rfd = fd if i == 0 else self._clone(fd)
                t = threading.Thread(target=self._reader, args=(rfd,), daemon=True,
                                     name=f"virtiofs-fuse-reader-{i}")
                with self._alive_lock:
                    self._alive += 1
                self._threads.append(t)
                t.start()
            # The kernel sent INIT from mount(2) (fuse_fill_super); wait for our answer so the
            # mount is usable when we return.
            if not self.session.initialized.wait(_INIT_TIMEOUT):
                raise TimeoutError(f"no INIT from the kernel within {_INIT_TIMEOUT} s")
        except BaseException:
            self.unmount()
            raise
        log.info("mounted %s at %s (%d readers)", self.options.fsname, self.mountpoint,
                 self.options.threads)

    def backing_open(self, fd: int) -> int:
        """FUSE_DEV_IOC_BACKING_OPEN: register ``fd`` (a regular file, O_PATH is fine) as a
        passthrough backing file of this connection; returns its backing id (SPEC.md 1.5,
        ``struct fuse_backing_map {i32 fd; u32 flags; u64 padding}``).  Needs CAP_SYS_ADMIN and
        FUSE_PASSTHROUGH negotiated; raises OSError otherwise."""
        arg = bytearray(struct.pack("<iIQ", fd, 0, 0))
        # With a mutable buffer fcntl.ioctl returns the ioctl's own result: the id.
        return int(fcntl.ioctl(self._fds[0], DEV_IOC_BACKING_OPEN, arg, True))

    def backing_close(self, backing_id: int) -> None:
        """FUSE_DEV_IOC_BACKING_CLOSE: drop a backing id (open files keep their backing)."""
        fcntl.ioctl(self._fds[0], DEV_IOC_BACKING_CLOSE,
                    bytearray(struct.pack("<i", backing_id)), True)

    def _clone(self, fd: int) -> int:
        cfd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(cfd)
        fcntl.ioctl(cfd, DEV_IOC_CLONE, struct.pack("I", fd))
        return cfd

    # --------------------------------------------------------------------------- serving

    def _reader(self, fd: int) -> None:
        # The loop every request goes through: names bound to locals, one read buffer reused,
        # requests served inline (the session directly: the dispatcher only for the opcodes it
        # may pool, found by the opcode's low byte), the reply written here with one write or
        # writev.  Measured against the bare loop of benchmarks/devfuse.py ``floor``.
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        bufs = [buf]
        readv = os.readv
        write = os.write
        writev = os.writev
        dispatcher = self.dispatcher
        dispatch = dispatcher.dispatch
        handle = self.session.handle
        send = self._sender(fd)
        try:
            while True:
                try:
                    n = readv(fd, bufs)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        # The request was interrupted/aborted between wake-up and copy.
                        continue
                    if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                        break
                    if exc.errno == errno.EBADF and self._closed:
                        break
                    log.error("read from /dev/fuse failed: %s; reader stops", exc)
                    break
                if n == 0:
                    break
                try:
                    if n < 8 or buf[4] not in dispatcher.pooled_low:
                        parts = handle(view[:n])
                    else:
                        dispatch(view[:n], send)
                        continue
                except Exception:
                    # Session.handle never raises on peer input; this is a transport bug.
                    log.exception("dispatch failed")
                    continue
                if parts is None:
                    continue
                try:
                    if len(parts) == 1:
                        write(fd, parts[0])
                    else:
                        writev(fd, parts)
                except OSError as exc:
                    _write_failed(exc)
        finally:
            with self._alive_lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                log.info("connection to %s ended", self.mountpoint)
                # Nobody will send DESTROY on a /dev/fuse mount: the filesystem ends here.
                self.session.close()
                self.ended.set()
                self._wake.set()

    def _sender(self, fd: int) -> Any:
        write = os.write
        writev = os.writev

        def send(parts: ReplyParts) -> None:
            try:
                if len(parts) == 1:
                    write(fd, parts[0])
                else:
                    writev(fd, parts)
            except OSError as exc:
                _write_failed(exc)
        return send

    # --------------------------------------------------------------------------- ending

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the connection ends (or ``timeout``); True if it ended."""
        return self.ended.wait(timeout)

    def _still_ours(self) -> bool:
        entry = mount_entry(self.mountpoint)
        return entry is not None and (self.dev is None or entry.dev == self.dev)

    def unmount(self, timeout: float = _END_TIMEOUT) -> None:
        """Unmount (if still mounted), stop serving, release everything.  Idempotent."""
        with self._unmount_lock:
            target = os.fsencode(self.mountpoint)
            if self._still_ours():
                if self._threads and not self.ended.is_set():
                    try:
                        _sys_umount(target, 0)
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:
                            log.warning("%s is busy: aborting the connection and detaching",
                                        self.mountpoint)
                            with contextlib.suppress(OSError):
                                _sys_umount(target, MNT_FORCE | MNT_DETACH)
                        elif exc.errno not in (errno.EINVAL, errno.ENOENT):
                            log.error("unmount %s failed: %s", self.mountpoint, exc)
                else:
                    # Never served (start failed) or already dead: only the entry is left.
                    with contextlib.suppress(OSError):
                        _sys_umount(target, MNT_DETACH)
            if self._threads and not self.ended.wait(timeout):
                # Still served: the detached tree is in use. Abort through MNT_FORCE if the
                # mount point still holds it, else give up waiting (threads are daemons).
                if self._still_ours():
                    with contextlib.suppress(OSError):
                        _sys_umount(target, MNT_FORCE | MNT_DETACH)
                if not self.ended.wait(timeout):
                    log.error("readers of %s did not stop; leaving them", self.mountpoint)
            self.session.close()
            self.dispatcher.close(timeout)
            if self.ended.is_set() or not self._threads:
                self._close_fds()

    def _close_fds(self) -> None:
        # Only once no reader can use them: a closed number may be reused by the process.
        self._closed = True
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Alias of ``unmount``."""
        self.unmount()

    def __enter__(self) -> FuseMount:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unmount()

    # -------------------------------------------------------------------- notifications

    def _notify(self, message: bytes) -> bool:
        if not self._fds or self.ended.is_set():
            raise FuseError(errno.ENOTCONN)
        try:
            os.write(self._fds[0], message)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise FuseError(exc.errno or errno.EIO, str(exc)) from None
        return True

    def inval_inode(self, ino: int, offset: int = 0, length: int = 0) -> bool:
        """Drop the kernel's cached attributes and data range of ``ino`` (length 0: to the
        end; offset < 0: attributes only).  False if the kernel does not know ``ino``."""
        return self._notify(self.session.notify_inval_inode(ino, offset, length))

    def inval_entry(self, parent: int, name: bytes, expire_only: bool = False) -> bool:
        """Drop the kernel's dentry ``name`` in ``parent``.  False if it was not cached."""
        return self._notify(self.session.notify_inval_entry(parent, name, expire_only))

    def delete(self, parent: int, child: int, name: bytes) -> bool:
        """Tell the kernel ``name`` (node ``child``) was removed from ``parent``."""
        return self._notify(self.session.notify_delete(parent, child, name))

    def store(self, ino: int, offset: int, data: bytes) -> bool:
        """Put ``data`` into the kernel's page cache of ``ino`` at ``offset``."""
        return self._notify(self.session.notify_store(ino, offset, data))

    def retrieve(self, ino: int, offset: int, size: int, timeout: float = 5.0) -> bytes:
        """What the kernel's page cache holds of ``ino`` from ``offset`` (at most ``size``
        bytes, contiguous cached pages only).  Raises FuseError(ENOENT) when the kernel does
        not know ``ino``, TimeoutError without an answer."""
        done = threading.Event()
        box: list[bytes] = []

        def got(offset: int, data: bytes) -> None:
            box.append(data)
            done.set()

        message, notify_unique = self.session.notify_retrieve(ino, offset, size, got)
        try:
            if not self._notify(message):
                raise FuseError(errno.ENOENT)
            if not done.wait(timeout):
                raise TimeoutError(f"no NOTIFY_REPLY for retrieve {notify_unique}")
        finally:
            self.session.cancel_retrieve(notify_unique)
        return box[0]


def mount(fs: Filesystem, mountpoint: str | os.PathLike[str], **options: Any) -> FuseMount:
    """Mount ``fs`` at ``mountpoint`` and serve it in background threads.

    Returns once INIT is answered; use the result as a context manager, or call ``unmount()``.
    ``options`` are ``MountOptions`` fields.  Raises OSError when the mount point is missing
    (ENOENT/ENOTDIR), already a mount point (EBUSY), or mount(2) fails (EPERM without root).
    """
    m = FuseMount(fs, mountpoint, _options(options))
    m._start()
    return m


def serve(fs: Filesystem, mountpoint: str | os.PathLike[str], **options: Any) -> int:
    """Mount ``fs`` and serve it in the foreground until it is unmounted or SIGINT/SIGTERM
    arrives (handlers installed only when called from the main thread).  Returns 0."""
    previous: dict[signal.Signals, Any] = {}
    signalled: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signalled.append(signum)  # the serving loop below looks every 0.2 s

    # The handlers go in before mount(2): whoever sees the mount may signal at once, and a
    # signal must then unmount cleanly rather than kill the process with the mount left behind.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        m = mount(fs, mountpoint, **options)
        try:
            # Woken by the last reader or a signal; the slice only bounds each wait.
            while not signalled and not m._wake.wait(0.2):
                pass
            if signalled:
                log.info("signal %d: unmounting %s", signalled[0], m.mountpoint)
        finally:
            m.unmount()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


@contextlib.contextmanager
def mounted(fs: Filesystem, mountpoint: str | os.PathLike[str],
            **options: Any) -> Iterator[FuseMount]:
    """``with mounted(fs, path) as m:`` — the same as ``with mount(fs, path) as m:``."""
    m = mount(fs, mountpoint, **options)
    try:
        yield m
    finally:
        m.unmount()
