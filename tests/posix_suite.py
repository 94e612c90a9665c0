"""POSIX checks that run against any directory (go-fuse's ``posixtest`` model, STYLE.md #13).

``CHECKS`` maps a name to a function taking the path of an empty, writable directory; a check
returns None or raises (AssertionError, OSError).  The same checks run on a plain directory (the
reference: tmpfs/ext4 pass them all), on MemoryFS and PassthroughFS over /dev/fuse, through the
loopback client and inside a guest:

    python tests/posix_suite.py DIR [NAME...]      # prints one line per check, exit 1 on failure
    posix_suite.run_all(DIR)                       # raises AssertionError listing failures

Stdlib only.  Run as root (chown, mknod, the setuid probes).  Checks named in ``NEEDS_OTHERS``
switch to uid 65534 in a child process: on a FUSE mount they need ``allow_other``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Collection

Check = Callable[[str], None]
CHECKS: dict[str, Check] = {}
NEEDS_OTHERS: set[str] = set()
NOBODY = 65534
_WAIT = 10.0
"""Seconds any check waits for a child process before failing."""


def check(fn: Check) -> Check:
    CHECKS[fn.__name__] = fn
    return fn


def _p(d: str, *names: str) -> str:
    return os.path.join(d, *names)


def _write(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _errno(expected: int | tuple[int, ...], fn: Callable[..., object], *args: object) -> None:
    want = expected if isinstance(expected, tuple) else (expected,)
    try:
        fn(*args)
    except OSError as exc:
        assert exc.errno in want, f"{fn.__name__}{args}: {errno.errorcode.get(exc.errno or 0)}" \
            f", expected {[errno.errorcode[e] for e in want]}"
        return
    raise AssertionError(f"{fn.__name__}{args} succeeded, expected "
                         f"{[errno.errorcode[e] for e in want]}")


def _child(fn: Callable[[], int]) -> int:
    """Run ``fn`` in a forked child; its return value is the exit status (bounded wait)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = fn()
        except BaseException:
            code = 99
        finally:
            os._exit(code)
    return _reap(pid)


def _reap(pid: int, timeout: float = _WAIT) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish within {timeout} s")


_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _linkat_follow(src: str, dst: str) -> None:
    # os.link() calls link(2), which does not follow /proc/self/fd magic links.
    if _libc.linkat(-100, os.fsencode(src), -100, os.fsencode(dst), 0x400) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst)


