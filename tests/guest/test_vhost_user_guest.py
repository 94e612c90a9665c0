"""A real Linux guest (QEMU 7.2, TCG, Debian 6.12 kernel) mounts filesystems served by our
vhost-user back-end: the harness's file-operation suite against PassthroughFS (host tree checked
after) and a MemoryFS subclass, the device options QEMU offers, and reconnection after QEMU is
killed.

Boots are few and combined (each costs 4 s to a minute under TCG): every device option rides on
a suite run, and each run also checks what the back-end negotiated and served.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtiofs.guest import ConsoleParser, FileOpsSuite, GuestRunner
from virtiofs.server.filesystem import Context
from virtiofs.server.memfs import MemoryFS
from virtiofs.server.passthrough import PassthroughFS
from virtiofs.server.session import Session
from virtiofs.transport.vhost_user.backend import VhostUserBackend

pytestmark = pytest.mark.guest


def open_fds() -> set[int]:
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(n))
        except OSError:
            continue
        out.add(int(n))
    return out


class CountingMemoryFS(MemoryFS):
    """MemoryFS extended by subclassing, as a user would: counts creates and bytes written."""

    def __init__(self) -> None:
        super().__init__()
        self.creates = 0
        self.bytes_written = 0
        self._count_lock = threading.Lock()

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               open_flags: int) -> Any:
        result = super().create(ctx, parent, name, mode, flags, open_flags)
        with self._count_lock:
            self.creates += 1
        return result

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview,
              write_flags: int) -> int:
        n = super().write(ctx, ino, fh, offset, data, write_flags)
        with self._count_lock:
            self.bytes_written += n
        return n


Serve = Callable[..., VhostUserBackend]


@pytest.fixture
def serve(short_tmp: Path) -> Iterator[Serve]:
    """Factory: our back-end serving ``fs`` on a fresh socket, closed (socket removed) after."""
    started: list[VhostUserBackend] = []

    def start(fs: Any, **options: Any) -> VhostUserBackend:
        sock = short_tmp / f"ours{len(started)}.sock"
        backend = VhostUserBackend(lambda: Session(fs), sock, **options)
        started.append(backend)
        backend.start()
        return backend

    try:
        yield start
    finally:
        for backend in started:
            backend.close()
            assert backend.socket_path is not None and not backend.socket_path.exists()


def test_fileops_suite_on_passthroughfs_with_a_1024_entry_queue(
    guest_runner: GuestRunner, serve: Serve, short_tmp: Path
) -> None:
    """The full suite (64 MiB file, 10,000 entries, concurrent writers, xattrs), host checked."""
    shared = short_tmp / "shared"
    shared.mkdir()
    backend = serve(PassthroughFS(shared, passthrough=False))
    assert backend.socket_path is not None
    report = FileOpsSuite().run(backend.socket_path, shared_dir=shared, runner=guest_runner,
                                device_options={"queue-size": 1024}, timeout=400)
    assert report.ok, report.describe()
    assert report.host_checked
    stats = backend.history[-1]
    assert stats.event_idx and stats.indirect and not stats.packed
    assert stats.queue_sizes.get(1) == 1024
    assert stats.served.get(1, 0) > 10_000 and stats.bad_chains == 0


def test_fileops_suite_on_a_memoryfs_subclass_packed_two_request_queues(
    guest_tools: None, guest_runner: GuestRunner, serve: Serve
) -> None:
    """``packed=on`` (negotiated because we offer RING_PACKED) and ``num-request-queues=2``
    with two guest CPUs, so that the 6.12 kernel spreads requests over both queues."""
    fs = CountingMemoryFS()
    backend = serve(fs)
    assert backend.socket_path is not None
    runner = GuestRunner(guest_runner.kernel, smp=2)
    suite = FileOpsSuite(large_mib=8, many=1000, per_writer=50)
    report = suite.run(backend.socket_path, runner=runner,
                       device_options={"packed": True, "num-request-queues": 2}, timeout=300)
    assert report.ok, report.describe()
    stats = backend.history[-1]
    assert stats.packed
    assert stats.served.get(1, 0) > 0 and stats.served.get(2, 0) > 0, stats.served
    assert fs.creates >= 1000 and fs.bytes_written >= 8 << 20


def test_fileops_suite_without_event_idx_and_indirect_descriptors(
    guest_runner: GuestRunner, serve: Serve, short_tmp: Path
) -> None:
    """``event_idx=off`` (flag-based notification suppression), ``indirect_desc=off``."""
    shared = short_tmp / "shared"
    shared.mkdir()
    backend = serve(PassthroughFS(shared, passthrough=False))
    assert backend.socket_path is not None
    suite = FileOpsSuite(large_mib=8, many=1000, per_writer=50)
    report = suite.run(backend.socket_path, shared_dir=shared, runner=guest_runner,
                       device_options={"event_idx": False, "indirect_desc": False}, timeout=300)
    assert report.ok, report.describe()
    stats = backend.history[-1]
    assert not stats.event_idx and not stats.indirect and not stats.packed


_FIRST = """
mount -t virtiofs "$VIRTIOFS_TAG" /mnt || exit 3
echo first > /mnt/first.txt && sync || exit 4
echo READY-TO-DIE
sleep 600
"""
_SECOND = """
mount -t virtiofs "$VIRTIOFS_TAG" /mnt || exit 3
[ "$(cat /mnt/first.txt)" = first ] || exit 5
echo second > /mnt/second.txt || exit 6
ls /mnt
umount /mnt
"""


def _boot_until(runner: GuestRunner, script: str, sock: Path, marker: str,
                timeout: float) -> tuple[bool, list[str]]:
    """Boot ``script``, wait for ``marker`` on the console, then SIGKILL QEMU by PID."""
    argv = runner.command(runner.initramfs(script), sock)
    parser = ConsoleParser()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    seen = False
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not seen and time.monotonic() < deadline:
                if not sel.select(timeout=1.0):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                parser.feed(chunk)
                seen = marker in parser.output_lines
    finally:
        proc.kill()  # QEMU killed: the front-end vanishes mid-session
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    return seen, parser.output_lines + parser.boot_lines[-10:]


def test_reconnect_after_qemu_is_killed(guest_runner: GuestRunner, serve: Serve,
                                        short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    fds_before = open_fds()
    fs = PassthroughFS(shared, passthrough=False)
    backend = serve(fs, reconnect=True)
    sock = backend.socket_path
    assert sock is not None
    seen, lines = _boot_until(guest_runner, _FIRST, sock, "READY-TO-DIE", timeout=120)
    assert seen, lines
    deadline = time.monotonic() + 10
    while backend.device is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.device is None and backend.connections == 1
    result = guest_runner.run(_SECOND, sock, timeout=120)
    assert result.ok, result.describe()
    assert (shared / "first.txt").read_text() == "first\n"
    assert (shared / "second.txt").read_text() == "second\n"
    assert backend.connections == 2
    backend.close()
    fs.close()
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - fds_before}
    assert not leaked


def test_demo_command(guest_tools: None, guest_runner: GuestRunner) -> None:
    """``virtiofs demo`` end to end: the guest lists, reads and writes; the host sees the write."""
    import sys

    r = subprocess.run([sys.executable, "-m", "virtiofs", "demo", "--timeout", "120"],
                       capture_output=True, text=True, timeout=200,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "hello.txt" in out and "Hello from the host!" in out
    host_lines = out.split("host$ cat", 1)[1]
    assert "written by the guest" in host_lines
    guest_sha = out.split("guest$ dd", 1)[1].split("sha256 ", 1)[1][:16]
    assert f"sha256 {guest_sha}" in out.split("host$ sha256sum", 1)[1]
