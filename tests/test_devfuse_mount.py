"""Mounting through /dev/fuse: lifecycle, unmounting (ours, external, on signals), the
``virtiofs mount`` command and the examples, all against the real kernel."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtiofs.protocol import InitFlags
from virtiofs.server.memfs import MemoryFS

pytestmark = [pytest.mark.devfuse]

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent


def _devfuse() -> Any:
    from virtiofs.transport import devfuse
    return devfuse


def test_mount_serves_and_unmounts(fuse_mount: Callable[..., Any]) -> None:
    devfuse = _devfuse()
    m = fuse_mount(MemoryFS(), fsname="memtest", subtype="vtest", threads=3)
    entry = devfuse.mount_entry(m.mountpoint)
    assert entry is not None and entry.fstype == "fuse.vtest" and entry.source == "memtest"
    assert "default_permissions" in entry.options + open("/proc/self/mountinfo").read()
    assert m.session.minor == 45 and m.session.flags & InitFlags.POSIX_LOCKS
    Path(m.mountpoint, "f").write_bytes(b"x")
    assert os.listdir(m.mountpoint) == ["f"]
    m.unmount()
    assert not devfuse.is_mountpoint(m.mountpoint) and m.ended.is_set()
    assert not os.path.exists(os.path.join(m.mountpoint, "f"))
    m.unmount()  # idempotent


def test_mount_options_reach_the_kernel(fuse_mount: Callable[..., Any]) -> None:
    m = fuse_mount(MemoryFS(), allow_other=True, default_permissions=False, read_only=True,
                   max_read=65536)
    line = next(x for x in open("/proc/self/mountinfo") if f" {m.mountpoint} " in x)
    assert "allow_other" in line and "max_read=65536" in line and " ro," in line
    assert "default_permissions" not in line
    with pytest.raises(OSError) as info:
        Path(m.mountpoint, "f").write_bytes(b"x")
    assert info.value.errno == errno.EROFS


def test_bad_mount_points_and_options_are_refused(tmp_path: Path,
                                                  fuse_mount: Callable[..., Any]) -> None:
    devfuse = _devfuse()
    with pytest.raises(FileNotFoundError):
        devfuse.mount(MemoryFS(), tmp_path / "missing")
    m = fuse_mount(MemoryFS())
    with pytest.raises(OSError) as info:
        devfuse.mount(MemoryFS(), m.mountpoint)
    assert info.value.errno == errno.EBUSY
    from virtiofs.errors import LocalProtocolError
    with pytest.raises(LocalProtocolError):
        devfuse.mount(MemoryFS(), tmp_path, subtype="x,allow_other")
    with pytest.raises(TypeError):
        devfuse.mount(MemoryFS(), tmp_path, no_such_option=1)
    assert not devfuse.is_mountpoint(tmp_path)


def test_an_external_umount_ends_the_connection(fuse_mount: Callable[..., Any]) -> None:
    m = fuse_mount(MemoryFS())
    subprocess.run(["umount", m.mountpoint], check=True, timeout=30)
    assert m.wait(10), "readers did not notice the unmount (ENODEV)"
    assert m.session.destroyed  # unmount() after an external umount: nothing left to do
    m.unmount()
    assert not _devfuse().is_mountpoint(m.mountpoint)


def test_unmounting_a_busy_mount_aborts_and_detaches(fuse_mount: Callable[..., Any]) -> None:
    m = fuse_mount(MemoryFS())
    held = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.monotonic()
        m.unmount()
        assert time.monotonic() - t0 < 5
        assert not _devfuse().is_mountpoint(m.mountpoint) and m.ended.is_set()
        with pytest.raises(OSError) as info:
            os.listdir(held)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    finally:
        os.close(held)


def test_lazy_unmount_and_leak_check_helpers(fuse_mount: Callable[..., Any],
                                             tmp_path: Path) -> None:
    devfuse = _devfuse()
    m = fuse_mount(MemoryFS())
    assert devfuse.fuse_mounts_under(tmp_path) == [m.mountpoint]
    assert devfuse.lazy_unmount(m.mountpoint)
    assert devfuse.fuse_mounts_under(tmp_path) == []
    assert not devfuse.lazy_unmount(m.mountpoint)


# ------------------------------------------------------------------------ virtiofs mount


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "virtiofs", "mount", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_mount_command_serves_until_signalled(sig: int, tmp_path: Path,
                                              mount_process: Callable[..., Any]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount_process([PY, "-m", "virtiofs", "mount", "--memory", str(mnt),
                          "--threads", "3", "--cache", "always", "--log-level", "info"], mnt)
    (mnt / "f").write_bytes(b"through the command")
    assert (mnt / "f").read_bytes() == b"through the command"
    proc.send_signal(sig)
    assert proc.wait(20) == 0
    assert not _devfuse().is_mountpoint(mnt)
    assert "negotiated" in proc.stderr.read()


def test_mount_command_ends_when_unmounted(tmp_path: Path,
                                           mount_process: Callable[..., Any]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount_process([PY, "-m", "virtiofs", "mount", "--memory", str(mnt)], mnt)
    subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    assert proc.wait(20) == 0


@pytest.mark.parametrize("args,message", [
    (["--memory", "/nonexistent/mnt"], "does not exist"),
    (["/nonexistent/src", "{tmp}"], "not a directory"),
    (["{tmp}"], "SOURCE is required"),
    (["--memory", "{tmp}", "{tmp}"], "either SOURCE or --memory"),
    (["--memory", "--cache", "sometimes", "{tmp}"], "invalid choice"),
    (["--memory", "--threads", "0", "{tmp}"], "between 1 and 64"),
])
def test_mount_command_usage_errors_exit_2(args: list[str], message: str,
                                           tmp_path: Path) -> None:
    result = _cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(("virtiofs mount: error:",
                                                               "usage:", "virtiofs"))
    assert not _devfuse().is_mountpoint(tmp_path)


def test_mount_command_busy_mount_point_exits_2(fuse_mount: Callable[..., Any]) -> None:
    m = fuse_mount(MemoryFS())
    result = _cli("--memory", m.mountpoint)
    assert result.returncode == 2 and "busy" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_mount_command_without_passthrough_says_so(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from virtiofs import cli
    monkeypatch.setitem(sys.modules, "virtiofs.server.passthrough", None)
    src = tmp_path / "src"
    src.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert cli.main(["mount", str(src), str(mnt)]) == 2
    err = capsys.readouterr().err
    assert "PassthroughFS" in err and "--memory" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ examples


def test_hello_example(tmp_path: Path, mount_process: Callable[..., Any]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount_process([PY, "examples/hello.py", str(mnt)], mnt)
    assert os.listdir(mnt) == ["hello"]
    assert (mnt / "hello").read_bytes() == b"Hello, world!\n"
    assert (mnt / "hello").stat().st_mode & 0o777 == 0o444
    with pytest.raises(FileNotFoundError):
        (mnt / "other").stat()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    assert not _devfuse().is_mountpoint(mnt)


def test_memfs_example(tmp_path: Path, mount_process: Callable[..., Any]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount_process([PY, "examples/memfs_mount.py", str(mnt), "--cache", "always"], mnt)
    assert b"MemoryFS" in (mnt / "README").read_bytes()
    first = (mnt / "clock").read_bytes()
    deadline = time.monotonic() + 10
    while (mnt / "clock").read_bytes() == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (mnt / "clock").read_bytes() != first, "inval_inode did not reach the page cache"
    (mnt / "new").write_bytes(b"writable")
    assert (mnt / "new").read_bytes() == b"writable"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archivefs_example(kind: str, tmp_path: Path,
                           mount_process: Callable[..., Any]) -> None:
    archive = tmp_path / f"a.{kind}"
    files = {"top.txt": b"top", "dir/inner.bin": os.urandom(70_000), "dir/sub/deep": b"deep"}
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        with tarfile.open(archive, "w:gz") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o640
                t.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("link")
            link.type = tarfile.SYMTYPE
            link.linkname = "top.txt"
            t.addfile(link)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_process([PY, "examples/archivefs.py", str(archive), str(mnt)], mnt)
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data
    assert sorted(os.listdir(mnt / "dir")) == ["inner.bin", "sub"]
    if kind == "tar.gz":
        assert os.readlink(mnt / "link") == "top.txt"
        assert (mnt / "link").read_bytes() == b"top"
        assert (mnt / "top.txt").stat().st_mode & 0o777 == 0o640
    with pytest.raises(OSError) as info:
        (mnt / "top.txt").write_bytes(b"no")
    assert info.value.errno == errno.EROFS
