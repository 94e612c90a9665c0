"""PassthroughFS against a hostile peer: SECURITY.md B1 #1, #3, #5-#9, #14 and B6 items 1-6.

Unit level: the ``Filesystem`` methods are called directly (and, where the row says "raw
request", through ``Session.handle`` with bytes built by the protocol encoder) on real host
files; every test checks the host tree afterwards.  Needs root (uid switching, mknod, trusted.*
xattrs), as the daemon itself does.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtiofs.errors import FuseError
from virtiofs.protocol import InitFlags, Opcode
from virtiofs.protocol import structs as S
from virtiofs.protocol.codec import encode_request
from virtiofs.protocol.constants import (
    KERNEL_MINOR_VERSION,
    OpenInFlags,
    RenameFlags,
    SetattrValid,
    WriteFlags,
)
from virtiofs.server.filesystem import Context
from virtiofs.server.passthrough import PassthroughFS, XattrMap
from virtiofs.server.session import Session

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the passthrough daemon runs as root")

ROOT = Context()
NOBODY = 65534
USER = Context(uid=NOBODY, gid=NOBODY)
HOSTILE_NAMES = [b"..", b"../x", b"a/b", b"/etc/passwd", b".", b"", b"x" * 256, b"a\0b",
                 b"../../../../etc", b"/"]
CAP_NET_RAW = 13
# struct vfs_cap_data, revision 2, effective bit set (linux/capability.h).
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << CAP_NET_RAW, 0, 0, 0)


# ------------------------------------------------------------------------------ fixtures


def snapshot(path: Path) -> dict[str, tuple[int, int, int, int, tuple[str, ...]]]:  # noqa: E501
    """Names, modes, sizes, owners and xattr names of everything under ``path`` (no follow)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            try:
                xattrs = tuple(sorted(os.listxattr(full, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_size, st.st_uid, st.st_mtime_ns,
                                                xattrs)
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``(base, root)``: the served root inside a base holding things that must stay untouched."""
    base = tmp_path / "base"
    root = base / "root"
    root.mkdir(parents=True)
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_text("secret")
    (base / "outside-file").write_text("outside")
    os.chmod(root, 0o777)
    (root / "dir").mkdir()
    (root / "dir" / "inner").write_text("inner")
    (root / "file").write_text("hello world")
    yield base, root


@pytest.fixture
def fs(tree: tuple[Path, Path]) -> Iterator[PassthroughFS]:
    f = PassthroughFS(tree[1])
    yield f
    f.close()


def err(call: Callable[[], object]) -> int:
    """The errno a call fails with (the test fails if it succeeds or raises anything else)."""
    try:
        result = call()
    except FuseError as exc:
        return exc.errno
    raise AssertionError(f"expected a FuseError, got {result!r}")


def lookup_path(fs: PassthroughFS, *parts: bytes) -> S.EntryOut:
    nodeid = 1
    entry = None
    for part in parts:
        entry = fs.lookup(ROOT, nodeid, part)
        nodeid = entry.nodeid
    assert entry is not None
    return entry


def open_fds_to(path: str) -> list[str]:
    """Our own fds that *open* ``path`` (what /proc/PID/fd would show an auditor).

    O_PATH fds are left out: they pin the inode (our inode table holds one per node) but
    cannot read, write or ioctl it; the device driver's open is never called for them.
    """
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != path:
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        if not flags & os.O_PATH:
            found.append(fd)
    return found


# ------------------------------------------------------------- B1 #5/#6/#7, B6 1: names


NAME_OPS: dict[str, Callable[[PassthroughFS, bytes], object]] = {
    "lookup": lambda fs, n: fs.lookup(ROOT, 1, n),
    "mknod": lambda fs, n: fs.mknod(ROOT, 1, n, stat.S_IFREG | 0o644, 0),
    "mkdir": lambda fs, n: fs.mkdir(ROOT, 1, n, 0o755),
    "symlink-name": lambda fs, n: fs.symlink(ROOT, 1, n, b"target"),
    "link": lambda fs, n: fs.link(ROOT, lookup_path(fs, b"file").nodeid, 1, n),
    "unlink": lambda fs, n: fs.unlink(ROOT, 1, n),
    "rmdir": lambda fs, n: fs.rmdir(ROOT, 1, n),
    "rename-old": lambda fs, n: fs.rename(ROOT, 1, n, 1, b"renamed", 0),
    "rename-new": lambda fs, n: fs.rename(ROOT, 1, b"file", 1, n, 0),
    "rename2-new": lambda fs, n: fs.rename(ROOT, 1, b"file", 1, n, RenameFlags.NOREPLACE),
    "create": lambda fs, n: fs.create(ROOT, 1, n, 0o644, os.O_RDWR, 0),
}


@pytest.mark.parametrize("op", sorted(NAME_OPS))
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n[:12]))
def test_hostile_names_are_refused_or_confined(fs: PassthroughFS, tree: tuple[Path, Path],
                                               op: str, name: bytes) -> None:
    base, root = tree
    before = snapshot(base)
    if op == "lookup" and name in (b".", b".."):
        # Confined rather than refused: "." is the directory, ".." at the root is the root.
        assert fs.lookup(ROOT, 1, name).nodeid == 1
        return
    code = err(lambda: NAME_OPS[op](fs, name))
    assert code in (errno.EINVAL, errno.ENAMETOOLONG)
    assert code == errno.ENAMETOOLONG or len(name) <= 255
    assert snapshot(base) == before


def test_dotdot_at_root_is_root_and_dotdot_below_is_the_parent(fs: PassthroughFS) -> None:
    assert fs.lookup(ROOT, 1, b"..").nodeid == 1
    d = fs.lookup(ROOT, 1, b"dir")
    up = fs.lookup(ROOT, d.nodeid, b"..")
    assert up.nodeid == 1
    # Walking ".." any number of times never leaves the root.
    nodeid = d.nodeid
    for _ in range(5):
        nodeid = fs.lookup(ROOT, nodeid, b"..").nodeid
    assert nodeid == 1
    assert fs.lookup(ROOT, d.nodeid, b".").nodeid == d.nodeid


def test_symlink_targets_are_never_followed(fs: PassthroughFS, tree: tuple[Path, Path]) -> None:
    base, root = tree
    before_outside = snapshot(base / "outside")
    # Absolute and relative escapes, made by the guest (allowed: a target is data) and by the host.
    fs.symlink(ROOT, 1, b"abs", str(base / "outside").encode())
    os.symlink("../outside", root / "rel")
    os.symlink("/etc/passwd", root / "dir" / "passwd")
    for name in (b"abs", b"rel"):
        e = fs.lookup(ROOT, 1, name)
        assert stat.S_ISLNK(e.attr.mode)
        assert err(lambda e=e: fs.lookup(ROOT, e.nodeid, b"secret")) == errno.ENOTDIR
        assert err(lambda e=e: fs.opendir(ROOT, e.nodeid, 0)) == errno.ENOTDIR
        assert err(lambda e=e: fs.open(ROOT, e.nodeid, os.O_RDONLY, 0)) == errno.EBADF
        assert err(lambda e=e: fs.mkdir(ROOT, e.nodeid, b"x", 0o755)) == errno.ENOTDIR
        assert err(lambda e=e: fs.create(ROOT, e.nodeid, b"x", 0o644, os.O_RDWR, 0)) in (
            errno.ENOTDIR, errno.ENOENT)
    p = lookup_path(fs, b"dir", b"passwd")
    assert err(lambda: fs.open(ROOT, p.nodeid, os.O_RDONLY, 0)) == errno.EBADF
    assert fs.readlink(ROOT, p.nodeid) == b"/etc/passwd"
    # CREATE over a dangling or escaping symlink never creates its target (O_EXCL|O_NOFOLLOW).
    os.symlink(str(base / "created-outside"), root / "dangling")
    assert err(lambda: fs.create(ROOT, 1, b"dangling", 0o644, os.O_RDWR, 0)) == errno.EBADF
    assert not (base / "created-outside").exists()
    assert snapshot(base / "outside") == before_outside


def test_rename_and_link_stay_inside(fs: PassthroughFS, tree: tuple[Path, Path]) -> None:
    base, root = tree
    before = snapshot(base / "outside")
    d = lookup_path(fs, b"dir")
    # Names that try to cross the root are refused whatever the directories are.
    assert err(lambda: fs.rename(ROOT, d.nodeid, b"inner", d.nodeid, b"../../escaped", 0)) == \
        errno.EINVAL
    assert err(lambda: fs.link(ROOT, lookup_path(fs, b"file").nodeid, 1, b"../hard")) == \
        errno.EINVAL
    # A directory given by a node id we never handed out cannot be a destination.
    assert err(lambda: fs.rename(ROOT, 1, b"file", 987654, b"x", 0)) == errno.EBADF
    assert err(lambda: fs.link(ROOT, 987654, 1, b"x")) == errno.EBADF
    # Through a symlink pointing outside: the symlink is not a directory.
    os.symlink(str(base / "outside"), root / "out")
    out = lookup_path(fs, b"out")
    assert err(lambda: fs.rename(ROOT, 1, b"file", out.nodeid, b"moved", 0)) == errno.ENOTDIR
    assert err(lambda: fs.link(ROOT, lookup_path(fs, b"file").nodeid, out.nodeid, b"h")) == \
        errno.ENOTDIR
    assert snapshot(base / "outside") == before
    assert (root / "file").read_text() == "hello world"


def test_raw_requests_with_hostile_names_through_the_session(fs: PassthroughFS,
                                                             tree: tuple[Path, Path]) -> None:
    """B1 #7: the same names as raw FUSE requests (SYMLINK/LINK/RENAME/MKNOD), no sandbox."""
    base, _ = tree
    before = snapshot(base)
    session = init_session(fs)
    file_id = lookup_path(fs, b"file").nodeid
    for name in (b"/etc/evil", b"../evil", b"..", b"a/b", str(base / "evil").encode()):
        assert raw(session, Opcode.SYMLINK, 1, None, [name, b"/etc/passwd"]) in (
            -errno.EINVAL, -errno.ENAMETOOLONG)
        assert raw(session, Opcode.LINK, 1, S.LinkIn(file_id), [name]) == -errno.EINVAL
        assert raw(session, Opcode.RENAME, 1, S.RenameIn(1), [b"file", name]) == -errno.EINVAL
        assert raw(session, Opcode.MKNOD, 1, S.MknodIn(stat.S_IFIFO | 0o644, 0), [name]) == \
            -errno.EINVAL
        assert raw(session, Opcode.CREATE, 1, S.CreateIn(os.O_RDWR, 0o644), [name]) == \
            -errno.EINVAL
    assert snapshot(base) == before
    root_entry = raw_reply(session, Opcode.LOOKUP, 1, None, [b".."])
    assert struct.unpack_from("<Q", root_entry)[0] == 1  # entry_out.nodeid: the root


def test_directory_swapped_for_a_symlink_during_lookups(fs: PassthroughFS,
                                                        tree: tuple[Path, Path]) -> None:
    """A host-side race replacing ``dir`` by a symlink to outside never lets a lookup out."""
    base, root = tree
    inside_ino = os.stat(root / "dir" / "inner").st_ino
    outside_ino = os.stat(base / "outside" / "secret").st_ino
    os.symlink("x", base / "unused")
    stop = threading.Event()

    def swapper() -> None:
        for _ in range(20000):
            if stop.is_set():
                return
            os.rename(root / "dir", root / "dir.away")
            os.symlink(str(base / "outside"), root / "dir")
            os.unlink(root / "dir")
            os.rename(root / "dir.away", root / "dir")

    thread = threading.Thread(target=swapper)
    thread.start()
    seen_dir = seen_link = 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline and (seen_dir < 50 or seen_link < 50):
            try:
                d = fs.lookup(ROOT, 1, b"dir")
            except FuseError:
                continue
            for name in (b"inner", b"secret"):
                try:
                    e = fs.lookup(ROOT, d.nodeid, name)
                except FuseError as exc:
                    assert exc.errno in (errno.ENOENT, errno.ENOTDIR)
                    continue
                assert e.attr.ino != outside_ino
                assert e.attr.ino == inside_ino
                fs.forget([(e.nodeid, 1)])
            if stat.S_ISLNK(d.attr.mode):
                seen_link += 1
            else:
                seen_dir += 1
            fs.forget([(d.nodeid, 1)])
    finally:
        stop.set()
        thread.join(10)
    assert seen_dir and seen_link


# --------------------------------------------------------------- B1 #1/#15, B6 2: special files


@pytest.fixture
def specials(tree: tuple[Path, Path]) -> dict[str, Path]:
    root = tree[1]
    import socket
    paths = {"chr": root / "null", "blk": root / "loop", "fifo": root / "fifo",
             "sock": root / "sock"}
    os.mknod(paths["chr"], stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(paths["blk"], stat.S_IFBLK | 0o666, os.makedev(7, 0))
    os.mkfifo(paths["fifo"], 0o666)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(paths["sock"]))
    sock.close()
    return paths


@pytest.mark.parametrize("kind", ["chr", "blk", "fifo", "sock"])
def test_special_files_are_never_opened(fs: PassthroughFS, specials: dict[str, Path],
                                        kind: str) -> None:
    path = specials[kind]
    name = path.name.encode()
    e = fs.lookup(ROOT, 1, name)
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_NONBLOCK,
                  os.O_WRONLY | os.O_NONBLOCK):
        assert err(lambda flags=flags: fs.open(ROOT, e.nodeid, flags, 0)) in (errno.EBADF,
                                                                               errno.EACCES)
    assert err(lambda: fs.opendir(ROOT, e.nodeid, 0)) == errno.ENOTDIR
    # CREATE without O_EXCL on the existing node goes through the same check.
    assert err(lambda: fs.create(ROOT, 1, name, 0o644, os.O_RDWR, 0)) == errno.EBADF
    assert err(lambda: fs.create(ROOT, 1, name, 0o644, os.O_RDWR | os.O_EXCL, 0)) == errno.EEXIST
    # tmpfile/opendir/readdir on it make no sense either.
    assert err(lambda: fs.tmpfile(ROOT, e.nodeid, 0o644, os.O_RDWR, 0)) == errno.ENOTDIR
    assert open_fds_to(str(path)) == []
    assert fs.stats()["handles"] == 0


def test_raw_open_create_opendir_on_a_device_and_a_fifo(fs: PassthroughFS,
                                                        specials: dict[str, Path]) -> None:
    session = init_session(fs)
    for key in ("chr", "fifo"):
        name = specials[key].name.encode()
        body = raw_reply(session, Opcode.LOOKUP, 1, None, [name])
        nodeid = struct.unpack_from("<Q", body)[0]
        assert raw(session, Opcode.OPEN, nodeid, S.OpenIn(os.O_RDWR)) == -errno.EBADF
        assert raw(session, Opcode.OPENDIR, nodeid, S.OpenIn(os.O_RDONLY)) == -errno.ENOTDIR
        assert raw(session, Opcode.CREATE, 1, S.CreateIn(os.O_RDWR, 0o644), [name]) == \
            -errno.EBADF
        assert open_fds_to(str(specials[key])) == []


def test_mknod_still_works_for_fifos_and_sockets_but_not_devices(fs: PassthroughFS,
                                                                 tree: tuple[Path, Path]) -> None:
    root = tree[1]
    e = fs.mknod(USER, 1, b"pipe", stat.S_IFIFO | 0o640, 0)
    assert stat.S_ISFIFO(e.attr.mode) and e.attr.uid == NOBODY
    assert stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)
    assert stat.S_ISSOCK(fs.mknod(ROOT, 1, b"s", stat.S_IFSOCK | 0o600, 0).attr.mode)
    assert stat.S_ISREG(fs.mknod(ROOT, 1, b"r", stat.S_IFREG | 0o600, 0).attr.mode)
    rdev = (1 << 8) | 3  # new_encode_dev(1, 3)
    assert err(lambda: fs.mknod(ROOT, 1, b"null", stat.S_IFCHR | 0o666, rdev)) == errno.EPERM
    assert err(lambda: fs.mknod(ROOT, 1, b"blk", stat.S_IFBLK | 0o666, rdev)) == errno.EPERM
    assert not (root / "null").exists() and not (root / "blk").exists()
    assert err(lambda: fs.rename(ROOT, 1, b"r", 1, b"r2", RenameFlags.WHITEOUT)) == errno.EPERM


