"""MemoryFS through the real kernel (/dev/fuse): the shared POSIX checks, and a Hypothesis
state machine that does the same random file operations on the mount and on a plain directory
and wants the same results and the same final tree."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import posix_suite
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from virtiofs.errors import FuseError
from virtiofs.server.memfs import FileData, MemoryFS

pytestmark = [pytest.mark.devfuse]


@pytest.mark.parametrize("name", list(posix_suite.CHECKS))
def test_posix_check_on_memoryfs(name: str, memfs_mount: Any) -> None:
    work = Path(memfs_mount.mountpoint) / name
    work.mkdir()
    posix_suite.CHECKS[name](str(work))


@pytest.mark.parametrize("options", [
    {"cache": "none"},
    {"cache": "always", "writeback": True},
], ids=["cache-none", "cache-always-writeback"])
def test_posix_suite_in_other_cache_modes(options: dict[str, Any],
                                          fuse_mount: Callable[..., Any]) -> None:
    m = fuse_mount(MemoryFS(**options), allow_other=True)
    posix_suite.run_all(m.mountpoint)


def test_posix_suite_without_default_permissions(fuse_mount: Callable[..., Any]) -> None:
    # The kernel then leaves every access check to MemoryFS (check_permissions=True).
    m = fuse_mount(MemoryFS(check_permissions=True), allow_other=True,
                   default_permissions=False)
    posix_suite.run_all(m.mountpoint)


def test_statfs_counts_what_is_stored(memfs_mount: Any) -> None:
    before = os.statvfs(memfs_mount.mountpoint)
    with open(os.path.join(memfs_mount.mountpoint, "big"), "wb") as f:
        f.write(b"x" * (8 << 20))
    after = os.statvfs(memfs_mount.mountpoint)
    assert before.f_bfree - after.f_bfree == (8 << 20) // after.f_frsize
    assert before.f_ffree - after.f_ffree == 1


def test_capacity_is_enforced(fuse_mount: Callable[..., Any]) -> None:
    m = fuse_mount(MemoryFS(capacity=1 << 20))
    path = os.path.join(m.mountpoint, "f")
    with pytest.raises(OSError) as info, open(path, "wb") as f:
        f.write(b"x" * (2 << 20))
        f.flush()
    assert info.value.errno == errno.ENOSPC


def test_forgotten_unlinked_inodes_are_freed(memfs_mount: Any) -> None:
    fs: MemoryFS = memfs_mount.fs
    root = memfs_mount.mountpoint
    for i in range(50):
        with open(os.path.join(root, f"f{i}"), "wb") as f:
            f.write(b"data")
        os.unlink(os.path.join(root, f"f{i}"))
    # Unlinked and closed: gone once the kernel forgets them (it may keep a few cached).
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    assert len(fs._inodes) < 10


# ------------------------------------------------------------------ FileData (no kernel)


def test_filedata_holes_and_data() -> None:
    d = FileData()
    d.write(100_000, b"abc")
    assert d.size == 100_003 and d.read(99_998, 10) == b"\0\0abc"
    assert d.next_data(0) == 65536 and d.next_hole(0) == 0
    d.truncate(1 << 40)
    assert d.next_hole(100_000) == 100_003 and d.read((1 << 40) - 2, 10) == b"\0\0"
    d.punch(65536, 1 << 20)
    assert d.read(100_000, 3) == b"\0\0\0" and not d.chunks
    with pytest.raises(FuseError) as info:
        d.next_data(0)
    assert info.value.errno == errno.ENXIO


# ---------------------------------------------------------------------- state machine

NAMES = st.sampled_from(["a", "b", "c", "d/a", "d/b", "e/f/g", "d", "e", "e/f"])
DATA = st.binary(max_size=3000)
OFFSETS = st.integers(min_value=0, max_value=200_000)


def _outcome(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", exc.errno)


def _tree(root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", st_.st_nlink)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", f.read(), st_.st_nlink, stat.S_IMODE(st_.st_mode))
    return out


class SameAsLocal(RuleBasedStateMachine):
    """Every operation runs on the mount and on a local directory: same outcome, same tree."""

    mount_root = ""

    @initialize()
    def setup(self) -> None:
        # One level down in fresh, empty parents: a symlink to "../b" then resolves to the same
        # (absent) name on both sides, whatever else lies in /tmp or beside the mount.
        self.here_parent = tempfile.mkdtemp(dir=self.mount_root)
        self.ref_parent = tempfile.mkdtemp()
        self.here = os.path.join(self.here_parent, "t")
        self.ref = os.path.join(self.ref_parent, "t")
        os.mkdir(self.here)
        os.mkdir(self.ref)

    def teardown(self) -> None:
        shutil.rmtree(self.here_parent, ignore_errors=True)
        shutil.rmtree(self.ref_parent, ignore_errors=True)

    def both(self, fn: Callable[..., Any], *names: str, extra: tuple[Any, ...] = ()) -> Any:
        a = _outcome(fn, *[os.path.join(self.here, n) for n in names], *extra)
        b = _outcome(fn, *[os.path.join(self.ref, n) for n in names], *extra)
        assert a == b, f"{fn.__name__}{names}{extra}: mount {a} local {b}"
        return a

    @rule(name=NAMES, data=DATA)
    def write_file(self, name: str, data: bytes) -> None:
        def write(path: str) -> int:
            with open(path, "wb") as f:
                return f.write(data)
        self.both(write, name)

    @rule(name=NAMES, data=DATA, offset=OFFSETS)
    def pwrite(self, name: str, data: bytes, offset: int) -> None:
        def pwrite(path: str) -> int:
            fd = os.open(path, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(pwrite, name)

    @rule(name=NAMES, size=OFFSETS)
    def truncate(self, name: str, size: int) -> None:
        self.both(os.truncate, name, extra=(size,))

    @rule(name=NAMES, offset=OFFSETS, size=st.integers(0, 70_000))
    def read(self, name: str, offset: int, size: int) -> None:
        def pread(path: str) -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        self.both(pread, name)

    @rule(name=NAMES)
    def mkdir(self, name: str) -> None:
        self.both(os.mkdir, name)

    @rule(name=NAMES)
    def rmdir(self, name: str) -> None:
        self.both(os.rmdir, name)

    @rule(name=NAMES)
    def unlink(self, name: str) -> None:
        self.both(os.unlink, name)

    @rule(old=NAMES, new=NAMES)
    def rename(self, old: str, new: str) -> None:
        self.both(os.rename, old, new)

    @rule(old=NAMES, new=NAMES)
    def link(self, old: str, new: str) -> None:
        self.both(os.link, old, new)

    @rule(name=NAMES, dest=st.sampled_from(["a", "../b", "d/a", "nowhere"]))
    def symlink(self, name: str, dest: str) -> None:
        def symlink(path: str) -> None:
            os.symlink(dest, path)
        self.both(symlink, name)

    @rule(name=NAMES, mode=st.sampled_from([0o600, 0o644, 0o755, 0o4711]))
    def chmod(self, name: str, mode: int) -> None:
        self.both(os.chmod, name, extra=(mode,))

    @rule(name=NAMES)
    def stat_(self, name: str) -> None:
        def info(path: str) -> tuple[int, int, int]:
            s = os.lstat(path)
            return (stat.S_IFMT(s.st_mode), s.st_size if not stat.S_ISDIR(s.st_mode) else 0,
                    s.st_nlink)
        self.both(info, name)

    @rule(name=st.sampled_from([".", "d", "e", "e/f", "a"]))
    def listdir(self, name: str) -> None:
        def listing(path: str) -> list[str]:
            return sorted(os.listdir(path))
        self.both(listing, name)

    @invariant()
    def same_tree(self) -> None:
        if hasattr(self, "here"):
            assert _tree(self.here) == _tree(self.ref)


def test_random_operations_match_a_local_directory(memfs_mount: Any) -> None:
    SameAsLocal.mount_root = memfs_mount.mountpoint
    SameAsLocal.TestCase.settings = settings(
        max_examples=50, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    SameAsLocal.TestCase().runTest()
