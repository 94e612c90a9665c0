"""A conformance suite of FUSE behaviours, run through a :class:`~virtiofs.client.Client`.

One named check per behaviour (go-fuse's ``posixtest`` model, STYLE.md point 13).  Checks
that mirror one of ``tests/posix_suite.py`` (the same behaviours through a mounted directory)
carry its name; :data:`POSIX_ONLY` lists the POSIX checks that have no client-API counterpart.  Every check
works inside its own fresh directory, so checks are independent and can run in any order
against any server: MemoryFS or PassthroughFS over loopback, QEMU's C virtiofsd or our back-end
through the vhost-user front-end.  ``virtiofs probe`` prints the same checks as a table; the
tests run them with pytest.

A check passes by returning, is *not applicable* by raising :class:`Skip` (a feature the server
did not offer: xattrs, RENAME2 flags, mknod), and fails by raising :class:`CheckFailed` whose
message says exactly what was expected and what came back.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import Opcode
from ..protocol.constants import RenameFlags
from .client import Client

__all__ = ["CHECKS", "POSIX_ONLY", "CheckContext", "CheckFailed", "Result", "Skip", "run_check",
           "run_all"]


class CheckFailed(AssertionError):
    """A check saw something other than what the protocol or POSIX demands."""


class Skip(Exception):
    """The check does not apply to this server (a feature it did not offer)."""


@dataclass
class CheckContext:
    """What a check gets: the client and its own empty directory (an absolute path)."""

    client: Client
    dir: str
    notes: list[str] = field(default_factory=list)

    def path(self, *names: str | bytes) -> Any:
        if any(isinstance(n, bytes) for n in names):
            out = os.fsencode(self.dir)
            for n in names:
                out += b"/" + os.fsencode(n)
            return out
        return "/".join([self.dir, *[str(n) for n in names]])


Check = Callable[[CheckContext], None]
CHECKS: dict[str, Check] = {}
"""Every check, by name, in the order they were written."""


def check(fn: Check) -> Check:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def _errname(e: int | None) -> str:
    return errno.errorcode.get(e, str(e)) if e is not None else "no error"


def expect_errno(want: int | tuple[int, ...], fn: Callable[..., Any], *args: Any,
                 what: str = "") -> None:
    """``fn(*args)`` must fail with ``want`` (one errno or several acceptable ones)."""
    wants = want if isinstance(want, tuple) else (want,)
    label = what or getattr(fn, "__name__", "call")
    try:
        res = fn(*args)
    except OSError as e:
        if e.errno in wants:
            return
        raise CheckFailed(f"{label}: expected {'/'.join(map(_errname, wants))}, got "
                          f"{_errname(e.errno)} ({e})") from None
    raise CheckFailed(f"{label}: expected {'/'.join(map(_errname, wants))}, but it succeeded "
                      f"(returned {res!r:.80})")


def expect_eq(got: Any, want: Any, what: str) -> None:
    if got != want:
        g, w = repr(got), repr(want)
        if len(g) > 120:
            g = g[:120] + "…"
        if len(w) > 120:
            w = w[:120] + "…"
        raise CheckFailed(f"{what}: expected {w}, got {g}")


def _data(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    for i in itertools.count():
        if len(out) >= n:
            break
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
    return bytes(out[:n])


def _write(c: Client, path: Any, data: bytes, mode: str = "w") -> None:
    with c.open(path, mode) as f:
        n = f.write(data)
    expect_eq(n, len(data), f"bytes written to {path!r}")


def _read(c: Client, path: Any) -> bytes:
    with c.open(path, "r") as f:
        return f.read()


# ------------------------------------------------------------------------------ files
# Checks named as in tests/posix_suite.py mirror that check through the client API.

RDWR_CREAT = os.O_RDWR | os.O_CREAT


@check
def check_root_is_directory(t: CheckContext) -> None:
    st = t.client.stat("/")
    expect_eq(stat.S_ISDIR(st.st_mode), True, "S_ISDIR(stat('/').st_mode)")
    expect_eq(st.st_nlink >= 1, True, "stat('/').st_nlink >= 1")


@check
def check_create_read_write(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"hello world")
    expect_eq(_read(c, t.path("f")), b"hello world", "data read back")
    st = c.stat(t.path("f"))
    expect_eq((stat.S_ISREG(st.st_mode), st.st_size, st.st_nlink), (True, 11, 1),
              "(S_ISREG, st_size, st_nlink)")
    with c.open(t.path("f"), "r") as f:
        f.seek(6)
        expect_eq(f.read(3), b"wor", "read(3) at offset 6")
        expect_eq(f.tell(), 9, "tell() after the read")


@check
def check_exclusive_create(t: CheckContext) -> None:
    c = t.client
    c.open(t.path("f"), "x", perm=0o600).close()
    expect_errno(errno.EEXIST, c.open, t.path("f"), "x", what="open(existing, O_EXCL)")
    expect_eq(stat.S_IMODE(c.stat(t.path("f")).st_mode), 0o600 & ~c.umask,
              "mode of the created file")


@check
def check_open_trunc(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"x" * 5000)
    c.open(t.path("f"), flags=os.O_WRONLY | os.O_TRUNC).close()
    expect_eq(c.stat(t.path("f")).st_size, 0, "st_size after O_TRUNC")
    expect_eq(_read(c, t.path("f")), b"", "content after O_TRUNC")


@check
def check_append_mode(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"abc")
    with c.open(t.path("f"), "a") as f:
        f.write(b"def")
        f.seek(0)
        f.write(b"ghi")
    expect_eq(_read(c, t.path("f")), b"abcdefghi", "content after O_APPEND writes")


@check
def check_pwrite_beyond_eof_leaves_zeros(t: CheckContext) -> None:
    c = t.client
    with c.open(t.path("f"), flags=RDWR_CREAT) as f:
        f.pwrite(b"tail", 10000)
        expect_eq(f.stat().st_size, 10004, "fstat size after pwrite at 10000")
        expect_eq(f.pread(10004, 0), bytes(10000) + b"tail", "the hole and the tail")
        expect_eq(f.pread(100, 10004), b"", "pread at EOF")


@check
def check_truncate_extend_and_shrink(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"0123456789")
    c.truncate(t.path("f"), 4)
    expect_eq(_read(c, t.path("f")), b"0123", "content after truncate(4)")
    c.truncate(t.path("f"), 8)
    expect_eq(_read(c, t.path("f")), b"0123" + bytes(4), "content after truncate(8)")
    with c.open(t.path("f"), flags=os.O_RDWR) as f:
        f.truncate(2)
        expect_eq(f.stat().st_size, 2, "fstat size after ftruncate(2)")
    expect_eq(_read(c, t.path("f")), b"01", "content after ftruncate(2)")
    expect_errno(errno.EISDIR, c.truncate, t.dir, 0, what="truncate(directory)")


@check
def check_large_file_roundtrip(t: CheckContext) -> None:
    c = t.client
    size = max(3 << 20, 2 * c.conn.max_io_write + 12345)
    data = _data(size, 1) + b"odd tail"
    before = c.stats[Opcode.WRITE]
    _write(c, t.path("f"), data)
    writes = c.stats[Opcode.WRITE] - before
    if writes < 2 and not c.writeback:
        raise CheckFailed(f"{len(data)} bytes with max_write {c.conn.max_io_write}: expected "
                          f">= 2 WRITE requests, got {writes}")
    expect_eq(c.stat(t.path("f")).st_size, len(data), "st_size of the large file")
    got = _read(c, t.path("f"))
    if got != data:
        pairs = enumerate(zip(got, data, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(got), len(data)))
        raise CheckFailed(f"{len(data)}-byte file read back as {len(got)} bytes, first "
                          f"difference at offset {first}")
    with c.open(t.path("f"), "r") as f:
        expect_eq(f.pread(100_000, 1_000_000), data[1_000_000:1_100_000],
                  "pread(100000) at offset 1000000")
        off = c.conn.max_io_write - 7
        expect_eq(f.pread(1 << 20, off), data[off:off + (1 << 20)],
                  f"1 MiB pread at offset {off} (straddling a max_write boundary)")


@check
def check_huge_sparse_file(t: CheckContext) -> None:
    c = t.client
    size = 1 << 36
    with c.open(t.path("f"), flags=RDWR_CREAT) as f:
        f.truncate(size)
        f.pwrite(b"end", size - 3)
        st = f.stat()
        expect_eq(st.st_size, size, "size of a 64 GiB sparse file")
        expect_eq(f.pread(11, size - 11), bytes(8) + b"end", "the last 11 bytes")
        expect_eq(f.pread(16, 1 << 35), bytes(16), "16 bytes in the middle of the hole")
        if st.st_blocks * 512 >= 1 << 24:
            raise CheckFailed(f"a sparse file should not be allocated: expected < 16 MiB of "
                              f"blocks, got {st.st_blocks * 512} bytes")


@check
def check_unlinked_open_file_stays_readable(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"still here")
    with c.open(t.path("f"), flags=os.O_RDWR) as f:
        c.unlink(t.path("f"))
        expect_eq(c.exists(t.path("f")), False, "the name exists after unlink")
        expect_eq(f.stat().st_nlink, 0, "fstat st_nlink of an unlinked open file")
        f.pwrite(b"!", 10)
        expect_eq(f.pread(100, 0), b"still here!", "read from an open, unlinked file")
    expect_eq(c.listdir(t.dir), [], "listdir after unlink")


@check
def check_mtime_ctime_follow_writes(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"a")
    c.utime(t.path("f"), ns=(1_000_000_000, 1_000_000_000))
    before = c.stat(t.path("f"))
    expect_eq(before.st_mtime_ns, 1_000_000_000, "st_mtime_ns after utime")
    _write(c, t.path("f"), b"b", "r+")
    after = c.stat(t.path("f"))
    if not (after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns >= before.st_ctime_ns):
        raise CheckFailed(f"a write must move mtime forward and ctime not back: mtime "
                          f"{before.st_mtime_ns} -> {after.st_mtime_ns}, ctime "
                          f"{before.st_ctime_ns} -> {after.st_ctime_ns}")


@check
def check_utimens_nanoseconds(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"")
    c.utime(t.path("f"), ns=(1_234_567_891_123_456_789, 987_654_321_987_654_321))
    st = c.stat(t.path("f"))
    expect_eq((st.st_atime_ns, st.st_mtime_ns),
              (1_234_567_891_123_456_789, 987_654_321_987_654_321), "(atime_ns, mtime_ns)")
    t0 = time.time_ns()
    c.utime(t.path("f"))
    got = c.stat(t.path("f")).st_mtime_ns
    if got < t0 - 2_000_000_000:
        raise CheckFailed(f"utime(now): expected an mtime near {t0}, got {got}")


@check
def check_chmod_chown(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("f"), b"")
    ctime = c.stat(t.path("f")).st_ctime_ns
    c.chmod(t.path("f"), 0o4751)
    st = c.stat(t.path("f"))
    expect_eq((stat.S_IMODE(st.st_mode), stat.S_ISREG(st.st_mode)), (0o4751, True),
              "(mode, S_ISREG) after chmod(0o4751)")
    if st.st_ctime_ns < ctime:
        raise CheckFailed(f"chmod moved ctime back: {ctime} -> {st.st_ctime_ns}")
    if c.uid == 0:
        c.chown(t.path("f"), 1234, 5678)
        st = c.stat(t.path("f"))
        expect_eq((st.st_uid, st.st_gid), (1234, 5678), "owner after chown(1234, 5678)")
        expect_eq(bool(st.st_mode & stat.S_ISUID), False, "set-user-ID after chown by root")
        c.chown(t.path("f"), -1, 42, follow_symlinks=False)
        expect_eq(c.stat(t.path("f")).st_gid, 42, "st_gid after lchown(-1, 42)")


@check
def check_fsync_and_fdatasync(t: CheckContext) -> None:
    c = t.client
    with c.open(t.path("f"), flags=RDWR_CREAT) as f:
        f.write(b"x")
        f.fsync()
        f.fsync(datasync=True)
    expect_eq(_read(c, t.path("f")), b"x", "content after fsync")


# ------------------------------------------------------------------------------ namespace


@check
def check_hard_links(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("a"), b"shared")
    c.link(t.path("a"), t.path("b"))
    sa, sb = c.stat(t.path("a")), c.stat(t.path("b"))
    expect_eq((sa.st_ino == sb.st_ino, sa.st_nlink, sb.st_nlink), (True, 2, 2),
              "(same st_ino, nlink a, nlink b)")
    _write(c, t.path("b"), b"changed")
    expect_eq(_read(c, t.path("a")), b"changed", "content through the other name")
    c.unlink(t.path("a"))
    expect_eq(c.stat(t.path("b")).st_nlink, 1, "st_nlink after unlinking one name")
    expect_eq(_read(c, t.path("b")), b"changed", "content under the remaining name")
    expect_errno(errno.EEXIST, c.link, t.path("b"), t.path("b"), what="link(b, b)")


@check
def check_link_to_directory_is_refused(t: CheckContext) -> None:
    t.client.mkdir(t.path("sub"))
    expect_errno(errno.EPERM, t.client.link, t.path("sub"), t.path("l"), what="link(dir)")


@check
def check_symlinks(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("target"), b"via link")
    c.symlink("target", t.path("l"))
    expect_eq(c.readlink(t.path("l")), "target", "readlink")
    expect_eq(stat.S_ISLNK(c.lstat(t.path("l")).st_mode), True, "S_ISLNK(lstat(l))")
    expect_eq(c.lstat(t.path("l")).st_size, len("target"), "lstat(l).st_size")
    expect_eq(_read(c, t.path("l")), b"via link", "read through the link")
    c.symlink("nowhere/at/all", t.path("dangling"))
    expect_errno(errno.ENOENT, c.stat, t.path("dangling"), what="stat(dangling link)")
    expect_eq(c.readlink(t.path("dangling")), "nowhere/at/all", "readlink(dangling)")
    expect_errno(errno.EEXIST, c.symlink, "x", t.path("l"), what="symlink over a name")
    long = "x" * 1000
    c.symlink(long, t.path("long"))
    expect_eq(c.readlink(t.path("long")), long, "readlink of a 1000-byte target")
    odd = b"../x/\x01\xff y\n"
    c.symlink(odd, t.path("odd"))
    expect_eq(c.readlink(t.path(b"odd")), odd, "readlink of a target with odd bytes")
    expect_errno(errno.EINVAL, c.readlink, t.path("target"), what="readlink(regular file)")
    c.mkdir(t.path("d"))
    c.symlink("d", t.path("dl"))
    _write(c, t.path("dl", "inside"), b"I")
    expect_eq(c.listdir(t.path("d")), ["inside"], "file created through a directory link")


@check
def check_mkdir_rmdir_link_counts(t: CheckContext) -> None:
    c = t.client
    c.mkdir(t.path("a"), 0o750)
    st = c.stat(t.path("a"))
    expect_eq((stat.S_ISDIR(st.st_mode), st.st_nlink), (True, 2), "(S_ISDIR, st_nlink)")
    expect_eq(stat.S_IMODE(st.st_mode), 0o750 & ~c.umask, "mode of mkdir(0o750)")
    c.mkdir(t.path("a", "b"))
    c.mkdir(t.path("a", "c"))
    expect_eq(c.stat(t.path("a")).st_nlink, 4, "st_nlink with two subdirectories")
    expect_errno(errno.EEXIST, c.mkdir, t.path("a"), what="mkdir of an existing directory")
    expect_errno(errno.ENOTEMPTY, c.rmdir, t.path("a"), what="rmdir of a non-empty directory")
    c.rmdir(t.path("a", "b"))
    expect_eq(c.stat(t.path("a")).st_nlink, 3, "st_nlink after rmdir of one subdirectory")
    _write(c, t.path("f"), b"")
    expect_errno(errno.ENOTDIR, c.rmdir, t.path("f"), what="rmdir of a file")
    expect_errno(errno.EISDIR, c.unlink, t.path("a"), what="unlink of a directory")
    expect_errno(errno.EINVAL, c.rmdir, t.path("a", "c", "."), what="rmdir(a/c/.)")
    c.rmdir(t.path("a", "c"))
    c.rmdir(t.path("a"))
    expect_errno(errno.ENOENT, c.stat, t.path("a"), what="stat after rmdir")


@check
def check_missing_names(t: CheckContext) -> None:
    c = t.client
    expect_errno(errno.ENOENT, c.stat, t.path("nope"), what="stat(nope)")
    expect_errno(errno.ENOENT, c.stat, t.path("nope", "deeper"), what="stat(nope/deeper)")
    expect_errno(errno.ENOENT, c.unlink, t.path("nope"), what="unlink(nope)")
    expect_errno(errno.ENOENT, c.rmdir, t.path("nope"), what="rmdir(nope)")
    expect_errno(errno.ENOENT, c.rename, t.path("nope"), t.path("x"), what="rename(nope)")
    expect_errno(errno.ENOENT, c.open, t.path("nope"), "r", what="open(nope, 'r')")
    expect_errno(errno.ENOENT, c.open, t.path("nope", "f"), "w", what="open(nope/f, 'w')")
    _write(c, t.path("f"), b"")
    expect_errno(errno.ENOTDIR, c.stat, t.path("f", "x"), what="stat(f/x)")
    expect_errno(errno.ENOTDIR, c.listdir, t.path("f"), what="listdir(file)")
    expect_errno(errno.ENOTDIR, c.mkdir, t.path("f", "d"), what="mkdir(f/d)")
    c.mkdir(t.path("dir"))
    expect_errno(errno.EISDIR, c.open, t.path("dir"), "w", what="open(dir, 'w')")


@check
def check_name_length_limit(t: CheckContext) -> None:
    c = t.client
    ok = b"n" * 255
    _write(c, t.path(ok), b"ok")
    expect_eq(c.exists(t.path(ok)), True, "a 255-byte name exists")
    expect_eq(c.listdir(os.fsencode(t.dir)), [ok], "listing with a 255-byte name")
    c.mkdir(t.path(b"d" * 255))
    expect_errno(errno.ENAMETOOLONG, c.open, t.path(b"n" * 256), "w",
                 what="create with a 256-byte name")
    expect_errno(errno.ENAMETOOLONG, c.stat, t.path(b"n" * 256), what="stat 256-byte name")
    expect_errno(errno.ENAMETOOLONG, c.mkdir, t.path(b"d" * 256), what="mkdir 256-byte name")
    if c.statfs(t.dir).f_namemax < 255:
        raise CheckFailed("statvfs f_namemax: expected >= 255")


@check
def check_special_files(t: CheckContext) -> None:
    c = t.client
    try:
        c.mknod(t.path("fifo"), stat.S_IFIFO | 0o640)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
            raise Skip(f"mknod refused ({_errname(e.errno)})") from None
        raise
    expect_eq(stat.S_ISFIFO(c.stat(t.path("fifo")).st_mode), True, "S_ISFIFO after mknod")
    c.mknod(t.path("sock"), stat.S_IFSOCK | 0o600)
    expect_eq(stat.S_ISSOCK(c.stat(t.path("sock")).st_mode), True, "S_ISSOCK after mknod")
    if c.uid == 0:
        try:
            c.mknod(t.path("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            t.notes.append("character devices refused (allowed)")
            return
        st = c.stat(t.path("null"))
        expect_eq((stat.S_ISCHR(st.st_mode), st.st_rdev), (True, os.makedev(1, 3)),
                  "(S_ISCHR, st_rdev) of a character device")


# ------------------------------------------------------------------------------ renaming


@check
def check_rename_files(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("a"), b"A")
    ino = c.stat(t.path("a")).st_ino
    c.rename(t.path("a"), t.path("b"))
    expect_eq((c.exists(t.path("a")), c.stat(t.path("b")).st_ino), (False, ino),
              "(old name exists, st_ino under the new name)")
    c.mkdir(t.path("sub"))
    c.rename(t.path("b"), t.path("sub", "c"))
    expect_eq(_read(c, t.path("sub", "c")), b"A", "content after a move")
    _write(c, t.path("x"), b"X")
    c.rename(t.path("x"), t.path("sub", "c"))
    expect_eq((_read(c, t.path("sub", "c")), c.listdir(t.path("sub"))), (b"X", ["c"]),
              "content and listing after a rename over an existing file")
    expect_eq(sorted(c.listdir(t.dir)), ["sub"], "listing of the parent")


@check
def check_rename_directories(t: CheckContext) -> None:
    c = t.client
    c.makedirs(t.path("a", "inner"))
    c.mkdir(t.path("empty"))
    c.mkdir(t.path("full"))
    _write(c, t.path("full", "f"), b"")
    _write(c, t.path("file"), b"")
    expect_errno((errno.ENOTEMPTY, errno.EEXIST), c.rename, t.path("a"), t.path("full"),
                 what="rename(dir, non-empty dir)")
    expect_errno(errno.ENOTDIR, c.rename, t.path("a"), t.path("file"),
                 what="rename(dir, file)")
    expect_errno(errno.EISDIR, c.rename, t.path("file"), t.path("empty"),
                 what="rename(file, dir)")
    expect_errno(errno.EINVAL, c.rename, t.path("a"), t.path("a", "inner", "x"),
                 what="rename(dir, its own subdirectory)")
    c.rename(t.path("a"), t.path("empty"))
    expect_eq((c.listdir(t.path("empty")), c.exists(t.path("a"))), (["inner"], False),
              "(listing of the target, source exists) after rename over an empty dir")
    c.rename(t.path("empty"), t.path("full", "moved"))
    expect_eq(c.stat(t.path("full")).st_nlink, 3, "st_nlink of the new parent")
    expect_eq(c.stat(t.dir).st_nlink, 3, "st_nlink of the old parent")


@check
def check_rename_same_inode_is_a_no_op(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("a"), b"x")
    c.link(t.path("a"), t.path("b"))
    c.rename(t.path("a"), t.path("b"))
    expect_eq(sorted(c.listdir(t.dir)), ["a", "b"], "both names after rename(a, b)")


def _rename2(c: Client, a: Any, b: Any, flags: int) -> None:
    try:
        c.rename(a, b, flags)
    except OSError as e:
        if e.errno == errno.EINVAL and Opcode.RENAME2 in c._no:
            raise Skip("server has no RENAME2") from None
        raise


@check
def check_rename_noreplace(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("a"), b"A")
    _write(c, t.path("b"), b"B")
    expect_errno(errno.EEXIST, _rename2, c, t.path("a"), t.path("b"), RenameFlags.NOREPLACE,
                 what="rename(NOREPLACE) over an existing name")
    _rename2(c, t.path("a"), t.path("c"), RenameFlags.NOREPLACE)
    expect_eq((sorted(c.listdir(t.dir)), _read(c, t.path("c"))), (["b", "c"], b"A"),
              "(listing, content) after rename(NOREPLACE) to a free name")


@check
def check_rename_exchange(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("a"), b"A")
    c.mkdir(t.path("b"))
    _write(c, t.path("b", "inside"), b"")
    try:
        _rename2(c, t.path("a"), t.path("b"), RenameFlags.EXCHANGE)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise Skip("RENAME_EXCHANGE not supported by the server's filesystem") from None
        raise
    expect_eq((_read(c, t.path("b")), c.listdir(t.path("a"))), (b"A", ["inside"]),
              "(content of b, listing of a) after rename(EXCHANGE)")
    expect_errno(errno.ENOENT, c.rename, t.path("a"), t.path("zz"), RenameFlags.EXCHANGE,
                 what="rename(EXCHANGE) with a missing target")


# ------------------------------------------------------------------------------ directories


@check
def check_readdir_many_entries(t: CheckContext) -> None:
    """1,200 entries: the listing takes several READDIR requests, each resuming from the
    last cookie of the previous one."""
    c = t.client
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(1200)]
    for n in names:
        # MKNOD is one request per name, a create + close three: the listing is what counts.
        try:
            c.mknod(t.path(n), stat.S_IFREG | 0o644)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                raise
            _write(c, t.path(n), b"")
    before = c.stats[Opcode.READDIR] + c.stats[Opcode.READDIRPLUS]
    got = c.listdir(t.dir)
    calls = c.stats[Opcode.READDIR] + c.stats[Opcode.READDIRPLUS] - before
    if len(got) != len(set(got)):
        dup = sorted({n for n in got if got.count(n) > 1})[:3]
        raise CheckFailed(f"listing of 1200 entries has duplicates, e.g. {dup}")
    expect_eq(sorted(got), sorted(names), "the 1200 names listed")
    if calls < 3:
        raise CheckFailed(f"1200 entries in {c.readdir_size}-byte READDIR buffers: expected "
                          f"several continued READDIR requests, got {calls}")
    seen = {e.name: e.inode() for e in c.scandir(t.dir)}
    expect_eq(set(seen), set(names), "names from scandir")
    for n in names[:20]:
        expect_eq(seen[n], c.stat(t.path(n)).st_ino, f"scandir inode() of {n}")


@check
def check_readdir_while_unlinking(t: CheckContext) -> None:
    c = t.client
    names = {f"f{i:03d}" for i in range(300)}
    for n in names:
        c.open(t.path(n), "w").close()
    seen = []
    for entry in c.scandir(t.dir):
        seen.append(entry.name)
        c.unlink(entry.path)
    expect_eq((len(seen), len(set(seen)), set(seen) == names), (300, 300, True),
              "(entries seen, distinct, all names)")
    expect_eq(c.listdir(t.dir), [], "listing after unlinking every entry")


@check
def check_readdir_types(t: CheckContext) -> None:
    c = t.client
    _write(c, t.path("file"), b"")
    c.mkdir(t.path("dir"))
    c.symlink("file", t.path("link"))
    try:
        c.mknod(t.path("fifo"), stat.S_IFIFO | 0o644)
        fifo = True
    except OSError:
        fifo = False
    kinds = {e.name: (e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False),
                      e.is_symlink()) for e in c.scandir(t.dir)}
    want = {"file": (True, False, False), "dir": (False, True, False),
            "link": (False, False, True)}
    if fifo:
        want["fifo"] = (False, False, False)
    expect_eq(kinds, want, "(is_file, is_dir, is_symlink) per entry")


@check
def check_rewinddir_sees_new_entries(t: CheckContext) -> None:
    c = t.client
    expect_eq(c.listdir(t.dir), [], "listing of an empty directory")
    _write(c, t.path("later"), b"")
    expect_eq(c.listdir(t.dir), ["later"], "listing after a create")


ODD_NAMES = [
    b"with space", b"new\nline", b"tab\tand\\backslash", b"\x01\x02\x7f", b"\xff\xfe latin",
    "ünïcødé-名前".encode(), b"-dash", b"...", b"..a", b"a..", b"%s%n", b"*?[]", b"'\"`$",
]


@check
def check_odd_names(t: CheckContext) -> None:
    c = t.client
    for name in ODD_NAMES:
        _write(c, t.path(name), name)
    expect_eq(sorted(c.listdir(os.fsencode(t.dir))), sorted(ODD_NAMES), "names listed (bytes)")
    for name in ODD_NAMES:
        expect_eq(_read(c, t.path(name)), name, f"content of {name!r}")
    expect_eq(sorted(os.fsencode(n) for n in c.listdir(t.dir)), sorted(ODD_NAMES),
              "names listed (str, surrogateescape)")


@check
def check_dotdot_paths(t: CheckContext) -> None:
    c = t.client
    c.mkdir(t.path("a"))
    _write(c, t.path("f"), b"F")
    expect_eq(_read(c, t.path("a", "..", "f")), b"F", "read of a/../f")
    expect_eq(c.stat("/..").st_ino, c.stat("/").st_ino, "'..' at the root is the root")


# ------------------------------------------------------------------------------ xattrs, statfs


@check
def check_xattrs(t: CheckContext) -> None:
    c = t.client
    f = t.path("f")
    _write(c, f, b"")
    try:
        names = c.listxattr(f)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise Skip("server has no xattr support") from None
        raise
    if any(n.startswith("user.") for n in names):
        raise CheckFailed(f"a new file has user xattrs: {names}")
    try:
        c.setxattr(f, "user.one", b"1")
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise Skip("server has no xattr support") from None
        raise
    c.setxattr(f, "user.two", b"\0binary\xff" * 100)
    expect_eq(c.getxattr(f, "user.one"), b"1", "getxattr(user.one)")
    expect_eq(c.getxattr(f, "user.two"), b"\0binary\xff" * 100, "getxattr(user.two)")
    expect_eq({"user.one", "user.two"} <= set(c.listxattr(f)), True, "names in listxattr")
    expect_errno(errno.EEXIST, c.setxattr, f, "user.one", b"x", os.XATTR_CREATE,
                 what="setxattr(XATTR_CREATE) of an existing name")
    expect_errno(errno.ENODATA, c.setxattr, f, "user.none", b"x", os.XATTR_REPLACE,
                 what="setxattr(XATTR_REPLACE) of a missing name")
    c.setxattr(f, "user.one", b"replaced", os.XATTR_REPLACE)
    expect_eq(c.getxattr(f, "user.one"), b"replaced", "value after XATTR_REPLACE")
    c.removexattr(f, "user.one")
    expect_errno(errno.ENODATA, c.getxattr, f, "user.one", what="getxattr after removexattr")
    expect_errno(errno.ENODATA, c.removexattr, f, "user.one", what="second removexattr")
    c.setxattr(f, "user.empty", b"")
    expect_eq(c.getxattr(f, "user.empty"), b"", "an empty value")
    c.mkdir(t.path("dir"))
    c.setxattr(t.path("dir"), "user.d", b"on a directory")
    expect_eq(c.getxattr(t.path("dir"), "user.d"), b"on a directory", "xattr on a directory")


@check
def check_statvfs_is_sane(t: CheckContext) -> None:
    st = t.client.statfs(t.dir)
    if not (st.f_bsize > 0 and st.f_frsize > 0 and st.f_blocks >= st.f_bfree >= 0):
        raise CheckFailed(f"statvfs: expected f_bsize > 0, f_frsize > 0, f_blocks >= f_bfree "
                          f">= 0, got {st.f_bsize}, {st.f_frsize}, {st.f_blocks}, "
                          f"{st.f_bfree}")
    if st.f_namemax < 255:
        raise CheckFailed(f"statvfs f_namemax: expected >= 255, got {st.f_namemax}")


@check
def check_access_checks(t: CheckContext) -> None:
    c = t.client
    f = t.path("f")
    _write(c, f, b"")
    c.chmod(f, 0o640)
    expect_eq((c.access(f, os.R_OK | os.W_OK), c.access(t.dir, os.X_OK | os.W_OK)),
              (True, True), "(access(f, R|W), access(dir, X|W))")
    expect_eq(c.access(t.path("missing"), os.F_OK), False, "access(missing, F_OK)")
    if c.uid == 0:
        expect_eq(c.access(f, os.X_OK), False, "access(0o640 file, X_OK) as root")


POSIX_ONLY: dict[str, str] = {
    "statx_reports_birth_time": "the client API has no statx",
    "mmap_shared_write": "mmap of a FUSE file is the kernel's page cache, not a client API",
    "xattr_size_queries": "the client sizes xattr buffers itself (XATTR_SIZE_MAX)",
    "fallocate_modes": "the client API has no fallocate",
    "seek_data_and_hole": "the client API has no SEEK_DATA/SEEK_HOLE",
    "copy_file_range": "the client API has no copy_file_range",
    "posix_locks_between_processes": "locks need other processes on one mount",
    "posix_lock_getlk_reports_holder": "locks need other processes on one mount",
    "posix_locks_released_on_close": "locks need other processes on one mount",
    "flock_between_open_files": "the client API has no flock",
    "blocking_lock_waits_for_unlock": "locks need other processes on one mount",
    "blocked_lock_waiter_can_be_killed": "locks need other processes on one mount",
    "tmpfile_then_link": "the client API has no O_TMPFILE",
    "setgid_directory_inheritance": "needs a second set of credentials on the same mount",
    "permissions_for_other_users": "needs a second set of credentials on the same mount",
    "sticky_directory": "needs a second set of credentials on the same mount",
}
"""``tests/posix_suite.py`` checks with no client-API counterpart here, and why."""


def _subdir_name(name: str) -> str:
    return "check-" + name.replace("_", "-")


@dataclass
class Result:
    """The outcome of one check."""

    name: str
    status: str
    """"pass", "fail", "skip" or "error" (an unexpected exception)."""
    detail: str = ""


def run_check(client: Client, name: str, base: str = "/") -> Result:
    """Run one check in a fresh directory under ``base``; never raises."""
    fn = CHECKS[name]
    d = base.rstrip("/") + "/" + _subdir_name(name)
    try:
        client.mkdir(d)
    except OSError as e:
        return Result(name, "error", f"could not create its directory {d}: {e}")
    try:
        fn(CheckContext(client, d))
    except Skip as e:
        return Result(name, "skip", str(e))
    except CheckFailed as e:
        return Result(name, "fail", str(e))
    except Exception as e:  # the probe must report, whatever the server did
        return Result(name, "error", f"{type(e).__name__}: {e}")
    return Result(name, "pass")


def run_all(client: Client, base: str = "/", names: list[str] | None = None) -> list[Result]:
    """Run every check (or ``names``) in order."""
    return [run_check(client, n, base) for n in (names or list(CHECKS))]