def test_mknod_devices_with_allow_mknod(tree: tuple[Path, Path]) -> None:
    fs = PassthroughFS(tree[1], allow_mknod=True)
    try:
        e = fs.mknod(ROOT, 1, b"null", stat.S_IFCHR | 0o666, (1 << 8) | 3)
        assert stat.S_ISCHR(e.attr.mode)
        assert os.lstat(tree[1] / "null").st_rdev == os.makedev(1, 3)
        # Creating it is allowed; opening it through us still is not.
        assert err(lambda: fs.open(ROOT, e.nodeid, os.O_RDWR, 0)) == errno.EBADF
        # A non-root caller cannot make a device node: the kernel checks CAP_MKNOD as them.
        assert err(lambda: fs.mknod(USER, 1, b"n2", stat.S_IFCHR | 0o666, 259)) == errno.EPERM
    finally:
        fs.close()


# ------------------------------------------------------------------ B1 #3, B6 4: credentials


def test_no_supplementary_groups_are_retained(fs: PassthroughFS) -> None:
    with open("/proc/self/status") as f:
        groups = [line for line in f if line.startswith("Groups:")][0]
    assert groups.split() == ["Groups:"]


def test_setgid_directory_does_not_hand_out_root_group(fs: PassthroughFS,
                                                       tree: tuple[Path, Path]) -> None:
    """CVE-2022-0358: as uid 65534 in a 02777 root-group dir, O_CREAT with 02755."""
    root = tree[1]
    (root / "sgid").mkdir()
    os.chown(root / "sgid", 0, 0)
    os.chmod(root / "sgid", 0o2777)
    d = lookup_path(fs, b"sgid")
    entry, opened = fs.create(USER, d.nodeid, b"exe", 0o2755, os.O_WRONLY, 0)
    st = os.lstat(root / "sgid" / "exe")
    assert st.st_uid == NOBODY
    assert st.st_gid == 0  # inherited from the setgid directory, as the kernel does
    assert not st.st_mode & stat.S_ISGID, oct(st.st_mode)
    # mkdir and mknod follow the same rule.
    fs.mknod(USER, d.nodeid, b"node", stat.S_IFREG | 0o2755, 0)
    assert not os.lstat(root / "sgid" / "node").st_mode & stat.S_ISGID
    sub = fs.mkdir(USER, d.nodeid, b"sub", 0o755)
    assert os.lstat(root / "sgid" / "sub").st_mode & stat.S_ISGID  # dirs inherit the bit
    assert sub.attr.uid == NOBODY
    # The caller's own group may be set-gid: it is in it.
    (root / "mine").mkdir()
    os.chown(root / "mine", NOBODY, NOBODY)
    m = lookup_path(fs, b"mine")
    fs.create(USER, m.nodeid, b"exe", 0o2755, os.O_WRONLY, 0)
    assert os.lstat(root / "mine" / "exe").st_mode & stat.S_ISGID


