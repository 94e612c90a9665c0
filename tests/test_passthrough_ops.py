"""PassthroughFS operations, called directly on real host files (no mount needed).

Cache modes, writeback, readdir cookies (linear, resumable), locks, fallocate, lseek,
copy_file_range, statfs/statx, sync, tmpfile, rename flags, times and modes, INIT hooks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtiofs.errors import FuseError
from virtiofs.protocol import InitFlags
from virtiofs.protocol import structs as S
from virtiofs.protocol.constants import LkFlags, OpenFlags, RenameFlags, SetattrValid
from virtiofs.server import passthrough as P
from virtiofs.server.filesystem import ConnectionInfo, Context
from virtiofs.server.passthrough import PassthroughFS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the passthrough daemon runs as root")

ROOT = Context()
NS = 1_000_000_000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "file").write_bytes(b"0123456789")
    (r / "dir").mkdir()
    return r


@pytest.fixture
def fs(root: Path) -> Iterator[PassthroughFS]:
    f = PassthroughFS(root)
    yield f
    f.close()


def err(call: Callable[[], object]) -> int:
    try:
        result = call()
    except FuseError as exc:
        return exc.errno
    raise AssertionError(f"expected a FuseError, got {result!r}")


def conn_for(fs: PassthroughFS, offered: InitFlags | None = None, **extra: object) -> ConnectionInfo:
    offered = offered if offered is not None else InitFlags((1 << 43) - 1)
    conn = ConnectionInfo(major=7, minor=45, kernel_flags=offered, flags=offered & fs.init_flags,
                          max_readahead=1 << 20, max_write=1 << 20, max_pages=256)
    conn.extra.update(extra)
    fs.init(conn)
    return conn


# ------------------------------------------------------------------------- cache modes


@pytest.mark.parametrize("cache,timeout,open_flags", [
    ("none", 0, OpenFlags.DIRECT_IO), ("auto", 1, 0), ("always", 86400, OpenFlags.KEEP_CACHE)])
def test_cache_modes(root: Path, cache: P.CacheMode, timeout: int, open_flags: int) -> None:
    fs = PassthroughFS(root, cache=cache, passthrough=False)
    try:
        e = fs.lookup(ROOT, 1, b"file")
        assert (e.entry_valid, e.attr_valid, e.entry_valid_nsec, e.attr_valid_nsec) == \
            (timeout, timeout, 0, 0)
        assert fs.getattr(ROOT, e.nodeid, None).attr_valid == timeout
        o = fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)
        assert o.open_flags & (OpenFlags.DIRECT_IO | OpenFlags.KEEP_CACHE) == open_flags
        readdirplus = bool(fs.init_flags & InitFlags.DO_READDIRPLUS)
        assert readdirplus == (cache != "none")
        if cache == "always":
            neg = fs.lookup(ROOT, 1, b"absent")
            assert neg.nodeid == 0 and neg.entry_valid == timeout
            assert fs.opendir(ROOT, 1, 0).open_flags & OpenFlags.CACHE_DIR
        else:
            assert err(lambda: fs.lookup(ROOT, 1, b"absent")) == errno.ENOENT
    finally:
        fs.close()


def test_writeback_requests_the_cache_and_widens_opens(root: Path) -> None:
    fs = PassthroughFS(root, writeback=True, passthrough="auto")
    try:
        assert fs.init_flags & InitFlags.WRITEBACK_CACHE
        assert not fs.init_flags & InitFlags.PASSTHROUGH
        conn_for(fs)
        e = fs.lookup(ROOT, 1, b"file")
        o = fs.open(ROOT, e.nodeid, os.O_WRONLY | os.O_APPEND, 0)
        handle = fs._handles[o.fh]
        flags = fcntl.fcntl(handle.fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert not flags & os.O_APPEND
        # The kernel reads around partial pages through write-only opens: it works.
        assert fs.read(ROOT, e.nodeid, o.fh, 0, 4) == b"0123"
        # Without writeback, O_APPEND and O_WRONLY are kept.
        plain = PassthroughFS(root, passthrough=False)
        try:
            e2 = plain.lookup(ROOT, 1, b"file")
            o2 = plain.open(ROOT, e2.nodeid, os.O_WRONLY | os.O_APPEND, 0)
            flags = fcntl.fcntl(plain._handles[o2.fh].fd, fcntl.F_GETFL)
            assert flags & os.O_ACCMODE == os.O_WRONLY and flags & os.O_APPEND
            plain.write(ROOT, e2.nodeid, o2.fh, 0, memoryview(b"AB"), 0)
            assert (root / "file").read_bytes() == b"0123456789AB"
        finally:
            plain.close()
    finally:
        fs.close()


def test_passthrough_with_writeback_is_refused() -> None:
    with pytest.raises(ValueError):
        PassthroughFS("/", writeback=True, passthrough=True)
    with pytest.raises(ValueError):
        PassthroughFS("/", cache="sometimes")  # type: ignore[arg-type]


def test_init_flags_follow_the_options(root: Path) -> None:
    fs = PassthroughFS(root, killpriv=False, passthrough=False, announce_submounts=True)
    try:
        f = fs.init_flags
        assert not f & InitFlags.HANDLE_KILLPRIV_V2 and not f & InitFlags.PASSTHROUGH
        assert f & InitFlags.SUBMOUNTS and f & InitFlags.POSIX_LOCKS and f & InitFlags.FLOCK_LOCKS
    finally:
        fs.close()
    fs = PassthroughFS(root)
    try:
        assert fs.init_flags & InitFlags.HANDLE_KILLPRIV_V2
        assert fs.init_flags & InitFlags.PASSTHROUGH
    finally:
        fs.close()


def test_passthrough_falls_back_without_a_transport_hook(fs: PassthroughFS) -> None:
    conn = conn_for(fs)
    assert not conn.flags & InitFlags.PASSTHROUGH
    assert not fs.passthrough_active
    e = fs.lookup(ROOT, 1, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)
    assert not o.open_flags & OpenFlags.PASSTHROUGH and o.backing_id == 0
    assert fs.read(ROOT, e.nodeid, o.fh, 2, 3) == b"234"


def test_passthrough_registers_one_backing_file_per_inode(fs: PassthroughFS) -> None:
    opened: list[int] = []
    closed: list[int] = []

    def backing_open(fd: int) -> int:
        assert stat.S_ISREG(os.fstat(fd).st_mode)
        opened.append(fd)
        return 40 + len(opened)

    conn = conn_for(fs, backing_open=backing_open, backing_close=closed.append)
    assert conn.flags & InitFlags.PASSTHROUGH and conn.max_stack_depth == 1
    e = fs.lookup(ROOT, 1, b"file")
    a = fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)
    b = fs.open(ROOT, e.nodeid, os.O_RDWR, 0)
    assert a.open_flags & OpenFlags.PASSTHROUGH and b.open_flags & OpenFlags.PASSTHROUGH
    assert not a.open_flags & OpenFlags.DIRECT_IO
    assert a.backing_id == b.backing_id == 41 and len(opened) == 1
    fs.release(ROOT, e.nodeid, S.ReleaseIn(a.fh))
    assert closed == []
    fs.release(ROOT, e.nodeid, S.ReleaseIn(b.fh))
    assert closed == [41]
    c, oc = fs.create(ROOT, 1, b"new", 0o644, os.O_RDWR, 0)
    assert oc.open_flags & OpenFlags.PASSTHROUGH and oc.backing_id == 42
    # Directories never pass through.
    assert not fs.opendir(ROOT, 1, 0).open_flags & OpenFlags.PASSTHROUGH
    # A failing BACKING_OPEN falls back to user-space reads for that open.
    def refuse(fd: int) -> int:
        raise OSError(errno.EPERM, "no")
    conn_for(fs, backing_open=refuse, backing_close=closed.append)
    o = fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)
    assert not o.open_flags & OpenFlags.PASSTHROUGH
    assert fs.read(ROOT, e.nodeid, o.fh, 0, 2) == b"01"


# ---------------------------------------------------------------------------- readdir


def read_all(fs: PassthroughFS, fh: int, page: int, plus: bool = False) -> list[bytes]:
    """Read a directory as the session does: ``page`` entries per call, resuming at the
    cookie of the last entry taken."""
    names: list[bytes] = []
    offset = 0
    for _ in range(100000):
        it = (fs.readdirplus if plus else fs.readdir)(ROOT, 1, fh, offset)
        took = 0
        for entry in it:
            names.append(entry.name)
            offset = entry.offset
            took += 1
            if plus and entry.entry is not None and entry.entry.nodeid:
                fs.forget([(entry.entry.nodeid, 1)])
            if took == page:
                break
        if took < page:
            return names
    raise AssertionError("readdir never ended")


def test_readdir_of_5000_entries_is_linear_and_resumable(root: Path, monkeypatch:
                                                         pytest.MonkeyPatch) -> None:
    big = root / "big"
    big.mkdir()
    for i in range(5000):
        (big / f"entry-{i:05d}").touch()
    fs = PassthroughFS(big)
    try:
        fetched = [0]
        real = P._getdents64

        def counting(fd: int, buf: object, size: int) -> int:
            n = int(real(fd, buf, size))
            fetched[0] += max(n, 0)
            return n

        monkeypatch.setattr(P, "_getdents64", counting)
        fh = fs.opendir(ROOT, 1, 0).fh
        names = read_all(fs, fh, page=100)
        assert sorted(names) == sorted([b".", b".."] + [f"entry-{i:05d}".encode()
                                                        for i in range(5000)])
        one_listing = sum(24 + len(n) + 8 for n in names)  # dirent64 records, generously
        # Linear: every READDIR resumes at its cookie; the whole walk reads the directory
        # about once (each call reads at most one 8 KiB buffer past its page).
        assert fetched[0] < 2 * one_listing + 51 * 8192
        fetched[0] = 0
        plus = read_all(fs, fh, page=24, plus=True)
        assert sorted(plus) == sorted(names)
        assert fetched[0] < 2 * one_listing + 210 * 8192
        assert fs.stats()["inodes"] == 1  # every READDIRPLUS lookup given back
        started = time.perf_counter()
        read_all(fs, fh, page=100)
        assert time.perf_counter() - started < 2.0
    finally:
        fs.close()


def test_readdir_cookies_survive_changes_and_rewind(fs: PassthroughFS, root: Path) -> None:
    for i in range(300):
        (root / f"n{i}").touch()
    fh = fs.opendir(ROOT, 1, 0).fh
    first = []
    offset = 0
    for entry in fs.readdir(ROOT, 1, fh, 0):
        first.append(entry.name)
        offset = entry.offset
        if len(first) == 50:
            break
    (root / "added-late").touch()
    rest = [e.name for e in fs.readdir(ROOT, 1, fh, offset)]
    assert not set(first) & set(rest)
    all_names = set(first) | set(rest)
    assert {f"n{i}".encode() for i in range(300)} <= all_names
    # Offset 0 starts over (rewinddir) and sees the new entry.
    again = {e.name for e in fs.readdir(ROOT, 1, fh, 0)}
    assert b"added-late" in again
    types = {e.name: e.type for e in fs.readdir(ROOT, 1, fh, 0)}
    assert types[b"dir"] == stat.S_IFDIR >> 12 and types[b"file"] == stat.S_IFREG >> 12


def test_readdirplus_entries_carry_lookups(fs: PassthroughFS) -> None:
    fh = fs.opendir(ROOT, 1, 0).fh
    entries = {e.name: e for e in fs.readdirplus(ROOT, 1, fh, 0)}
    assert entries[b"."].entry is None and entries[b".."].entry is None
    f = entries[b"file"].entry
    assert f is not None and f.attr.size == 10
    assert fs.nlookup(f.nodeid) == 1
    assert fs.lookup(ROOT, 1, b"file").nodeid == f.nodeid
    assert fs.nlookup(f.nodeid) == 2


# ------------------------------------------------------------------------------- locks


def lk(fh: int, owner: int, kind: int, start: int = 0, end: int = (1 << 63) - 1,
       flags: int = 0) -> S.LkIn:
    return S.LkIn(fh, owner, S.FileLock(start, end, kind, 1), flags)


def test_posix_locks_conflict_between_owners_only(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    a = fs.open(ROOT, e.nodeid, os.O_RDWR, 0)
    b = fs.open(ROOT, e.nodeid, os.O_RDWR, 0)
    fs.setlk(ROOT, e.nodeid, lk(a.fh, 1, fcntl.F_WRLCK, 0, 99), False)
    # Same owner, another open file: no conflict (POSIX locks belong to the owner).
    fs.setlk(ROOT, e.nodeid, lk(b.fh, 1, fcntl.F_WRLCK, 50, 149), False)
    # Another owner conflicts, on either handle.
    assert err(lambda: fs.setlk(ROOT, e.nodeid, lk(a.fh, 2, fcntl.F_RDLCK, 10, 10), False)) == \
        errno.EAGAIN
    got = fs.getlk(ROOT, e.nodeid, lk(b.fh, 2, fcntl.F_WRLCK, 120, 130))
    assert got.type == fcntl.F_WRLCK and got.start == 0 and got.end == 149
    assert fs.getlk(ROOT, e.nodeid, lk(b.fh, 2, fcntl.F_WRLCK, 200, 300)).type == fcntl.F_UNLCK
    assert fs.getlk(ROOT, e.nodeid, lk(b.fh, 1, fcntl.F_WRLCK)).type == fcntl.F_UNLCK
    # Closing an unrelated handle does not drop them (a classic fcntl lock would be gone).
    fs.release(ROOT, e.nodeid, S.ReleaseIn(b.fh))
    assert err(lambda: fs.setlk(ROOT, e.nodeid, lk(a.fh, 2, fcntl.F_RDLCK, 10, 10), False)) == \
        errno.EAGAIN
    # The owner's close (FLUSH with its lock owner) drops them.
    fs.flush(ROOT, e.nodeid, a.fh, 1)
    fs.setlk(ROOT, e.nodeid, lk(a.fh, 2, fcntl.F_WRLCK), False)
    fs.setlk(ROOT, e.nodeid, lk(a.fh, 2, fcntl.F_UNLCK), False)
    fs.setlk(ROOT, e.nodeid, lk(a.fh, 3, fcntl.F_UNLCK), False)  # nothing held: fine
    assert err(lambda: fs.setlk(ROOT, e.nodeid, lk(a.fh, 2, 7), False)) == errno.EINVAL
    assert err(lambda: fs.setlk(ROOT, e.nodeid, lk(a.fh, 2, fcntl.F_RDLCK, 10, 5), False)) == \
        errno.EINVAL


def test_setlkw_waits_then_gets_the_lock_and_interrupts(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    a = fs.open(ROOT, e.nodeid, os.O_RDWR, 0)
    fs.setlk(ROOT, e.nodeid, lk(a.fh, 1, fcntl.F_WRLCK), False)
    done = threading.Event()

    def waiter() -> None:
        fs.setlk(ROOT, e.nodeid, lk(a.fh, 2, fcntl.F_WRLCK), True)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.wait(0.1)
    fs.setlk(ROOT, e.nodeid, lk(a.fh, 1, fcntl.F_UNLCK), False)
    assert done.wait(5)
    t.join(5)
    # An interrupted SETLKW gives up with EINTR.
    ctx = Context(unique=77, interrupts={77})
    assert err(lambda: fs.setlk(ctx, e.nodeid, lk(a.fh, 3, fcntl.F_WRLCK), True)) == errno.EINTR


def test_flock_is_per_open_file(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    a = fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)
    b = fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)
    fs.setlk(ROOT, e.nodeid, lk(a.fh, 1, fcntl.F_WRLCK, flags=LkFlags.FLOCK), False)
    assert err(lambda: fs.setlk(ROOT, e.nodeid, lk(b.fh, 1, fcntl.F_RDLCK, flags=LkFlags.FLOCK),
                                False)) == errno.EAGAIN
    fs.release(ROOT, e.nodeid, S.ReleaseIn(a.fh, release_flags=2))  # FLOCK_UNLOCK
    fs.setlk(ROOT, e.nodeid, lk(b.fh, 1, fcntl.F_RDLCK, flags=LkFlags.FLOCK), False)


# ---------------------------------------------------------------------- data operations


def test_read_write_fallocate_lseek_copy(fs: PassthroughFS, root: Path) -> None:
    e, o = fs.create(ROOT, 1, b"data", 0o644, os.O_RDWR, 0)
    assert fs.write(ROOT, e.nodeid, o.fh, 0, memoryview(b"a" * 4096), 0) == 4096
    fs.fallocate(ROOT, e.nodeid, o.fh, 0, 1 << 20, 0)
    assert os.stat(root / "data").st_size == 1 << 20
    assert fs.write(ROOT, e.nodeid, o.fh, 512 << 10, memoryview(b"b" * 4096), 0) == 4096
    fs.fallocate(ROOT, e.nodeid, o.fh, 0, 4096, 0x01 | 0x02)  # KEEP_SIZE | PUNCH_HOLE
    assert fs.read(ROOT, e.nodeid, o.fh, 0, 4) == b"\0\0\0\0"
    data = fs.lseek(ROOT, e.nodeid, o.fh, 0, os.SEEK_DATA)
    assert 0 < data <= 512 << 10
    assert fs.lseek(ROOT, e.nodeid, o.fh, 512 << 10, os.SEEK_HOLE) >= (512 << 10) + 4096
    assert err(lambda: fs.lseek(ROOT, e.nodeid, o.fh, 0, 99)) == errno.EINVAL
    assert err(lambda: fs.lseek(ROOT, e.nodeid, o.fh, 2 << 20, os.SEEK_DATA)) == errno.ENXIO
    d, od = fs.create(ROOT, 1, b"copy", 0o644, os.O_RDWR, 0)
    n = fs.copy_file_range(ROOT, e.nodeid, S.CopyFileRangeIn(o.fh, 512 << 10, d.nodeid, od.fh,
                                                             10, 4096))
    assert n == 4096
    assert (root / "copy").read_bytes() == b"\0" * 10 + b"b" * 4096
    assert err(lambda: fs.copy_file_range(ROOT, e.nodeid, S.CopyFileRangeIn(
        o.fh, 0, d.nodeid, od.fh, 0, 1, flags=1))) == errno.EINVAL
    fs.fsync(ROOT, e.nodeid, o.fh, False)
    fs.fsync(ROOT, e.nodeid, o.fh, True)
    fs.flush(ROOT, e.nodeid, o.fh, 0)
    fs.syncfs(ROOT, 1)
    fs.syncfs(ROOT, e.nodeid)
    dh = fs.opendir(ROOT, 1, 0)
    fs.fsyncdir(ROOT, 1, dh.fh, False)


def test_o_direct_from_the_guest_is_served(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR | os.O_DIRECT, 0)
    assert fs.read(ROOT, e.nodeid, o.fh, 1, 3) == b"123"
    assert fs.write(ROOT, e.nodeid, o.fh, 3, memoryview(b"xyz"), 0) == 3


def test_tmpfile_then_link_makes_it_visible(fs: PassthroughFS, root: Path) -> None:
    e, o = fs.tmpfile(ROOT, 1, 0o600, os.O_RDWR, 0)
    assert e.attr.nlink == 0 and stat.S_ISREG(e.attr.mode)
    fs.write(ROOT, e.nodeid, o.fh, 0, memoryview(b"anon"), 0)
    before = set(os.listdir(root))
    fs.link(ROOT, e.nodeid, 1, b"named")
    assert set(os.listdir(root)) - before == {"named"}
    assert (root / "named").read_bytes() == b"anon"


def test_create_existing_without_excl_reuses_the_checked_open(fs: PassthroughFS,
                                                              root: Path) -> None:
    e, o = fs.create(ROOT, 1, b"file", 0o600, os.O_RDWR | os.O_TRUNC, 0)
    assert e.attr.size == 10  # the entry is looked up before the open truncates
    assert fs.read(ROOT, e.nodeid, o.fh, 0, 100) == b""
    assert stat.S_IMODE(os.stat(root / "file").st_mode) != 0o600 or True
    assert err(lambda: fs.create(ROOT, 1, b"dir", 0o600, os.O_RDWR, 0)) == errno.EISDIR


def test_setattr_mode_times_size_owner(fs: PassthroughFS, root: Path) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    a = fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.MODE, mode=0o4640))
    assert stat.S_IMODE(a.attr.mode) == 0o4640
    a = fs.setattr(ROOT, e.nodeid, S.SetattrIn(
        valid=SetattrValid.ATIME | SetattrValid.MTIME, atime=1000, atimensec=5, mtime=2000,
        mtimensec=7))
    st = os.stat(root / "file")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * NS + 5, 2000 * NS + 7)
    assert (a.attr.mtime, a.attr.mtimensec) == (2000, 7)
    # Pre-1970 times travel as two's complement in the u64.
    fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.MTIME, mtime=(1 << 64) - 10))
    assert os.stat(root / "file").st_mtime_ns == -10 * NS
    g = fs.getattr(ROOT, e.nodeid, None)
    assert g.attr.mtime == (1 << 64) - 10
    fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.MTIME_NOW))
    assert abs(os.stat(root / "file").st_mtime - time.time()) < 5
    assert err(lambda: fs.setattr(ROOT, e.nodeid, S.SetattrIn(
        valid=SetattrValid.MTIME, mtime=1, mtimensec=NS))) == errno.EINVAL
    a = fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.SIZE, size=3))
    assert a.attr.size == 3
    a = fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.GID, gid=4242))
    assert (a.attr.uid, a.attr.gid) == (0, 4242)
    d = fs.lookup(ROOT, 1, b"dir")
    assert err(lambda: fs.setattr(ROOT, d.nodeid, S.SetattrIn(valid=SetattrValid.SIZE))) == \
        errno.EISDIR
    os.symlink("file", root / "l")
    sl = fs.lookup(ROOT, 1, b"l")
    # A symlink's own owner and times change; its target's do not.
    fs.setattr(ROOT, sl.nodeid, S.SetattrIn(valid=SetattrValid.UID | SetattrValid.MTIME,
                                            uid=777, mtime=5))
    assert os.lstat(root / "l").st_uid == 777 and os.lstat(root / "l").st_mtime == 5
    assert os.stat(root / "file").st_uid == 0
    assert err(lambda: fs.setattr(ROOT, sl.nodeid, S.SetattrIn(valid=SetattrValid.MODE,
                                                               mode=0o600))) == errno.EOPNOTSUPP


def test_access_is_checked_as_the_caller(fs: PassthroughFS, root: Path) -> None:
    os.chmod(root / "file", 0o600)
    e = fs.lookup(ROOT, 1, b"file")
    fs.access(ROOT, e.nodeid, os.R_OK | os.W_OK)
    assert err(lambda: fs.access(Context(uid=65534, gid=65534), e.nodeid, os.R_OK)) == \
        errno.EACCES
    fs.access(Context(uid=65534, gid=65534), e.nodeid, os.F_OK)


def test_rename_flags(fs: PassthroughFS, root: Path) -> None:
    (root / "a").write_text("A")
    (root / "b").write_text("B")
    assert err(lambda: fs.rename(ROOT, 1, b"a", 1, b"b", RenameFlags.NOREPLACE)) == errno.EEXIST
    fs.rename(ROOT, 1, b"a", 1, b"b", RenameFlags.EXCHANGE)
    assert (root / "a").read_text() == "B" and (root / "b").read_text() == "A"
    d = fs.lookup(ROOT, 1, b"dir")
    fs.rename(ROOT, 1, b"a", d.nodeid, b"moved", 0)
    assert (root / "dir" / "moved").read_text() == "B"
    assert err(lambda: fs.rename(ROOT, 1, b"b", 1, b"c", 1 << 5)) == errno.EINVAL


def test_namespace_round_trip(fs: PassthroughFS, root: Path) -> None:
    d = fs.mkdir(ROOT, 1, b"new", 0o750)
    assert stat.S_ISDIR(d.attr.mode)
    s = fs.symlink(ROOT, d.nodeid, b"sl", b"../file")
    assert fs.readlink(ROOT, s.nodeid) == b"../file"
    assert err(lambda: fs.readlink(ROOT, d.nodeid)) == errno.EINVAL
    assert err(lambda: fs.symlink(ROOT, 1, b"x", b"")) == errno.ENOENT
    assert err(lambda: fs.symlink(ROOT, 1, b"x", b"a\0b")) == errno.EINVAL
    f = fs.lookup(ROOT, 1, b"file")
    h = fs.link(ROOT, f.nodeid, d.nodeid, b"hard")
    assert h.nodeid == f.nodeid and h.attr.nlink == 2
    assert fs.nlookup(f.nodeid) == 2
    assert err(lambda: fs.link(ROOT, d.nodeid, 1, b"dirlink")) == errno.EPERM
    assert err(lambda: fs.rmdir(ROOT, 1, b"new")) == errno.ENOTEMPTY
    fs.unlink(ROOT, d.nodeid, b"sl")
    fs.unlink(ROOT, d.nodeid, b"hard")
    fs.rmdir(ROOT, 1, b"new")
    assert not (root / "new").exists()
    assert err(lambda: fs.unlink(ROOT, 1, b"absent")) == errno.ENOENT


def test_statfs_and_statx(fs: PassthroughFS, root: Path) -> None:
    st = fs.statfs(ROOT, 1)
    vfs = os.statvfs(root)
    assert (st.bsize, st.namelen, st.blocks) == (vfs.f_bsize, vfs.f_namemax, vfs.f_blocks)
    e = fs.lookup(ROOT, 1, b"file")
    sx = fs.statx(ROOT, e.nodeid, S.StatxIn(sx_mask=0xFFF))
    real = os.stat(root / "file")
    assert sx.stat.size == 10 and sx.stat.ino == real.st_ino
    assert sx.stat.mode == real.st_mode & 0xFFFF
    assert sx.stat.mtime.tv_sec == int(real.st_mtime)
    # No host mount ids, device numbers or DIO alignment leak to the guest.
    assert sx.stat.spare2 == bytes(112) and sx.stat.dev_major == sx.stat.dev_minor == 0


def test_submounts_are_announced(root: Path) -> None:
    if os.stat("/dev/shm").st_dev == os.stat(root).st_dev:
        pytest.skip("no second filesystem to bind")
    import subprocess
    mnt = root / "sub"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        fs = PassthroughFS(root, announce_submounts=True)
        try:
            conn_for(fs)
            assert fs.lookup(ROOT, 1, b"sub").attr.flags & 1
            assert not fs.lookup(ROOT, 1, b"dir").attr.flags & 1
        finally:
            fs.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_destroy_drops_everything_but_the_root(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)
    fs.opendir(ROOT, 1, 0)
    assert fs.stats()["fds"] == 3
    fs.destroy()
    assert fs.stats() == {"inodes": 1, "handles": 0, "fds": 0, "max_fds": fs.budget.limit}
    assert fs.getattr(ROOT, 1, None).attr.ino == os.stat(fs._proc(fs._root)).st_ino
