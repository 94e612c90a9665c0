"""PassthroughFS through a real kernel mount (/dev/fuse): the host tree is checked after.

Covers: the shared POSIX suite (``tests/posix_suite.py``) on a PassthroughFS mount, confinement
seen from a client (symlink / ``..`` / absolute escapes, rename and hard links across the root),
credentials, killpriv and read-only mode end to end, fd exhaustion, and kernel passthrough I/O
(reads and writes never reach Python while the data is right).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtiofs.protocol import InitFlags
from virtiofs.server.passthrough import PassthroughFS

pytestmark = [
    pytest.mark.devfuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
]

devfuse = pytest.importorskip("virtiofs.transport.devfuse")

NOBODY = 65534
# The test interpreter may live under /root (pyenv), out of an unprivileged user's reach; the
# callers' code only needs os, so the system interpreter does.
USER_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


class CountingFS(PassthroughFS):
    """PassthroughFS that counts the data requests that reach Python."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0
        self.writes = 0

    def read(self, *args: Any) -> bytes:
        self.reads += 1
        return super().read(*args)

    def write(self, *args: Any) -> int:
        self.writes += 1
        return super().write(*args)


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse (pytest's tmp_path is under a 0700
    directory, out of reach of the unprivileged callers these tests run)."""
    path = Path(tempfile.mkdtemp(prefix="virtiofs-pt-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def layout(world_tmp: Path) -> dict[str, Path]:
    """A source tree beside things that must not be touched, and a mount point elsewhere, so
    a name resolved on the server side and on the client side lead to different places."""
    tmp_path = world_tmp
    base = tmp_path / "base"
    src = base / "src"
    src.mkdir(parents=True)
    os.chmod(src, 0o777)
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_text("secret")
    (src / "file").write_text("hello")
    (src / "dir").mkdir()
    client = tmp_path / "client"
    mnt = client / "mnt"
    mnt.mkdir(parents=True)
    return {"base": base, "src": src, "mnt": mnt, "client": client}


@pytest.fixture
def mounted(layout: dict[str, Path]) -> Iterator[tuple[CountingFS, Any]]:
    fs = CountingFS(layout["src"])
    m = devfuse.mount(fs, layout["mnt"], allow_other=True)
    try:
        yield fs, m
    finally:
        m.unmount()
        fs.close()


def snapshot(path: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def as_user(code: str, uid: int = NOBODY, gid: int = NOBODY) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as another user (a real guest-like caller through the mount)."""
    return subprocess.run([USER_PYTHON, "-c", code], user=uid, group=gid, extra_groups=[],
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------ POSIX suite


SERVER = """
import sys
from virtiofs.server.passthrough import PassthroughFS
from virtiofs.transport.devfuse import serve
serve(PassthroughFS(sys.argv[1], allow_mknod=True,
                    passthrough="auto" if sys.argv[3] == "1" else False),
      sys.argv[2], allow_other=True)
"""


def _mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def _abort_and_detach(path: Path) -> None:
    """Last resort for a wedged mount: abort its FUSE connection, then detach it."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real:
                minor = fields[2].split(":")[1]
                with contextlib.suppress(OSError):
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    subprocess.run(["umount", "-l", real], check=False, capture_output=True)


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "python-io"])
def test_posix_suite_on_a_passthrough_mount(layout: dict[str, Path], passthrough: bool) -> None:
    """The shared POSIX checks, with the server in its own process: a check that wedges the
    client (locks, killed waiters, forks) can never wedge the server serving it, and the
    teardown can always end both."""
    suite = Path(__file__).with_name("posix_suite.py")
    if not suite.exists():
        pytest.skip("tests/posix_suite.py not there yet")
    outside = snapshot(layout["base"] / "outside")
    mnt = layout["mnt"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(layout["src"]), str(mnt),
                               "1" if passthrough else "0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mnt):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "server did not mount"
            time.sleep(0.05)
        (mnt / "posix").mkdir()
        # The suite makes device nodes as root (special_files): allowed with allow_mknod; the
        # mount is nodev, so they cannot be opened through it anyway.
        run = subprocess.run([sys.executable, str(suite), str(mnt / "posix")], env=env,
                             capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.count("ok ") >= 40
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                _abort_and_detach(mnt)
                server.kill()
                server.wait(15)
        if _mounted(mnt):
            _abort_and_detach(mnt)
    # Whatever the suite did happened in the source tree and nowhere else.
    assert (layout["src"] / "posix").is_dir()
    assert snapshot(layout["base"] / "outside") == outside


# ---------------------------------------------------------------------- host tree checks


def test_operations_land_in_the_host_tree(layout: dict[str, Path],
                                          mounted: tuple[CountingFS, Any]) -> None:
    src, mnt = layout["src"], layout["mnt"]
    (mnt / "dir" / "new").write_bytes(b"payload")
    os.mkdir(mnt / "dir" / "sub", 0o750)
    os.symlink("new", mnt / "dir" / "link")
    os.link(mnt / "dir" / "new", mnt / "hard")
    os.rename(mnt / "file", mnt / "dir" / "renamed")
    os.chmod(mnt / "hard", 0o640)
    os.chown(mnt / "dir" / "sub", 1234, 4321)
    os.truncate(mnt / "dir" / "renamed", 2)
    os.setxattr(mnt / "hard", "user.tag", b"v")
    os.utime(mnt / "hard", ns=(5 * 10**9, 7 * 10**9))
    assert (src / "dir" / "new").read_bytes() == b"payload"
    assert stat.S_IMODE(os.lstat(src / "dir" / "sub").st_mode) == 0o750
    assert os.readlink(src / "dir" / "link") == "new"
    assert os.lstat(src / "hard").st_ino == os.lstat(src / "dir" / "new").st_ino
    assert not (src / "file").exists() and (src / "dir" / "renamed").read_text() == "he"
    assert stat.S_IMODE(os.lstat(src / "hard").st_mode) == 0o640
    assert (os.lstat(src / "dir" / "sub").st_uid, os.lstat(src / "dir" / "sub").st_gid) == \
        (1234, 4321)
    assert os.getxattr(src / "dir" / "new", "user.tag") == b"v"
    assert os.lstat(src / "hard").st_mtime_ns == 7 * 10**9
    os.unlink(mnt / "hard")
    os.unlink(mnt / "dir" / "link")
    os.rmdir(mnt / "dir" / "sub")
    assert sorted(os.listdir(src / "dir")) == ["new", "renamed"]
    # And host-side changes are seen through the mount.
    (src / "dir" / "from-host").write_text("h")
    assert (mnt / "dir" / "from-host").read_text() == "h"


def test_readdir_of_5000_entries_through_the_mount(layout: dict[str, Path],
                                                   mounted: tuple[CountingFS, Any]) -> None:
    big = layout["src"] / "big"
    big.mkdir()
    for i in range(5000):
        (big / f"e{i:05d}").touch()
    names = os.listdir(layout["mnt"] / "big")
    assert sorted(names) == [f"e{i:05d}" for i in range(5000)]
    with os.scandir(layout["mnt"] / "big") as it:
        assert sum(1 for e in it if e.is_file()) == 5000


# ------------------------------------------------------------------------ confinement


def test_escapes_through_the_mount_go_nowhere(layout: dict[str, Path],
                                              mounted: tuple[CountingFS, Any]) -> None:
    base, src, mnt, client = layout["base"], layout["src"], layout["mnt"], layout["client"]
    before = snapshot(base / "outside")
    # A relative symlink that leads outside the source on the server side resolves on the
    # client side only (as in a guest): it reaches the server's outside/ never.
    os.symlink("../outside/secret", src / "esc")
    with pytest.raises(FileNotFoundError):
        (mnt / "esc").read_text()
    with pytest.raises(FileNotFoundError):
        (mnt / "esc").write_text("pwned")
    assert os.readlink(mnt / "esc") == "../outside/secret"
    # ".." at the mount's root is the client's directory, not the server's.
    assert sorted(os.listdir(mnt / "..")) == sorted(os.listdir(client))
    assert not (mnt / ".." / "outside").exists()
    # Renames and hard links across the mount boundary are refused by the client VFS, and
    # names that try to climb out are single components for the server (EINVAL in raw tests).
    with pytest.raises(OSError) as info:
        os.rename(mnt / "file", client / "stolen")
    assert info.value.errno == errno.EXDEV
    with pytest.raises(OSError) as info:
        os.link(mnt / "file", client / "hard")
    assert info.value.errno == errno.EXDEV
    with pytest.raises(OSError) as info:
        os.rename(base / "outside" / "secret", mnt / "moved-in")
    assert info.value.errno == errno.EXDEV
    # A directory replaced by a symlink to outside is never traversed by the server.
    os.rename(src / "dir", src / "dir.real")
    os.symlink(str(base / "outside"), src / "dir")
    st = os.lstat(mnt / "dir")
    assert stat.S_ISLNK(st.st_mode)
    assert snapshot(base / "outside") == before
    assert (base / "outside" / "secret").read_text() == "secret"
    assert sorted(os.listdir(client)) == ["mnt"]


def test_special_files_in_the_share_are_not_opened_by_the_server(
        layout: dict[str, Path], mounted: tuple[CountingFS, Any]) -> None:
    src, mnt = layout["src"], layout["mnt"]
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)
    # The mount is nodev: the client refuses device opens; the server never opens either.
    with pytest.raises(PermissionError):
        open(mnt / "null", "rb")
    fs, _ = mounted
    for h in list(fs._handles.values()):
        assert stat.S_ISREG(os.fstat(h.fd).st_mode) or stat.S_ISDIR(os.fstat(h.fd).st_mode)


# ------------------------------------------------------------- credentials and killpriv


def test_files_created_by_a_user_belong_to_it(layout: dict[str, Path],
                                              mounted: tuple[CountingFS, Any]) -> None:
    src, mnt = layout["src"], layout["mnt"]
    r = as_user(f"import os; os.umask(0o027); open({str(mnt / 'mine')!r}, 'w').write('x');"
                f"os.mkdir({str(mnt / 'mydir')!r}, 0o777)")
    assert r.returncode == 0, r.stderr
    for name, mode in (("mine", 0o640), ("mydir", 0o750)):
        st = os.lstat(src / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, mode)


def test_setgid_root_directory_gives_no_setgid_root_file(layout: dict[str, Path],
                                                         mounted: tuple[CountingFS, Any]) -> None:
    """CVE-2022-0358 end to end: as 65534 in a 02777 root-group dir, open(O_CREAT, 02755)."""
    src, mnt = layout["src"], layout["mnt"]
    (src / "sgid").mkdir()
    os.chmod(src / "sgid", 0o2777)
    target = mnt / "sgid" / "exe"
    r = as_user(f"import os; os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY, 0o2755))")
    assert r.returncode == 0, r.stderr
    st = os.lstat(src / "sgid" / "exe")
    assert st.st_gid == 0 and st.st_uid == NOBODY
    assert not st.st_mode & stat.S_ISGID


@pytest.mark.parametrize("mode", [0o4777, 0o2777, 0o6777])
def test_non_owner_write_and_truncate_clear_suid_sgid(layout: dict[str, Path],
                                                      mounted: tuple[CountingFS, Any],
                                                      mode: int) -> None:
    """pjdfstest chmod/12.t through the kernel (HANDLE_KILLPRIV_V2 negotiated)."""
    src, mnt = layout["src"], layout["mnt"]
    for name in ("w", "t"):
        p = src / name
        p.write_text("data")
        os.chown(p, NOBODY, NOBODY)
        os.chmod(p, mode)
    r = as_user(f"import os; fd = os.open({str(mnt / 'w')!r}, os.O_WRONLY); os.write(fd, b'x');"
                f"os.close(fd); os.truncate({str(mnt / 't')!r}, 1)")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.lstat(src / "w").st_mode) == 0o777
    assert stat.S_IMODE(os.lstat(src / "t").st_mode) == 0o777


def test_readonly_filesystem_refuses_writes_at_the_device(layout: dict[str, Path]) -> None:
    """B1 #14: read-only enforced by the server, not by the mount (mounted read-write)."""
    src, mnt = layout["src"], layout["mnt"]
    before = snapshot(src)
    fs = PassthroughFS(src, readonly=True)
    with devfuse.mount(fs, mnt):
        assert (mnt / "file").read_text() == "hello"
        for attempt in (lambda: open(mnt / "file", "w"), lambda: open(mnt / "new", "w"),
                        lambda: os.mkdir(mnt / "d2"), lambda: os.unlink(mnt / "file"),
                        lambda: os.rename(mnt / "file", mnt / "f2"),
                        lambda: os.chmod(mnt / "file", 0o777),
                        lambda: os.setxattr(mnt / "file", "user.x", b"1"),
                        lambda: os.symlink("x", mnt / "l")):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
    fs.close()
    assert snapshot(src) == before


def test_fd_exhaustion_answers_emfile_and_the_mount_lives(layout: dict[str, Path]) -> None:
    src, mnt = layout["src"], layout["mnt"]
    for i in range(100):
        (src / f"f{i}").write_text("x")
    fs = PassthroughFS(src, max_fds=32, cache="none")
    with devfuse.mount(fs, mnt):
        held = []
        failures = 0
        for i in range(100):
            try:
                held.append(open(mnt / f"f{i}", "rb"))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                failures += 1
        assert failures > 0 and held
        for f in held:
            f.close()
        # Still alive and serving.
        assert (mnt / "file").read_text() == "hello"
    fs.close()


# ------------------------------------------------------------------ kernel passthrough


def test_passthrough_reads_and_writes_never_reach_python(layout: dict[str, Path],
                                                         mounted: tuple[CountingFS, Any]) -> None:
    fs, m = mounted
    if not m.session.conn.kernel_flags & InitFlags.PASSTHROUGH:
        pytest.skip("kernel did not offer FUSE_PASSTHROUGH")
    # Offered by the kernel: it must be negotiated (the transport hands us /dev/fuse hooks).
    assert m.session.flags & InitFlags.PASSTHROUGH
    assert fs.passthrough_active and m.session.conn.max_stack_depth == 1
    src, mnt = layout["src"], layout["mnt"]
    data = os.urandom(3 << 20)
    (src / "big").write_bytes(data)
    with open(mnt / "big", "rb") as f:
        assert f.read() == data
        f.seek(12345)
        assert f.read(4096) == data[12345:12345 + 4096]
    with open(mnt / "big", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[1 << 20:(1 << 20) + 100] == data[1 << 20:(1 << 20) + 100]
    with open(mnt / "big", "r+b") as f:
        f.seek(100)
        f.write(b"Z" * 5000)
    fd = os.open(mnt / "out", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"through the backing file")
    os.close(fd)
    assert (src / "out").read_bytes() == b"through the backing file"
    assert (src / "big").read_bytes()[100:5100] == b"Z" * 5000
    assert fs.reads == 0 and fs.writes == 0
    # Every backing id is given back once the files are released (RELEASE is asynchronous).
    deadline = time.monotonic() + 10
    while any(i.backing_refs for i in list(fs._inodes.values())):
        assert time.monotonic() < deadline, "backing files still registered"
        time.sleep(0.01)


def test_without_passthrough_reads_go_through_python(layout: dict[str, Path]) -> None:
    src, mnt = layout["src"], layout["mnt"]
    fs = CountingFS(src, passthrough=False)
    with devfuse.mount(fs, mnt) as m:
        assert not m.session.flags & InitFlags.PASSTHROUGH
        assert (mnt / "file").read_text() == "hello"
        assert fs.reads > 0
    fs.close()


def test_passthrough_write_drops_a_mapped_security_capability(world_tmp: Path) -> None:
    """CVE-2021-20263 with kernel passthrough: the write never reaches us, so the guest
    kernel's own killpriv (getxattr + removexattr of security.capability) must do it."""
    src = world_tmp / "src"
    mnt = world_tmp / "mnt"
    src.mkdir()
    mnt.mkdir()
    p = src / "exe"
    p.write_bytes(b"\x7fELF")
    os.chmod(p, 0o755)
    fs = CountingFS(src, xattrmap=":map:security.:user.virtiofs.:")
    cap = __import__("struct").pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    with devfuse.mount(fs, mnt) as m:
        os.setxattr(mnt / "exe", "security.capability", cap)
        assert os.getxattr(p, "user.virtiofs.security.capability") == cap
        with open(mnt / "exe", "r+b") as f:
            f.write(b"X")
        passthrough = bool(m.session.flags & InitFlags.PASSTHROUGH)
    fs.close()
    assert "user.virtiofs.security.capability" not in os.listxattr(p)
    assert fs.writes == 0 or not passthrough