def test_created_files_have_the_callers_ids_and_umask(fs: PassthroughFS,
                                                      tree: tuple[Path, Path]) -> None:
    root = tree[1]
    ctx = Context(uid=1234, gid=5678, umask=0o027)
    e, _ = fs.create(ctx, 1, b"c", 0o666, os.O_RDWR, 0)
    fs.mkdir(ctx, 1, b"d", 0o777)
    fs.mknod(ctx, 1, b"f", stat.S_IFIFO | 0o666, 0)
    fs.symlink(ctx, 1, b"l", b"c")
    fs.tmpfile(ctx, 1, 0o666, os.O_RDWR, 0)
    for name, mode in (("c", 0o640), ("d", 0o750), ("f", 0o640)):
        st = os.lstat(root / name)
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
        assert stat.S_IMODE(st.st_mode) == mode, (name, oct(st.st_mode))
    assert os.lstat(root / "l").st_uid == 1234
    assert e.attr.uid == 1234
    # The daemon itself is root again afterwards (a root-only operation works).
    os.chown(root / "c", 0, 0)


def test_a_caller_cannot_create_where_it_may_not_write(fs: PassthroughFS,
                                                       tree: tuple[Path, Path]) -> None:
    root = tree[1]
    (root / "closed").mkdir(mode=0o755)
    d = lookup_path(fs, b"closed")
    assert err(lambda: fs.create(USER, d.nodeid, b"x", 0o644, os.O_RDWR, 0)) == errno.EACCES
    assert err(lambda: fs.mkdir(USER, d.nodeid, b"x", 0o755)) == errno.EACCES
    assert err(lambda: fs.symlink(USER, d.nodeid, b"x", b"t")) == errno.EACCES
    assert not (root / "closed" / "x").exists()
    # ... unless the supplementary group the kernel passes (CREATE_SUPP_GROUP) grants it.
    os.chown(root / "closed", 0, 4321)
    os.chmod(root / "closed", 0o775)
    fs.create(Context(uid=NOBODY, gid=NOBODY, groups=(4321,)), d.nodeid, b"ok", 0o644,
              os.O_RDWR, 0)
    assert (root / "closed" / "ok").exists()