def _getxattr_size(path: str, name: str, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(os.fsencode(path), name.encode(), buf if size else None, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(n)


def _listxattr_size(path: str, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.listxattr(os.fsencode(path), buf if size else None, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(n)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

# ------------------------------------------------------------------------------ regular files


@check
def create_read_write(d: str) -> None:
    _write(_p(d, "f"), b"hello world")
    assert _read(_p(d, "f")) == b"hello world"
    st = os.stat(_p(d, "f"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11 and st.st_nlink == 1


@check
def exclusive_create(d: str) -> None:
    os.close(os.open(_p(d, "f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    _errno(errno.EEXIST, os.open, _p(d, "f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    assert stat.S_IMODE(os.stat(_p(d, "f")).st_mode) == 0o600 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@check
def open_trunc(d: str) -> None:
    _write(_p(d, "f"), b"x" * 5000)
    os.close(os.open(_p(d, "f"), os.O_WRONLY | os.O_TRUNC))
    assert os.stat(_p(d, "f")).st_size == 0 and _read(_p(d, "f")) == b""


@check
def append_mode(d: str) -> None:
    _write(_p(d, "f"), b"abc")
    fd = os.open(_p(d, "f"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"def")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"ghi")
    finally:
        os.close(fd)
    assert _read(_p(d, "f")) == b"abcdefghi"


@check
def pwrite_beyond_eof_leaves_zeros(d: str) -> None:
    fd = os.open(_p(d, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"tail", 10000)
        assert os.fstat(fd).st_size == 10004
        assert os.pread(fd, 10004, 0) == bytes(10000) + b"tail"
        assert os.pread(fd, 100, 10004) == b""
    finally:
        os.close(fd)


@check
def truncate_extend_and_shrink(d: str) -> None:
    _write(_p(d, "f"), b"0123456789")
    os.truncate(_p(d, "f"), 4)
    assert _read(_p(d, "f")) == b"0123"
    os.truncate(_p(d, "f"), 8)
    assert _read(_p(d, "f")) == b"0123" + bytes(4)
    fd = os.open(_p(d, "f"), os.O_RDWR)
    try:
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
    finally:
        os.close(fd)
    assert _read(_p(d, "f")) == b"01"


@check
def large_file_roundtrip(d: str) -> None:
    data = os.urandom(3 << 20) + b"odd tail"
    _write(_p(d, "f"), data)
    assert os.stat(_p(d, "f")).st_size == len(data)
    assert _read(_p(d, "f")) == data
    fd = os.open(_p(d, "f"), os.O_RDONLY)
    try:
        assert os.pread(fd, 100_000, 1_000_000) == data[1_000_000:1_100_000]
    finally:
        os.close(fd)


@check
def huge_sparse_file(d: str) -> None:
    size = 1 << 36
    fd = os.open(_p(d, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, b"end", size - 3)
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, 11, size - 11) == bytes(8) + b"end"
        assert os.pread(fd, 16, 1 << 35) == bytes(16)
        assert os.fstat(fd).st_blocks * 512 < 1 << 24, "a sparse file should not be allocated"
    finally:
        os.close(fd)


@check
def unlinked_open_file_stays_readable(d: str) -> None:
    _write(_p(d, "f"), b"still here")
    fd = os.open(_p(d, "f"), os.O_RDWR)
    try:
        os.unlink(_p(d, "f"))
        assert not os.path.lexists(_p(d, "f"))
        assert os.fstat(fd).st_nlink == 0
        os.pwrite(fd, b"!", 10)
        assert os.pread(fd, 100, 0) == b"still here!"
    finally:
        os.close(fd)
    assert os.listdir(d) == []


@check
def mtime_ctime_follow_writes(d: str) -> None:
    _write(_p(d, "f"), b"a")
    os.utime(_p(d, "f"), ns=(1_000_000_000, 1_000_000_000))
    before = os.stat(_p(d, "f"))
    assert before.st_mtime_ns == 1_000_000_000
    _write(_p(d, "f"), b"b", os.O_WRONLY)
    after = os.stat(_p(d, "f"))
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns >= before.st_ctime_ns


@check
def utimens_nanoseconds(d: str) -> None:
    _write(_p(d, "f"), b"")
    os.utime(_p(d, "f"), ns=(1_234_567_891_123_456_789, 987_654_321_987_654_321))
    st = os.stat(_p(d, "f"))
    assert st.st_atime_ns == 1_234_567_891_123_456_789
    assert st.st_mtime_ns == 987_654_321_987_654_321
    t0 = time.time_ns()
    os.utime(_p(d, "f"))
    assert os.stat(_p(d, "f")).st_mtime_ns >= t0 - 2_000_000_000


@check
def chmod_chown(d: str) -> None:
    _write(_p(d, "f"), b"")
    ctime = os.stat(_p(d, "f")).st_ctime_ns
    os.chmod(_p(d, "f"), 0o4751)
    st = os.stat(_p(d, "f"))
    assert stat.S_IMODE(st.st_mode) == 0o4751 and stat.S_ISREG(st.st_mode)
    assert st.st_ctime_ns >= ctime
    if os.geteuid() == 0:
        os.chown(_p(d, "f"), 1234, 5678)
        st = os.stat(_p(d, "f"))
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        # chown by root clears set-user-ID on a regular file (VFS notify_change).
        assert not st.st_mode & stat.S_ISUID
        os.lchown(_p(d, "f"), -1, 42)
        assert os.stat(_p(d, "f")).st_gid == 42


@check
def fsync_and_fdatasync(d: str) -> None:
    fd = os.open(_p(d, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@check
def mmap_shared_write(d: str) -> None:
    _write(_p(d, "f"), bytes(8192))

    # In a child: a page fault on a FUSE file holds the faulting process's mmap lock while the
    # server answers, and a server thread in that same process that allocates memory would
    # wait for that lock (the suite also runs with the server inside the test process).
    def writer() -> int:
        fd = os.open(_p(d, "f"), os.O_RDWR)
        try:
            with mmap.mmap(fd, 8192) as m:
                m[100:105] = b"hello"
                m[5000:5003] = b"abc"
                m.flush()
                return 0 if m[100:105] == b"hello" else 2
        finally:
            os.close(fd)
    assert _child(writer) == 0
    data = _read(_p(d, "f"))
    assert data[100:105] == b"hello" and data[5000:5003] == b"abc"


# ---------------------------------------------------------------------------------- namespace


@check
def hard_links(d: str) -> None:
    _write(_p(d, "a"), b"shared")
    os.link(_p(d, "a"), _p(d, "b"))
    sa, sb = os.stat(_p(d, "a")), os.stat(_p(d, "b"))
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    _write(_p(d, "b"), b"changed", os.O_WRONLY | os.O_TRUNC)
    assert _read(_p(d, "a")) == b"changed"
    os.unlink(_p(d, "a"))
    assert os.stat(_p(d, "b")).st_nlink == 1 and _read(_p(d, "b")) == b"changed"
    _errno(errno.EEXIST, os.link, _p(d, "b"), _p(d, "b"))


@check
def link_to_directory_is_refused(d: str) -> None:
    os.mkdir(_p(d, "sub"))
    _errno(errno.EPERM, os.link, _p(d, "sub"), _p(d, "l"))


@check
def symlinks(d: str) -> None:
    _write(_p(d, "target"), b"via link")
    os.symlink("target", _p(d, "l"))
    assert os.readlink(_p(d, "l")) == "target"
    assert stat.S_ISLNK(os.lstat(_p(d, "l")).st_mode)
    assert os.lstat(_p(d, "l")).st_size == len("target")
    assert _read(_p(d, "l")) == b"via link"
    os.symlink("nowhere/at/all", _p(d, "dangling"))
    _errno(errno.ENOENT, os.stat, _p(d, "dangling"))
    assert os.readlink(_p(d, "dangling")) == "nowhere/at/all"
    _errno(errno.EEXIST, os.symlink, "x", _p(d, "l"))
    long = "x" * 1000
    os.symlink(long, _p(d, "long"))
    assert os.readlink(_p(d, "long")) == long


@check
def mkdir_rmdir_link_counts(d: str) -> None:
    os.mkdir(_p(d, "a"), 0o750)
    st = os.stat(_p(d, "a"))
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2
    assert stat.S_IMODE(st.st_mode) == 0o750 & ~_umask()
    os.mkdir(_p(d, "a", "b"))
    os.mkdir(_p(d, "a", "c"))
    assert os.stat(_p(d, "a")).st_nlink == 4
    _errno(errno.EEXIST, os.mkdir, _p(d, "a"))
    _errno(errno.ENOTEMPTY, os.rmdir, _p(d, "a"))
    os.rmdir(_p(d, "a", "b"))
    assert os.stat(_p(d, "a")).st_nlink == 3
    _write(_p(d, "f"), b"")
    _errno(errno.ENOTDIR, os.rmdir, _p(d, "f"))
    _errno(errno.EISDIR, os.unlink, _p(d, "a"))
    _errno(errno.EINVAL, os.rmdir, _p(d, "a", "c", "."))


@check
def missing_names(d: str) -> None:
    _errno(errno.ENOENT, os.stat, _p(d, "nope"))
    _errno(errno.ENOENT, os.stat, _p(d, "nope", "deeper"))
    _errno(errno.ENOENT, os.unlink, _p(d, "nope"))
    _errno(errno.ENOENT, os.rmdir, _p(d, "nope"))
    _errno(errno.ENOENT, os.rename, _p(d, "nope"), _p(d, "x"))
    _write(_p(d, "f"), b"")
    _errno(errno.ENOTDIR, os.stat, _p(d, "f", "x"))
    _errno(errno.ENOTDIR, os.listdir, _p(d, "f"))
    os.mkdir(_p(d, "dir"))
    _errno(errno.EISDIR, os.open, _p(d, "dir"), os.O_WRONLY)


@check
def name_length_limit(d: str) -> None:
    ok = "n" * 255
    _write(_p(d, ok), b"")
    assert os.path.exists(_p(d, ok))
    _errno(errno.ENAMETOOLONG, os.open, _p(d, "n" * 256), os.O_CREAT | os.O_WRONLY, 0o644)
    _errno(errno.ENAMETOOLONG, os.stat, _p(d, "n" * 256))
    assert os.statvfs(d).f_namemax >= 255


@check
def special_files(d: str) -> None:
    os.mkfifo(_p(d, "fifo"), 0o640)
    assert stat.S_ISFIFO(os.stat(_p(d, "fifo")).st_mode)
    os.mknod(_p(d, "sock"), stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.stat(_p(d, "sock")).st_mode)
    if os.geteuid() == 0:
        os.mknod(_p(d, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.stat(_p(d, "null"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        os.mknod(_p(d, "blk"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
        assert os.stat(_p(d, "blk")).st_rdev == os.makedev(7, 200)


# --------------------------------------------------------------------------------- renaming


@check
def rename_files(d: str) -> None:
    _write(_p(d, "a"), b"A")
    ino = os.stat(_p(d, "a")).st_ino
    os.rename(_p(d, "a"), _p(d, "b"))
    assert not os.path.exists(_p(d, "a")) and os.stat(_p(d, "b")).st_ino == ino
    os.mkdir(_p(d, "sub"))
    os.rename(_p(d, "b"), _p(d, "sub", "c"))
    assert _read(_p(d, "sub", "c")) == b"A"
    _write(_p(d, "x"), b"X")
    os.rename(_p(d, "x"), _p(d, "sub", "c"))
    assert _read(_p(d, "sub", "c")) == b"X" and os.listdir(_p(d, "sub")) == ["c"]
    assert sorted(os.listdir(d)) == ["sub"]


@check
def rename_directories(d: str) -> None:
    os.makedirs(_p(d, "a", "inner"))
    os.mkdir(_p(d, "empty"))
    os.mkdir(_p(d, "full"))
    _write(_p(d, "full", "f"), b"")
    _write(_p(d, "file"), b"")
    _errno(errno.ENOTEMPTY, os.rename, _p(d, "a"), _p(d, "full"))
    _errno(errno.ENOTDIR, os.rename, _p(d, "a"), _p(d, "file"))
    _errno(errno.EISDIR, os.rename, _p(d, "file"), _p(d, "empty"))
    _errno(errno.EINVAL, os.rename, _p(d, "a"), _p(d, "a", "inner", "x"))
    os.rename(_p(d, "a"), _p(d, "empty"))
    assert os.listdir(_p(d, "empty")) == ["inner"] and not os.path.exists(_p(d, "a"))
    os.rename(_p(d, "empty"), _p(d, "full", "moved"))
    assert os.stat(_p(d, "full")).st_nlink == 3
    assert os.stat(d).st_nlink == 3  # "." + the entry in its parent + "full/.."


@check
def rename_same_inode_is_a_no_op(d: str) -> None:
    _write(_p(d, "a"), b"x")
    os.link(_p(d, "a"), _p(d, "b"))
    os.rename(_p(d, "a"), _p(d, "b"))
    assert sorted(os.listdir(d)) == ["a", "b"]


@check
def rename_noreplace(d: str) -> None:
    _write(_p(d, "a"), b"A")
    _write(_p(d, "b"), b"B")
    _errno(errno.EEXIST, _renameat2, _p(d, "a"), _p(d, "b"), RENAME_NOREPLACE)
    _renameat2(_p(d, "a"), _p(d, "c"), RENAME_NOREPLACE)
    assert sorted(os.listdir(d)) == ["b", "c"] and _read(_p(d, "c")) == b"A"


@check
def rename_exchange(d: str) -> None:
    _write(_p(d, "a"), b"A")
    os.mkdir(_p(d, "b"))
    _write(_p(d, "b", "inside"), b"")
    _renameat2(_p(d, "a"), _p(d, "b"), RENAME_EXCHANGE)
    assert _read(_p(d, "b")) == b"A" and os.listdir(_p(d, "a")) == ["inside"]
    _errno(errno.ENOENT, _renameat2, _p(d, "a"), _p(d, "zz"), RENAME_EXCHANGE)


# ------------------------------------------------------------------------------ directories


@check
def readdir_many_entries(d: str) -> None:
    names = {f"entry-{i:04d}-{'x' * (i % 37)}" for i in range(600)}
    for name in names:
        os.close(os.open(_p(d, name), os.O_CREAT | os.O_WRONLY, 0o644))
    listed = os.listdir(d)
    assert len(listed) == len(names) and set(listed) == names
    with os.scandir(d) as it:
        seen = {e.name: e.inode() for e in it}
    assert seen.keys() == names
    assert all(seen[n] == os.stat(_p(d, n)).st_ino for n in list(names)[:20])


@check
def readdir_while_unlinking(d: str) -> None:
    names = {f"f{i:03d}" for i in range(300)}
    for name in names:
        os.close(os.open(_p(d, name), os.O_CREAT | os.O_WRONLY, 0o644))
    seen: list[str] = []
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            os.unlink(entry.path)
    # Every entry present throughout the listing is returned, and only once (POSIX readdir).
    assert len(seen) == len(set(seen)) == len(names) and set(seen) == names
    assert os.listdir(d) == []


@check
def readdir_types(d: str) -> None:
    _write(_p(d, "file"), b"")
    os.mkdir(_p(d, "dir"))
    os.symlink("file", _p(d, "link"))
    os.mkfifo(_p(d, "fifo"))
    with os.scandir(d) as it:
        kinds = {e.name: (e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False),
                          e.is_symlink()) for e in it}
    assert kinds == {"file": (True, False, False), "dir": (False, True, False),
                     "link": (False, False, True), "fifo": (False, False, False)}


@check
def rewinddir_sees_new_entries(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == []
        _write(_p(d, "later"), b"")
        assert os.listdir(fd) == ["later"]  # os.listdir(fd) rewinds first
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- xattrs, statfs


@check
def xattrs(d: str) -> None:
    f = _p(d, "f")
    _write(f, b"")
    assert os.listxattr(f) == [] or all(not n.startswith("user.") for n in os.listxattr(f))
    os.setxattr(f, "user.one", b"1")
    os.setxattr(f, "user.two", b"\0binary\xff" * 100)
    assert os.getxattr(f, "user.one") == b"1"
    assert os.getxattr(f, "user.two") == b"\0binary\xff" * 100
    assert {"user.one", "user.two"} <= set(os.listxattr(f))
    _errno(errno.EEXIST, os.setxattr, f, "user.one", b"x", os.XATTR_CREATE)
    _errno(errno.ENODATA, os.setxattr, f, "user.none", b"x", os.XATTR_REPLACE)
    os.setxattr(f, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.one") == b"replaced"
    os.removexattr(f, "user.one")
    _errno(errno.ENODATA, os.getxattr, f, "user.one")
    _errno(errno.ENODATA, os.removexattr, f, "user.one")
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.empty") == b""
    os.mkdir(_p(d, "dir"))
    os.setxattr(_p(d, "dir"), "user.d", b"on a directory")
    assert os.getxattr(_p(d, "dir"), "user.d") == b"on a directory"


@check
def xattr_size_queries(d: str) -> None:
    f = _p(d, "f")
    _write(f, b"")
    os.setxattr(f, "user.v", b"0123456789")
    assert _getxattr_size(f, "user.v", 0) == 10
    assert _getxattr_size(f, "user.v", 10) == 10
    _errno(errno.ERANGE, _getxattr_size, f, "user.v", 4)
    total = _listxattr_size(f, 0)
    assert total >= len(b"user.v\0")
    _errno(errno.ERANGE, _listxattr_size, f, 2)


@check
def statvfs_is_sane(d: str) -> None:
    st = os.statvfs(d)
    assert st.f_bsize > 0 and st.f_frsize > 0 and st.f_blocks >= st.f_bfree >= 0
    assert st.f_namemax >= 255


@check
def access_checks(d: str) -> None:
    f = _p(d, "f")
    _write(f, b"")
    os.chmod(f, 0o640)
    assert os.access(f, os.R_OK | os.W_OK) and os.access(d, os.X_OK | os.W_OK)
    assert not os.access(_p(d, "missing"), os.F_OK)
    if os.geteuid() != 0:
        return
    assert not os.access(f, os.X_OK), "root may execute only what some x bit allows"
    os.chmod(d, 0o755)

    def probe() -> int:
        if os.access("f", os.R_OK) or os.access("f", os.W_OK) or not os.access(".", os.X_OK):
            return 2
        return 0 if not os.access(".", os.W_OK) else 3
    assert _child(_as_nobody(d, probe)) == 0


@check
def statx_reports_birth_time(d: str) -> None:
    f = _p(d, "f")
    t0 = time.time()
    _write(f, b"12345")
    buf = ctypes.create_string_buffer(256)
    # AT_STATX_FORCE_SYNC: really ask the filesystem; STATX_BASIC_STATS | STATX_BTIME.
    if _libc.statx(-100, os.fsencode(f), 0x2000, 0x7FF | 0x800, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), f)
    import struct
    mask = struct.unpack_from("<I", buf, 0)[0]
    size = struct.unpack_from("<Q", buf, 40)[0]
    assert mask & 0x7FF == 0x7FF and size == 5
    if mask & 0x800:  # btime is optional; when given it must be sane
        btime = struct.unpack_from("<q", buf, 80)[0]
        mtime = struct.unpack_from("<q", buf, 112)[0]
        assert t0 - 5 < btime <= mtime + 1


# -------------------------------------------------------------- fallocate, seek, copy_file_range


@check
def fallocate_modes(d: str) -> None:
    fd = os.open(_p(d, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 100_000)
        assert os.fstat(fd).st_size == 100_000
        assert os.pread(fd, 10, 99_990) == bytes(10)
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 200_000)
        assert os.fstat(fd).st_size == 100_000
        os.pwrite(fd, b"\xff" * 100_000, 0)
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        data = os.pread(fd, 100_000, 0)
        assert data[:4096] == b"\xff" * 4096 and data[4096:12288] == bytes(8192)
        assert data[12288:] == b"\xff" * (100_000 - 12288)
        assert os.fstat(fd).st_size == 100_000
    finally:
        os.close(fd)


@check
def seek_data_and_hole(d: str) -> None:
    fd = os.open(_p(d, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    size = 4 << 20
    try:
        os.pwrite(fd, b"d" * 4096, 0)
        os.pwrite(fd, b"d" * 4096, 2 << 20)
        os.ftruncate(fd, size)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert 4096 <= hole <= size
        data = os.lseek(fd, hole, os.SEEK_DATA)
        assert hole <= data <= 2 << 20
        assert os.lseek(fd, 2 << 20, os.SEEK_DATA) == 2 << 20
        assert os.lseek(fd, (2 << 20) + 4096, os.SEEK_HOLE) >= (2 << 20) + 4096
        _errno(errno.ENXIO, os.lseek, fd, size, os.SEEK_DATA)
        _errno(errno.ENXIO, os.lseek, fd, size, os.SEEK_HOLE)
        assert os.lseek(fd, 0, os.SEEK_END) == size
    finally:
        os.close(fd)


@check
def copy_file_range(d: str) -> None:
    data = os.urandom(300_000)
    _write(_p(d, "src"), data)
    src = os.open(_p(d, "src"), os.O_RDONLY)
    dst = os.open(_p(d, "dst"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        done = 0
        for _ in range(1000):
            n = os.copy_file_range(src, dst, len(data) - done, done, 1000 + done)
            if n == 0:
                break
            done += n
        assert done == len(data)
        assert os.pread(dst, len(data) + 1000, 0) == bytes(1000) + data
        assert os.copy_file_range(src, dst, 100, len(data) + 5, 0) == 0
    finally:
        os.close(src)
        os.close(dst)


# ------------------------------------------------------------------------------------ locks


def _try_lock(path: str, kind: int, start: int = 0, length: int = 0) -> Callable[[], int]:
    def probe() -> int:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB, length, start)
            return 0
        except OSError as exc:
            return 1 if exc.errno in (errno.EAGAIN, errno.EACCES) else 2
    return probe


@check
def posix_locks_between_processes(d: str) -> None:
    f = _p(d, "f")
    _write(f, bytes(100))
    fd = os.open(f, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        assert _child(_try_lock(f, fcntl.LOCK_EX, 0, 10)) == 1
        assert _child(_try_lock(f, fcntl.LOCK_SH, 5, 1)) == 1
        assert _child(_try_lock(f, fcntl.LOCK_EX, 10, 10)) == 0, "disjoint range must lock"
        fcntl.lockf(fd, fcntl.LOCK_SH, 10, 0)  # downgrade: readers may share now
        assert _child(_try_lock(f, fcntl.LOCK_SH, 0, 10)) == 0
        assert _child(_try_lock(f, fcntl.LOCK_EX, 0, 10)) == 1
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        assert _child(_try_lock(f, fcntl.LOCK_EX, 0, 10)) == 0
    finally:
        os.close(fd)


@check
def posix_lock_getlk_reports_holder(d: str) -> None:
    f = _p(d, "f")
    _write(f, bytes(10))
    fd = os.open(f, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
        me = os.getpid()

        def probe() -> int:
            cfd = os.open(f, os.O_RDWR)
            req = fcntl.fcntl(cfd, fcntl.F_GETLK, _flock(fcntl.F_WRLCK, 0, 0))
            kind, _, _, _, pid = _unflock(req)
            return 0 if kind == fcntl.F_WRLCK and pid == me else 3
        assert _child(probe) == 0
    finally:
        os.close(fd)


def _flock(kind: int, start: int, length: int) -> bytes:
    import struct
    return struct.pack("hhqqi", kind, os.SEEK_SET, start, length, 0)


def _unflock(raw: bytes) -> tuple[int, int, int, int, int]:
    import struct
    return struct.unpack("hhqqi", raw[:struct.calcsize("hhqqi")])  # type: ignore[return-value]


@check
def posix_locks_released_on_close(d: str) -> None:
    f = _p(d, "f")
    _write(f, bytes(10))
    fd = os.open(f, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
    other = os.open(f, os.O_RDONLY)
    # Closing ANY descriptor of the file drops the process's POSIX locks on it.
    os.close(other)
    try:
        assert _child(_try_lock(f, fcntl.LOCK_EX)) == 0
    finally:
        os.close(fd)


@check
def flock_between_open_files(d: str) -> None:
    f = _p(d, "f")
    _write(f, b"")
    a = os.open(f, os.O_RDONLY)
    b = os.open(f, os.O_RDONLY)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _errno((errno.EAGAIN, errno.EWOULDBLOCK), fcntl.flock, b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_SH)
        fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        _errno((errno.EAGAIN, errno.EWOULDBLOCK), fcntl.flock, a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(b, fcntl.LOCK_UN)
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
    # Closing the last descriptor of an open file releases its flock.
    try:
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(b)


@check
def blocking_lock_waits_for_unlock(d: str) -> None:
    f = _p(d, "f")
    _write(f, bytes(10))
    fd = os.open(f, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            cfd = os.open(f, os.O_RDWR)
            os.write(w, b"s")
            fcntl.lockf(cfd, fcntl.LOCK_EX, 0, 0)  # F_SETLKW: waits for the parent
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 1) == b"s"
        time.sleep(0.2)
        done, _ = os.waitpid(pid, os.WNOHANG)
        assert not done, "the child got a lock that is held"
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0)
        assert _reap(pid) == 0
    finally:
        os.close(r)
        os.close(fd)


@check
def blocked_lock_waiter_can_be_killed(d: str) -> None:
    f = _p(d, "f")
    _write(f, bytes(10))
    fd = os.open(f, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            cfd = os.open(f, os.O_RDWR)
            os.write(w, b"s")
            fcntl.lockf(cfd, fcntl.LOCK_EX, 0, 0)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"s"
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        # A FUSE server must answer the interrupted SETLKW, or the child is unkillable.
        assert _reap(pid) == -signal.SIGKILL
        # And the lock table is consistent afterwards.
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0)
        assert _child(_try_lock(f, fcntl.LOCK_EX)) == 0
    finally:
        os.close(r)
        os.close(fd)


# ------------------------------------------------------------------------- tmpfile, owners


@check
def tmpfile_then_link(d: str) -> None:
    try:
        fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return  # allowed: the filesystem has no O_TMPFILE
        raise
    try:
        os.write(fd, b"anonymous")
        assert os.listdir(d) == []
        assert os.fstat(fd).st_nlink == 0
        _linkat_follow(f"/proc/self/fd/{fd}", _p(d, "named"))
        assert _read(_p(d, "named")) == b"anonymous"
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)


@check
def setgid_directory_inheritance(d: str) -> None:
    if os.geteuid() != 0:
        return
    os.mkdir(_p(d, "g"))
    os.chown(_p(d, "g"), 0, 4321)
    os.chmod(_p(d, "g"), 0o2775)
    _write(_p(d, "g", "f"), b"")
    os.mkdir(_p(d, "g", "sub"))
    assert os.stat(_p(d, "g", "f")).st_gid == 4321
    sub = os.stat(_p(d, "g", "sub"))
    assert sub.st_gid == 4321 and sub.st_mode & stat.S_ISGID


def _as_nobody(d: str, fn: Callable[[], int]) -> Callable[[], int]:
    # chdir first, as root: the probe then uses relative names and never needs to traverse
    # the parents of ``d`` (pytest's tmp directories are 0700).
    def run() -> int:
        os.chdir(d)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return fn()
    return run


@check
def permissions_for_other_users(d: str) -> None:
    if os.geteuid() != 0:
        return
    os.chmod(d, 0o755)
    _write(_p(d, "ro"), b"readable")
    os.chmod(_p(d, "ro"), 0o644)
    _write(_p(d, "secret"), b"")
    os.chmod(_p(d, "secret"), 0o600)

    def probe() -> int:
        if _read("ro") != b"readable":
            return 2
        for fn, args in ((os.open, ("ro", os.O_WRONLY)), (os.open, ("secret", os.O_RDONLY)),
                         (os.open, ("new", os.O_CREAT | os.O_WRONLY, 0o644)),
                         (os.unlink, ("ro",)), (os.chmod, ("ro", 0o777))):
            try:
                fn(*args)  # type: ignore[operator]
                return 3
            except PermissionError:
                pass
        return 0
    assert _child(_as_nobody(d, probe)) == 0


@check
def sticky_directory(d: str) -> None:
    if os.geteuid() != 0:
        return
    os.chmod(d, 0o755)
    os.mkdir(_p(d, "tmp"))
    os.chmod(_p(d, "tmp"), 0o1777)
    _write(_p(d, "tmp", "roots"), b"")
    os.chmod(_p(d, "tmp", "roots"), 0o666)

    def probe() -> int:
        _write("tmp/mine", b"")
        os.unlink("tmp/mine")
        try:
            os.unlink("tmp/roots")
            return 3
        except PermissionError:
            return 0
    assert _child(_as_nobody(d, probe)) == 0


NEEDS_OTHERS.update({"permissions_for_other_users", "sticky_directory", "access_checks"})


def run(d: str, names: list[str] | None = None) -> dict[str, str | None]:
    """Run checks (all by default), each in a fresh subdirectory of ``d``; name -> error."""
    results: dict[str, str | None] = {}
    for name in names or list(CHECKS):
        sub = os.path.join(d, f"posix-{name}")
        os.mkdir(sub)
        try:
            CHECKS[name](sub)
            results[name] = None
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def run_all(d: str, names: list[str] | None = None, skip: Collection[str] = ()) -> None:
    """Run the checks in subdirectories of ``d``; AssertionError listing every failure."""
    chosen = [n for n in (names or list(CHECKS)) if n not in skip]
    failed = {n: e for n, e in run(d, chosen).items() if e is not None}
    if failed:
        raise AssertionError("POSIX checks failed:\n" + "\n".join(
            f"  {name}: {error}" for name, error in failed.items()))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    results = run(argv[0], argv[1:] or None)
    for name, error in results.items():
        print(f"{'ok  ' if error is None else 'FAIL'} {name}" + (f": {error}" if error else ""))
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
