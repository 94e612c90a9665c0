"""The server against hostile or unlucky situations, through the real kernel: handler bugs,
clients killed mid-request, concurrent clients, interrupts, notifications, late replies."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtiofs.errors import FuseError
from virtiofs.protocol import ROOT_ID, encode_error
from virtiofs.protocol.structs import AttrOut
from virtiofs.server.filesystem import Context
from virtiofs.server.memfs import MemoryFS

pytestmark = [pytest.mark.devfuse]


class FaultyFS(MemoryFS):
    """GETATTR of a file named 'boom*' fails in the ways a buggy handler can."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(timeout=0, **kw)
        self.faults = 0
        self.armed = False

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> AttrOut:
        names = {child: name for name, child in self.entries()}
        name = names.get(ino, b"")
        if self.armed and name.startswith(b"boom"):
            self.faults += 1
            if name == b"boom-exception":
                raise RuntimeError("a handler bug")
            if name == b"boom-errno":
                raise FuseError(4242)
            return "not an AttrOut"  # type: ignore[return-value]
        return super().getattr(ctx, ino, fh)


@pytest.mark.parametrize("name", ["boom-exception", "boom-errno", "boom-type"])
def test_a_handler_failure_is_eio_and_the_server_goes_on(name: str,
                                                         fuse_mount: Callable[..., Any],
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    fs = FaultyFS()
    m = fuse_mount(fs)
    path = Path(m.mountpoint, name)
    path.write_bytes(b"x")
    fs.armed = True
    with caplog.at_level(logging.ERROR, logger="virtiofs.session"):
        with pytest.raises(OSError) as info:
            os.stat(path)
    assert info.value.errno == errno.EIO and fs.faults >= 1
    assert caplog.records, "the failure must be logged"
    Path(m.mountpoint, "ok").write_bytes(b"fine")
    assert Path(m.mountpoint, "ok").read_bytes() == b"fine"
    assert os.stat(Path(m.mountpoint, "ok")).st_size == 4


def test_a_client_killed_mid_write_leaves_the_server_serving(
        memfs_mount: Any) -> None:
    path = os.path.join(memfs_mount.mountpoint, "big")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            block = b"z" * (1 << 20)
            for _ in range(10_000):
                os.write(fd, block)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while (not os.path.exists(path) or os.stat(path).st_size < 4 << 20) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    size = os.stat(path).st_size
    assert size >= 4 << 20
    with open(path, "rb") as f:
        assert f.read(1 << 20) == b"z" * (1 << 20)
    with open(path, "ab") as f:
        f.write(b"after")
    assert os.stat(path).st_size == size + 5
    assert memfs_mount.session.inflight == frozenset()


def test_concurrent_clients(memfs_mount: Any) -> None:
    root = memfs_mount.mountpoint
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            d = os.path.join(root, f"client{i}")
            os.mkdir(d)
            for j in range(40):
                p = os.path.join(d, f"f{j}")
                data = f"{i}-{j}".encode() * (j + 1) * 50
                with open(p, "wb") as f:
                    f.write(data)
                with open(p, "rb") as f:
                    assert f.read() == data
                os.rename(p, p + ".done")
            assert len(os.listdir(d)) == 40
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))
            os.rmdir(d)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert os.listdir(root) == []


def test_concurrent_client_processes(memfs_mount: Any) -> None:
    root = memfs_mount.mountpoint
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                for j in range(100):
                    p = os.path.join(root, f"p{i}-{j}")
                    with open(p, "wb") as f:
                        f.write(os.urandom(5000))
                    os.unlink(p)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert os.listdir(root) == []


def test_interrupted_lock_wait_is_answered(memfs_mount: Any) -> None:
    import posix_suite
    work = os.path.join(memfs_mount.mountpoint, "w")
    os.mkdir(work)
    posix_suite.CHECKS["blocked_lock_waiter_can_be_killed"](work)
    assert memfs_mount.session.inflight == frozenset()


def test_a_reply_for_a_gone_request_is_dropped_quietly(memfs_mount: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    send = memfs_mount._sender(memfs_mount._fds[0])
    with caplog.at_level(logging.WARNING, logger="virtiofs.devfuse"):
        send([encode_error(0x7FFF_FFF0, errno.EIO)])  # a unique the kernel never sent: ENOENT
    assert not caplog.records
    assert os.listdir(memfs_mount.mountpoint) == []


# --------------------------------------------------------------------------- notifications


def test_inval_inode_shows_server_side_changes(fuse_mount: Callable[..., Any]) -> None:
    fs = MemoryFS(cache="always")
    m = fuse_mount(fs)
    path = Path(m.mountpoint, "f")
    path.write_bytes(b"old contents")
    assert path.read_bytes() == b"old contents"
    ino = fs.write_file("f", b"NEW CONTENTS")
    assert path.read_bytes() == b"old contents"  # cached by the kernel (KEEP_CACHE)
    assert m.inval_inode(ino)
    assert path.read_bytes() == b"NEW CONTENTS"
    assert not m.inval_inode(987654)  # unknown to the kernel


def test_inval_entry_and_delete_drop_cached_names(fuse_mount: Callable[..., Any]) -> None:
    fs = MemoryFS(cache="always")
    m = fuse_mount(fs)
    for name in ("a", "b"):
        Path(m.mountpoint, name).write_bytes(b"x")
        os.stat(Path(m.mountpoint, name))
    ino_b = fs.resolve("b")
    for name in (b"a", b"b"):
        fs.unlink(Context(), ROOT_ID, name)
    assert os.path.exists(Path(m.mountpoint, "a"))  # the kernel still trusts its dentry
    assert m.inval_entry(ROOT_ID, b"a")
    assert not os.path.exists(Path(m.mountpoint, "a"))
    assert m.delete(ROOT_ID, ino_b, b"b")
    assert not os.path.exists(Path(m.mountpoint, "b"))
    assert not m.inval_entry(ROOT_ID, b"never-looked-up")


def test_store_and_retrieve_reach_the_page_cache(fuse_mount: Callable[..., Any]) -> None:
    fs = MemoryFS(cache="always")
    m = fuse_mount(fs)
    path = Path(m.mountpoint, "f")
    path.write_bytes(b"0123456789" * 100)
    ino = fs.resolve("f")
    assert path.read_bytes()[:10] == b"0123456789"
    assert m.retrieve(ino, 0, 1000) == b"0123456789" * 100
    assert m.retrieve(ino, 990, 100) == b"0123456789"
    assert m.store(ino, 0, b"STORED")
    assert path.read_bytes()[:12] == b"STORED678901"  # served from the page cache
    assert fs.read(Context(), ino, 0, 0, 6) == b"012345"  # the server copy is untouched
    with pytest.raises(FuseError) as info:
        m.retrieve(987654, 0, 10)
    assert info.value.errno == errno.ENOENT