def test_credentials_are_per_thread_under_concurrency(fs: PassthroughFS,
                                                      tree: tuple[Path, Path]) -> None:
    root = tree[1]
    errors: list[BaseException] = []

    def worker(uid: int) -> None:
        try:
            ctx = Context(uid=uid, gid=uid + 100000)
            for i in range(60):
                fs.mknod(ctx, 1, f"u{uid}-{i}".encode(), stat.S_IFREG | 0o644, 0)
                e, o = fs.create(ctx, 1, f"c{uid}-{i}".encode(), 0o644, os.O_RDWR, 0)
                fs.release(ctx, e.nodeid, S.ReleaseIn(o.fh))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(2000 + i,)) for i in range(6)]
    for t in threads:
        t.start()
    # Meanwhile the main thread stays root: root-only work must keep succeeding.
    for i in range(200):
        fs.mknod(ROOT, 1, f"root-{i}".encode(), stat.S_IFREG | 0o600, 0)
    for t in threads:
        t.join(60)
    assert not errors
    for path in root.iterdir():
        st = os.lstat(path)
        if path.name.startswith(("u", "c")):
            uid = int(path.name[1:].split("-")[0])
            assert (st.st_uid, st.st_gid) == (uid, uid + 100000), path.name
        elif path.name.startswith("root-"):
            assert (st.st_uid, st.st_gid) == (0, 0), path.name


# ----------------------------------------------------------------- B1 #8, B6 3: killpriv


def _file(root: Path, name: str, mode: int, uid: int = NOBODY) -> Path:
    p = root / name
    p.write_bytes(b"data")
    os.chown(p, uid, uid)
    os.chmod(p, mode)
    return p


@pytest.mark.parametrize("mode,expect", [(0o4777, 0o777), (0o2777, 0o777), (0o6777, 0o777),
                                         (0o2767, 0o2767), (0o4755, 0o755)])
def test_write_by_a_non_root_caller_clears_suid_sgid(fs: PassthroughFS, tree: tuple[Path, Path],
                                                     mode: int, expect: int) -> None:
    """pjdfstest chmod/12.t; sgid without group-exec is a locking marker and stays."""
    p = _file(tree[1], "f", mode)
    e = fs.lookup(ROOT, 1, b"f")
    o = fs.open(USER, e.nodeid, os.O_WRONLY, 0)
    assert fs.write(USER, e.nodeid, o.fh, 0, memoryview(b"x"), 0) == 1
    assert stat.S_IMODE(os.lstat(p).st_mode) == expect


def test_write_kill_suidgid_flag_and_root_writes(fs: PassthroughFS, tree: tuple[Path, Path]) -> None:
    p = _file(tree[1], "f", 0o6755, uid=0)
    e = fs.lookup(ROOT, 1, b"f")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR, 0)
    fs.write(ROOT, e.nodeid, o.fh, 0, memoryview(b"x"), 0)
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o6755  # CAP_FSETID keeps them
    fs.write(ROOT, e.nodeid, o.fh, 0, memoryview(b"x"), WriteFlags.KILL_SUIDGID)
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o755


def test_truncate_by_non_owner_and_with_fattr_kill_suidgid(fs: PassthroughFS,
                                                           tree: tuple[Path, Path]) -> None:
    p = _file(tree[1], "f", 0o6777, uid=0)
    e = fs.lookup(ROOT, 1, b"f")
    fs.setattr(USER, e.nodeid, S.SetattrIn(valid=SetattrValid.SIZE, size=1))
    assert os.lstat(p).st_size == 1 and stat.S_IMODE(os.lstat(p).st_mode) == 0o777
    os.chmod(p, 0o4755)
    fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.SIZE, size=2))
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o4755
    fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.SIZE | SetattrValid.KILL_SUIDGID,
                                           size=0))
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o755
    # open(O_TRUNC) with FUSE_OPEN_KILL_SUIDGID.
    os.chmod(p, 0o4755)
    fs.open(ROOT, e.nodeid, os.O_WRONLY | os.O_TRUNC, OpenInFlags.KILL_SUIDGID)
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o755


def test_chown_clears_suid_sgid(fs: PassthroughFS, tree: tuple[Path, Path]) -> None:
    p = _file(tree[1], "f", 0o6755, uid=0)
    e = fs.lookup(ROOT, 1, b"f")
    fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.UID | SetattrValid.GID,
                                           uid=NOBODY, gid=NOBODY))
    st = os.lstat(p)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(st.st_mode) == 0o755


def test_write_drops_security_capability(fs: PassthroughFS, tree: tuple[Path, Path]) -> None:
    p = _file(tree[1], "f", 0o755, uid=0)
    os.setxattr(p, "security.capability", CAPABILITY)
    e = fs.lookup(ROOT, 1, b"f")
    o = fs.open(ROOT, e.nodeid, os.O_WRONLY, 0)
    fs.write(ROOT, e.nodeid, o.fh, 0, memoryview(b"x"), 0)
    assert "security.capability" not in os.listxattr(p)


MAPPED_CAP = "user.virtiofs.security.capability"


