"""Client ↔ MemoryFS and PassthroughFS over the loopback transport, server in another process.

The server process maps the client's memfd and serves its virtqueues (received over a unix
socket with SCM_RIGHTS), exactly as a virtiofsd serves a guest. Every check of the conformance
suite (:mod:`virtiofs.client.conformance`) must pass on both filesystems, with split rings and
with packed rings + indirect descriptors.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofs.client import Client
from virtiofs.client.conformance import CHECKS, POSIX_ONLY, run_check
from virtiofs.client.queue_channel import QueueChannel
from virtiofs.protocol import Opcode
from virtiofs.transport.loopback import (
    LoopbackDriver,
    LoopbackServer,
    recv_setup,
    send_setup,
    spawn_server,
)

VARIANTS = {
    "memfs-split": (["--memfs"], {}),
    "passthrough-split": (["--passthrough"], {}),
    "memfs-packed-indirect": (["--memfs"], {"packed": True, "indirect": True}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def remote(request: pytest.FixtureRequest) -> Iterator[tuple[str, Client, str | None]]:
    fs_args, opts = VARIANTS[request.param]
    tmp = None
    if fs_args == ["--passthrough"]:
        tmp = tempfile.mkdtemp(prefix="virtiofs-lb-")
        fs_args = ["--passthrough", tmp]
    driver = LoopbackDriver.create(memory_size=32 << 20, **opts)
    try:
        with spawn_server(driver, fs_args) as proc:
            client = Client(QueueChannel.for_driver(driver), cache="auto", timeout=30)
            try:
                yield request.param, client, tmp
                client.close()
            finally:
                assert proc.stop() == 0
    finally:
        driver.close()
        if tmp is not None:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(remote: tuple[str, Client, str | None], check: str) -> None:
    _, client, _ = remote
    r = run_check(client, check)
    if r.status == "skip":
        pytest.skip(r.detail)
    assert r.status == "pass", f"{r.status}: {r.detail}"


def test_conformance_mirrors_the_posix_suite() -> None:
    """Every check of tests/posix_suite.py (run through /dev/fuse and in guests) has a
    client-API twin of the same name here, or a stated reason why it cannot."""
    import posix_suite
    missing = [n for n in posix_suite.CHECKS if n not in CHECKS and n not in POSIX_ONLY]
    assert not missing
    assert not set(POSIX_ONLY) & set(CHECKS)
    assert set(POSIX_ONLY) <= set(posix_suite.CHECKS)


def test_passthrough_data_lands_in_the_host_directory(
        remote: tuple[str, Client, str | None]) -> None:
    name, client, tmp = remote
    if tmp is None:
        pytest.skip("memfs")
    with client.open("/hostfile", "w") as f:
        f.write(b"through the queues")
    assert Path(tmp, "hostfile").read_bytes() == b"through the queues"
    Path(tmp, "from-host").write_bytes(b"host side")
    with client.open("/from-host") as f:
        assert f.read() == b"host side"


def test_server_in_another_process_owns_no_client_memory() -> None:
    """The only link is the memfd + eventfds: the child's pid differs and its maps show the
    memfd, which it got through SCM_RIGHTS."""
    driver = LoopbackDriver.create(memory_size=4 << 20)
    with driver, spawn_server(driver, ["--memfs"]) as proc:
        assert proc.pid != os.getpid()
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "virtiofs-loopback" in maps
        c = Client(QueueChannel.for_driver(driver))
        c.mkdir("/x")
        assert c.listdir("/") == ["x"]
        c.close()


def test_setup_passes_over_scm_rights_within_a_process() -> None:
    import socket

    from virtiofs.server.memfs import MemoryFS
    from virtiofs.server.session import Session

    driver = LoopbackDriver.create(memory_size=4 << 20, num_request_queues=2)
    a, b = socket.socketpair()
    with driver, a, b:
        send_setup(a, driver.setup())
        setup = recv_setup(b)
        try:
            assert setup.memory_fd not in driver.setup().fds()  # a received copy
            with LoopbackServer(Session(MemoryFS()), setup):
                c = Client(QueueChannel.for_driver(driver))
                with c.open("/f", "w") as f:
                    f.write(b"x" * 5000)
                assert c.stat("/f").st_size == 5000
                c.close()
        finally:
            setup.close()


def test_one_mib_read_lands_in_the_driver_buffer() -> None:
    from virtiofs.server.memfs import MemoryFS
    from virtiofs.server.session import Session

    driver = LoopbackDriver.create(memory_size=16 << 20)
    with driver, LoopbackServer(Session(MemoryFS()), driver.setup()):
        c = Client(QueueChannel.for_driver(driver), cache="none")
        data = os.urandom(1 << 20)
        with c.open("/big", "w") as f:
            f.write(data)
        buf = bytearray(1 << 20)
        with c.open("/big") as f:
            assert f.readinto(buf) == len(data)
        assert buf == data
        assert c.stats[Opcode.READ] == 1  # one 1 MiB READ (max_pages 256)
        c.close()


def test_many_requests_in_flight_past_the_ring_size() -> None:
    """request_many with more requests than ring entries: the channel waits for room."""
    from virtiofs.protocol.structs import GetattrIn
    from virtiofs.server.memfs import MemoryFS
    from virtiofs.server.session import Session

    driver = LoopbackDriver.create(memory_size=4 << 20, queue_size=8)
    with driver, LoopbackServer(Session(MemoryFS()), driver.setup()):
        c = Client(QueueChannel.for_driver(driver), cache="none")
        plan = c._plan(Opcode.GETATTR)
        reqs = [(plan.encode(next(c._unique), 1, GetattrIn(), (), b"", 0, 0, 1),
                 plan.reply_size) for _ in range(40)]
        replies = c.channel.request_many(reqs, timeout=10)
        assert len(replies) == 40
        for rb in replies:
            assert not isinstance(rb, Exception), rb
            err, attr = plan.decode(rb.view)
            rb.release()
            assert err == 0 and attr.attr.ino == 1
        c.close()


_HAMMER = """
import mmap, os, sys
from virtiofs.virtqueue.ring import store_u16
fd = int(sys.argv[1])
view = memoryview(mmap.mmap(fd, 4096))
for i in range(int(sys.argv[2])):
    store_u16(view, 2, 0x00FF + (i & 1))  # 0x00FF <-> 0x0100: every byte changes
"""


def test_ring_index_stores_are_never_seen_torn_across_processes() -> None:
    """A ring index written by one process and polled by another is never read as a value it
    never held (``struct.pack_into`` zeroes before it writes: the loopback driver read
    used.idx == 0 and broke its queue every few thousand requests before ring.store_u16)."""
    import mmap
    import struct
    import subprocess
    import sys

    fd = os.memfd_create("virtiofs-tear", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        view = memoryview(mmap.mmap(fd, 4096))
        struct.pack_into("<H", view, 2, 0x00FF)
        proc = subprocess.Popen([sys.executable, "-c", _HAMMER, str(fd), "300000"],
                                pass_fds=[fd])
        seen = set()
        try:
            while proc.poll() is None:
                seen.add(struct.unpack_from("<H", view, 2)[0])
        finally:
            proc.wait(60)
        assert proc.returncode == 0
        assert seen <= {0x00FF, 0x0100}, sorted(seen)[:5]
        view.release()
    finally:
        os.close(fd)