@pytest.mark.parametrize("how", ["write", "truncate", "chown", "open-trunc", "copy"])
def test_mapped_security_capability_is_dropped(tree: tuple[Path, Path], how: str) -> None:
    """CVE-2021-20263: the host kernel only drops the real name; we drop the mapped one."""
    root = tree[1]
    fs = PassthroughFS(root, xattrmap=":map:security.:user.virtiofs.:")
    try:
        p = _file(root, "f", 0o755, uid=0)
        e = fs.lookup(ROOT, 1, b"f")
        fs.setxattr(ROOT, e.nodeid, b"security.capability", CAPABILITY, 0)
        assert os.getxattr(p, MAPPED_CAP) == CAPABILITY
        assert fs.getxattr(ROOT, e.nodeid, b"security.capability") == CAPABILITY
        if how == "write":
            o = fs.open(ROOT, e.nodeid, os.O_WRONLY, 0)
            fs.write(ROOT, e.nodeid, o.fh, 0, memoryview(b"x"), 0)
        elif how == "truncate":
            fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.SIZE, size=0))
        elif how == "chown":
            fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.UID, uid=NOBODY))
        elif how == "open-trunc":
            fs.open(ROOT, e.nodeid, os.O_WRONLY | os.O_TRUNC, 0)
        else:
            (root / "src").write_bytes(b"abc")
            s = fs.lookup(ROOT, 1, b"src")
            so = fs.open(ROOT, s.nodeid, os.O_RDONLY, 0)
            do = fs.open(ROOT, e.nodeid, os.O_WRONLY, 0)
            fs.copy_file_range(ROOT, s.nodeid, S.CopyFileRangeIn(so.fh, 0, e.nodeid, do.fh, 0, 3))
        assert MAPPED_CAP not in os.listxattr(p)
        assert err(lambda: fs.getxattr(ROOT, e.nodeid, b"security.capability")) == errno.ENODATA
    finally:
        fs.close()


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_mapped_capability_dropped_on_chown_of_o_path_only_files(tree: tuple[Path, Path],
                                                                 kind: str) -> None:
    """virtiofsd b65ca73: fremovexattr on an O_PATH fd is EBADF; FIFOs and symlinks only have
    O_PATH fds.  (user.* is not allowed on them, so the mapping goes to trusted.)"""
    root = tree[1]
    fs = PassthroughFS(root, xattrmap=":map:security.:trusted.virtiofs.:")
    try:
        if kind == "fifo":
            os.mkfifo(root / "n")
        else:
            os.symlink("file", root / "n")
        e = fs.lookup(ROOT, 1, b"n")
        fs.setxattr(ROOT, e.nodeid, b"security.capability", CAPABILITY, 0)
        mapped = "trusted.virtiofs.security.capability"
        assert mapped in os.listxattr(root / "n", follow_symlinks=False)
        fs.setattr(ROOT, e.nodeid, S.SetattrIn(valid=SetattrValid.UID | SetattrValid.GID,
                                               uid=NOBODY, gid=NOBODY))
        assert mapped not in os.listxattr(root / "n", follow_symlinks=False)
        assert os.lstat(root / "n").st_uid == NOBODY
        assert os.readlink(root / "n") == "file" if kind == "symlink" else True
    finally:
        fs.close()


# ------------------------------------------------------------------- B6 5: xattr mapping


def test_xattrmap_parses_virtiofsd_examples() -> None:
    m = XattrMap.parse(":prefix:all::user.virtiofs.::bad:all:::")
    assert len(m.rules) == 2
    m = XattrMap.parse("""/prefix/all/trusted./user.virtiofs./
                          /bad/server//trusted./
                          /bad/client/user.virtiofs.//
                          /ok/all///""")
    assert [r.type for r in m.rules] == ["prefix", "bad", "bad", "ok"]
    assert m.to_server(b"trusted.overlay.opaque") == b"user.virtiofs.trusted.overlay.opaque"
    assert m.to_client(b"user.virtiofs.trusted.overlay.opaque") == b"trusted.overlay.opaque"
    assert m.to_client(b"trusted.hostonly") is None
    assert m.to_client(b"user.plain") == b"user.plain"
    with pytest.raises(FuseError) as info:
        m.to_server(b"user.virtiofs.x")
    assert info.value.errno == errno.EPERM
    # :map: expands exactly as virtiofsd documents.
    m = XattrMap.parse(":map:trusted.:user.virtiofs.:")
    assert [(r.type, r.client, r.server, r.key, r.prepend) for r in m.rules] == [
        ("prefix", True, True, b"trusted.", b"user.virtiofs."),
        ("bad", False, True, b"", b"trusted."),
        ("bad", True, False, b"user.virtiofs.", b""),
        ("ok", True, True, b"", b"")]
    m = XattrMap.parse(":map::user.virtiofs.:")
    assert [r.type for r in m.rules] == ["prefix", "bad"]
    for broken in ("", ":nope:all:::", ":prefix:everywhere:a:b:", ":prefix:all:a",
                   ":map:a:b::ok:all:::"):
        with pytest.raises(ValueError):
            XattrMap.parse(broken)


def test_xattrmap_trusted_to_user_prefix_hides_and_denies(tree: tuple[Path, Path]) -> None:
    root = tree[1]
    fs = PassthroughFS(root, xattrmap=":map:trusted.:user.virtiofs.:")
    try:
        p = root / "file"
        os.setxattr(p, "trusted.hostonly", b"h")
        os.setxattr(p, "user.plain", b"p")
        e = fs.lookup(ROOT, 1, b"file")
        fs.setxattr(ROOT, e.nodeid, b"trusted.overlay.opaque", b"y", 0)
        assert os.getxattr(p, "user.virtiofs.trusted.overlay.opaque") == b"y"
        assert fs.getxattr(ROOT, e.nodeid, b"trusted.overlay.opaque") == b"y"
        names = set(fs.listxattr(ROOT, e.nodeid))
        assert names == {b"trusted.overlay.opaque", b"user.plain"}
        # The host's own trusted.* are invisible and the mapped namespace is not reachable.
        assert err(lambda: fs.getxattr(ROOT, e.nodeid, b"user.virtiofs.trusted.overlay.opaque")
                   ) == errno.ENODATA
        assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"user.virtiofs.x", b"1", 0)) == errno.EPERM
        assert err(lambda: fs.removexattr(ROOT, e.nodeid, b"user.virtiofs.trusted.overlay.opaque")
                   ) == errno.EPERM
        assert err(lambda: fs.getxattr(ROOT, e.nodeid, b"trusted.hostonly")) == errno.ENODATA
        fs.removexattr(ROOT, e.nodeid, b"trusted.overlay.opaque")
        assert "user.virtiofs.trusted.overlay.opaque" not in os.listxattr(p)
        assert os.getxattr(p, "trusted.hostonly") == b"h"
    finally:
        fs.close()


def test_xattrmap_security_prefix_and_unsupported(tree: tuple[Path, Path]) -> None:
    root = tree[1]
    fs = PassthroughFS(root, xattrmap="/unsupported/all/security.selinux/security.selinux/"
                                      "/prefix/all/security./user.virtiofs./"
                                      "/bad/server//security./"
                                      "/ok/all///")
    try:
        e = fs.lookup(ROOT, 1, b"file")
        assert err(lambda: fs.getxattr(ROOT, e.nodeid, b"security.selinux")) == errno.EOPNOTSUPP
        assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"security.selinux", b"x", 0)) == \
            errno.EOPNOTSUPP
        fs.setxattr(ROOT, e.nodeid, b"security.ima", b"sig", 0)
        assert os.getxattr(root / "file", "user.virtiofs.security.ima") == b"sig"
        assert b"security.ima" in fs.listxattr(ROOT, e.nodeid)
    finally:
        fs.close()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir"])
def test_xattrs_on_symlinks_and_special_files_use_the_inode_itself(fs: PassthroughFS,
                                                                   tree: tuple[Path, Path],
                                                                   kind: str) -> None:
    root = tree[1]
    if kind == "symlink":
        os.symlink("file", root / "n")
    elif kind == "fifo":
        os.mkfifo(root / "n")
    else:
        (root / "n").mkdir()
    e = fs.lookup(ROOT, 1, b"n")
    fs.setxattr(ROOT, e.nodeid, b"trusted.t", b"v", 0)
    assert os.getxattr(root / "n", "trusted.t", follow_symlinks=False) == b"v"
    assert fs.getxattr(ROOT, e.nodeid, b"trusted.t") == b"v"
    assert b"trusted.t" in fs.listxattr(ROOT, e.nodeid)
    fs.removexattr(ROOT, e.nodeid, b"trusted.t")
    # The symlink's target (the regular file) was never touched.
    assert "trusted.t" not in os.listxattr(root / "file")
    if kind != "dir":
        # user.* is not allowed on symlinks and special files (the kernel's rule, not ours).
        assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"user.x", b"v", 0)) == errno.EPERM
    assert open_fds_to(str(root / "n")) == [] or kind != "fifo"


def test_xattr_names_and_sizes_are_checked(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"", b"v", 0)) == errno.EINVAL
    assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"user.a\0b", b"v", 0)) == errno.EINVAL
    assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"user." + b"a" * 300, b"v", 0)) == errno.ERANGE
    assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"user.a", b"v" * 70000, 0)) == errno.E2BIG
    assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"user.a", b"v", 0x100)) == errno.EINVAL
    fs.setxattr(ROOT, e.nodeid, b"user.a", b"v", os.XATTR_CREATE)
    assert err(lambda: fs.setxattr(ROOT, e.nodeid, b"user.a", b"w", os.XATTR_CREATE)) == \
        errno.EEXIST


def test_xattr_off_answers_enosys(tree: tuple[Path, Path]) -> None:
    fs = PassthroughFS(tree[1], xattr=False)
    try:
        assert err(lambda: fs.getxattr(ROOT, 1, b"user.a")) == errno.ENOSYS
        assert err(lambda: fs.listxattr(ROOT, 1)) == errno.ENOSYS
        assert err(lambda: fs.setxattr(ROOT, 1, b"user.a", b"", 0)) == errno.ENOSYS
    finally:
        fs.close()


# ------------------------------------------------------------- B1 #9, B6 6: untrusted ids


def every_id_call(fs: PassthroughFS, nodeid: int, fh: int) -> dict[str, Callable[[], object]]:
    lk = S.LkIn(fh, 7, S.FileLock(0, 10, 1, 0))
    return {
        "lookup": lambda: fs.lookup(ROOT, nodeid, b"x"),
        "getattr": lambda: fs.getattr(ROOT, nodeid, None),
        "setattr": lambda: fs.setattr(ROOT, nodeid, S.SetattrIn(valid=SetattrValid.MODE,
                                                               mode=0o600)),
        "readlink": lambda: fs.readlink(ROOT, nodeid),
        "statfs": lambda: fs.statfs(ROOT, nodeid),
        "access": lambda: fs.access(ROOT, nodeid, 4),
        "statx": lambda: fs.statx(ROOT, nodeid, S.StatxIn()),
        "mknod": lambda: fs.mknod(ROOT, nodeid, b"x", stat.S_IFREG | 0o600, 0),
        "mkdir": lambda: fs.mkdir(ROOT, nodeid, b"x", 0o700),
        "symlink": lambda: fs.symlink(ROOT, nodeid, b"x", b"y"),
        "link": lambda: fs.link(ROOT, nodeid, 1, b"x"),
        "link-dir": lambda: fs.link(ROOT, 1, nodeid, b"x"),
        "unlink": lambda: fs.unlink(ROOT, nodeid, b"x"),
        "rmdir": lambda: fs.rmdir(ROOT, nodeid, b"x"),
        "rename": lambda: fs.rename(ROOT, nodeid, b"x", 1, b"y", 0),
        "rename-dst": lambda: fs.rename(ROOT, 1, b"file", nodeid, b"y", 0),
        "open": lambda: fs.open(ROOT, nodeid, os.O_RDONLY, 0),
        "create": lambda: fs.create(ROOT, nodeid, b"x", 0o600, os.O_RDWR, 0),
        "tmpfile": lambda: fs.tmpfile(ROOT, nodeid, 0o600, os.O_RDWR, 0),
        "read": lambda: fs.read(ROOT, nodeid, fh, 0, 10),
        "write": lambda: fs.write(ROOT, nodeid, fh, 0, memoryview(b"x"), 0),
        "flush": lambda: fs.flush(ROOT, nodeid, fh, 1),
        "release": lambda: fs.release(ROOT, nodeid, S.ReleaseIn(fh)),
        "fsync": lambda: fs.fsync(ROOT, nodeid, fh, False),
        "fallocate": lambda: fs.fallocate(ROOT, nodeid, fh, 0, 10, 0),
        "lseek": lambda: fs.lseek(ROOT, nodeid, fh, 0, os.SEEK_DATA),
        "copy_file_range": lambda: fs.copy_file_range(
            ROOT, nodeid, S.CopyFileRangeIn(fh, 0, nodeid, fh, 0, 10)),
        "getlk": lambda: fs.getlk(ROOT, nodeid, lk),
        "setlk": lambda: fs.setlk(ROOT, nodeid, lk, False),
        "flock": lambda: fs.setlk(ROOT, nodeid, lk._replace(lk_flags=1), False),
        "setxattr": lambda: fs.setxattr(ROOT, nodeid, b"user.a", b"v", 0),
        "getxattr": lambda: fs.getxattr(ROOT, nodeid, b"user.a"),
        "listxattr": lambda: fs.listxattr(ROOT, nodeid),
        "removexattr": lambda: fs.removexattr(ROOT, nodeid, b"user.a"),
        "opendir": lambda: fs.opendir(ROOT, nodeid, 0),
        "readdir": lambda: list(fs.readdir(ROOT, nodeid, fh, 0)),
        "readdirplus": lambda: list(fs.readdirplus(ROOT, nodeid, fh, 0)),
        "releasedir": lambda: fs.releasedir(ROOT, nodeid, fh),
        "fsyncdir": lambda: fs.fsyncdir(ROOT, nodeid, fh, False),
        "syncfs": lambda: fs.syncfs(ROOT, nodeid),
    }


def test_unknown_node_ids_and_handles_answer_ebadf(fs: PassthroughFS,
                                                   tree: tuple[Path, Path]) -> None:
    before = snapshot(tree[0])
    rng = random.Random(1234)
    ids = [0, 2, 3, 99, 2**32, 2**63, 2**64 - 1] + [rng.getrandbits(64) for _ in range(10)]
    for nodeid in ids:
        for fh in (0, 1, 2**64 - 1, rng.getrandbits(64)):
            for name, call in every_id_call(fs, nodeid, fh).items():
                code = err(call)
                assert code in (errno.EBADF, errno.ENOENT), (name, nodeid, fh, code)
    assert snapshot(tree[0]) == before
    assert fs.stats()["inodes"] == 1 and fs.stats()["handles"] == 0


def test_a_file_handle_is_not_a_directory_handle_and_vice_versa(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    o = fs.open(ROOT, e.nodeid, os.O_RDWR, 0)
    d = fs.opendir(ROOT, 1, 0)
    assert err(lambda: list(fs.readdir(ROOT, 1, o.fh, 0))) == errno.EBADF
    assert err(lambda: fs.releasedir(ROOT, 1, o.fh)) == errno.EBADF
    assert err(lambda: fs.read(ROOT, 1, d.fh, 0, 10)) == errno.EBADF
    assert err(lambda: fs.write(ROOT, 1, d.fh, 0, memoryview(b"x"), 0)) == errno.EBADF
    assert err(lambda: fs.release(ROOT, 1, S.ReleaseIn(d.fh))) == errno.EBADF
    fs.release(ROOT, e.nodeid, S.ReleaseIn(o.fh))
    fs.releasedir(ROOT, 1, d.fh)
    # Released handles are gone: a second release is EBADF, not a double close.
    assert err(lambda: fs.release(ROOT, e.nodeid, S.ReleaseIn(o.fh))) == errno.EBADF
    assert err(lambda: fs.releasedir(ROOT, 1, d.fh)) == errno.EBADF


def test_forget_saturates_and_ignores_unknown_ids(fs: PassthroughFS) -> None:
    e = fs.lookup(ROOT, 1, b"file")
    fs.lookup(ROOT, 1, b"file")
    fs.lookup(ROOT, 1, b"file")
    assert fs.nlookup(e.nodeid) == 3
    fs.forget([(e.nodeid, 1)])
    assert fs.nlookup(e.nodeid) == 2
    # More than it has, repeated, for unknown ids, for the root, absurd counts.
    fs.forget([(e.nodeid, 2**64 - 1), (e.nodeid, 5), (123456, 1), (0, 1), (1, 2**64 - 1),
               (2**64 - 1, 2**64 - 1)])
    assert fs.nlookup(e.nodeid) == 0
    assert fs.stats()["inodes"] == 1 and fs.stats()["fds"] == 0
    assert err(lambda: fs.getattr(ROOT, e.nodeid, None)) == errno.EBADF
    # The root survives everything.
    assert fs.getattr(ROOT, 1, None).attr.mode & stat.S_IFDIR
    # A new lookup gets a new node id: ids are never reused within a connection.
    assert fs.lookup(ROOT, 1, b"file").nodeid != e.nodeid


def test_forget_racing_with_operations_never_uses_a_closed_fd(fs: PassthroughFS,
                                                              tree: tuple[Path, Path]) -> None:
    """A hostile FORGET while requests on that node are in flight: each request keeps its own
    reference, so no fd number is used after being closed (and maybe reused)."""
    e = fs.lookup(ROOT, 1, b"dir")
    stop = threading.Event()
    problems: list[BaseException] = []

    def user() -> None:
        while not stop.is_set():
            for call in (lambda: fs.lookup(ROOT, e.nodeid, b"inner"),
                         lambda: fs.getattr(ROOT, e.nodeid, None)):
                try:
                    r = call()
                    if isinstance(r, S.EntryOut):
                        fs.forget([(r.nodeid, 1)])
                except FuseError as exc:
                    if exc.errno != errno.EBADF:
                        problems.append(exc)
                except BaseException as exc:  # pragma: no cover - reported below
                    problems.append(exc)

    threads = [threading.Thread(target=user) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(300):
        fs.forget([(e.nodeid, 2**63)])
        e = fs.lookup(ROOT, 1, b"dir")
        # Churn fd numbers so a stale one would point elsewhere.
        for fd in [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]:
            os.close(fd)
    stop.set()
    for t in threads:
        t.join(30)
    assert not problems


def test_batch_forget_count_mismatch_is_dropped_without_harm(fs: PassthroughFS) -> None:
    session = init_session(fs)
    e = fs.lookup(ROOT, 1, b"file")
    good = encode_request(Opcode.BATCH_FORGET, 10, 0, S.BatchForgetIn(1),
                          items=[S.ForgetOne(e.nodeid, 1)])
    # Say 1000 entries, carry one: no reply, nothing forgotten, the session goes on.
    lying = bytearray(good)
    struct.pack_into("<I", lying, 40, 1000)
    assert session.handle(bytes(lying)) is None
    assert fs.nlookup(e.nodeid) == 1
    assert session.handle(good) is None
    assert fs.nlookup(e.nodeid) == 0
    assert raw(session, Opcode.GETATTR, 1, S.GetattrIn()) == 0


# ---------------------------------------------------------------- B1 #14: read-only mode


def test_readonly_refuses_every_modification(tree: tuple[Path, Path]) -> None:
    base, root = tree
    os.setxattr(root / "file", "user.keep", b"1")
    fs = PassthroughFS(root, readonly=True)
    try:
        before = snapshot(base)
        f = lookup_path(fs, b"file")
        d = lookup_path(fs, b"dir")
        ro = fs.open(ROOT, f.nodeid, os.O_RDONLY, 0)
        assert fs.read(ROOT, f.nodeid, ro.fh, 0, 5) == b"hello"
        calls: dict[str, Callable[[], object]] = {
            "setattr-mode": lambda: fs.setattr(ROOT, f.nodeid, S.SetattrIn(
                valid=SetattrValid.MODE, mode=0o777)),
            "setattr-size": lambda: fs.setattr(ROOT, f.nodeid, S.SetattrIn(
                valid=SetattrValid.SIZE, size=0)),
            "setattr-times": lambda: fs.setattr(ROOT, f.nodeid, S.SetattrIn(
                valid=SetattrValid.MTIME_NOW)),
            "mknod": lambda: fs.mknod(ROOT, 1, b"n", stat.S_IFIFO | 0o644, 0),
            "mkdir": lambda: fs.mkdir(ROOT, 1, b"n", 0o755),
            "symlink": lambda: fs.symlink(ROOT, 1, b"n", b"t"),
            "link": lambda: fs.link(ROOT, f.nodeid, 1, b"n"),
            "unlink": lambda: fs.unlink(ROOT, 1, b"file"),
            "rmdir": lambda: fs.rmdir(ROOT, 1, b"dir"),
            "rename": lambda: fs.rename(ROOT, 1, b"file", d.nodeid, b"moved", 0),
            "create": lambda: fs.create(ROOT, 1, b"n", 0o644, os.O_RDWR, 0),
            "tmpfile": lambda: fs.tmpfile(ROOT, 1, 0o644, os.O_RDWR, 0),
            "open-wr": lambda: fs.open(ROOT, f.nodeid, os.O_WRONLY, 0),
            "open-rdwr": lambda: fs.open(ROOT, f.nodeid, os.O_RDWR, 0),
            "open-trunc": lambda: fs.open(ROOT, f.nodeid, os.O_RDONLY | os.O_TRUNC, 0),
            "write": lambda: fs.write(ROOT, f.nodeid, ro.fh, 0, memoryview(b"x"), 0),
            "fallocate": lambda: fs.fallocate(ROOT, f.nodeid, ro.fh, 0, 100, 0),
            "copy_file_range": lambda: fs.copy_file_range(ROOT, f.nodeid, S.CopyFileRangeIn(
                ro.fh, 0, f.nodeid, ro.fh, 100, 5)),
            "setxattr": lambda: fs.setxattr(ROOT, f.nodeid, b"user.new", b"v", 0),
            "removexattr": lambda: fs.removexattr(ROOT, f.nodeid, b"user.keep"),
            "access-w": lambda: fs.access(ROOT, f.nodeid, os.W_OK),
        }
        for name, call in calls.items():
            assert err(call) == errno.EROFS, name
        session = init_session(fs)
        assert raw(session, Opcode.WRITE, f.nodeid, S.WriteIn(ro.fh, 0, 1), data=b"x") == \
            -errno.EROFS
        assert raw(session, Opcode.SETATTR, f.nodeid, S.SetattrIn(
            valid=SetattrValid.MODE, mode=0o600)) == -errno.EROFS
        assert raw(session, Opcode.CREATE, 1, S.CreateIn(os.O_RDWR, 0o644), [b"c"]) == \
            -errno.EROFS
        assert raw(session, Opcode.SETXATTR, f.nodeid, S.SetxattrIn(1), [b"user.x"],
                   data=b"v") == -errno.EROFS
        assert raw(session, Opcode.RENAME, 1, S.RenameIn(1), [b"file", b"b"]) == -errno.EROFS
        assert snapshot(base) == before
        # Reading still works.
        assert fs.getxattr(ROOT, f.nodeid, b"user.keep") == b"1"
        assert [x.name for x in fs.readdir(ROOT, 1, fs.opendir(ROOT, 1, 0).fh, 0)]
    finally:
        fs.close()


# --------------------------------------------------------- B1 #4 / B6 10: fd exhaustion


def test_fd_exhaustion_answers_emfile_and_recovers(tree: tuple[Path, Path]) -> None:
    root = tree[1]
    for i in range(40):
        (root / f"f{i}").write_text("x")
    fs = PassthroughFS(root, max_fds=16)
    try:
        got: list[S.EntryOut] = []
        codes = set()
        for i in range(40):
            try:
                got.append(fs.lookup(ROOT, 1, f"f{i}".encode()))
            except FuseError as exc:
                codes.add(exc.errno)
        assert codes == {errno.EMFILE}
        assert len(got) == 16 and fs.stats()["fds"] == 16
        # Opens are refused too, and the budget holds exactly.
        assert err(lambda: fs.open(ROOT, got[0].nodeid, os.O_RDONLY, 0)) == errno.EMFILE
        assert err(lambda: fs.opendir(ROOT, 1, 0)) == errno.EMFILE
        assert err(lambda: fs.create(ROOT, 1, b"new", 0o644, os.O_RDWR, 0)) == errno.EMFILE
        assert not (root / "new").exists()
        # Known inodes can still be looked up (no new fd), and forgetting frees room.
        assert fs.lookup(ROOT, 1, b"f0").nodeid == got[0].nodeid
        fs.forget([(e.nodeid, 2**32) for e in got[:4]])
        assert fs.stats()["fds"] == 12
        o = fs.open(ROOT, got[5].nodeid, os.O_RDONLY, 0)
        assert fs.read(ROOT, got[5].nodeid, o.fh, 0, 1) == b"x"
    finally:
        fs.close()


# ----------------------------------------------------------------------------- helpers


def init_session(fs: PassthroughFS) -> Session:
    session = Session(fs)
    flags = int(InitFlags.INIT_EXT | fs.init_flags)
    init = encode_request(Opcode.INIT, 2, 0, S.InitIn(7, KERNEL_MINOR_VERSION, 65536,
                                                       flags & 0xFFFFFFFF, flags >> 32))
    reply = session.handle(init)
    assert reply is not None
    assert struct.unpack_from("<i", b"".join(reply), 4)[0] == 0
    return session


_unique = iter(range(100, 10**9, 2))


def raw_parts(session: Session, opcode: Opcode, nodeid: int, arg: Any = None,
              names: list[bytes] | None = None, data: bytes = b"") -> tuple[int, bytes]:
    request = encode_request(opcode, next(_unique), nodeid, arg, names or [], data)
    reply = session.handle(request)
    assert reply is not None
    out = b"".join(bytes(p) for p in reply)
    length, error, _ = struct.unpack_from("<IiQ", out)
    assert length == len(out)
    return error, out[16:]


def raw(session: Session, opcode: Opcode, nodeid: int, arg: Any = None,
        names: list[bytes] | None = None, data: bytes = b"") -> int:
    """The reply's error field (0 or -errno) for a raw request."""
    return raw_parts(session, opcode, nodeid, arg, names, data)[0]


def raw_reply(session: Session, opcode: Opcode, nodeid: int, arg: Any = None,
              names: list[bytes] | None = None) -> bytes:
    error, body = raw_parts(session, opcode, nodeid, arg, names)
    assert error == 0, error
    return body
