"""Loopback transport: a virtio-fs device and its driver over one memfd, minus the VM.

The driver side (our client, the guest's role) allocates guest memory (a sealed memfd), lays out
the virtqueues in it (queue 0 hiprio, 1.. request queues) and makes one kick and one call eventfd
per queue.  The device side (a FUSE server, the virtiofsd role) maps the same memfd and serves
the queues with the vhost-user back-end's :class:`~virtiofs.transport.vhost_user.worker.
QueueWorker` threads, which run ``Session.handle`` for each descriptor chain.  The two sides can
live in one process (threads) or in two: the memfd and the eventfds are inherited or passed with
``SCM_RIGHTS`` (:func:`send_setup` / :func:`recv_setup`), and nothing else is shared — exactly
what a guest and a virtiofsd share.

Typical use::

    driver = LoopbackDriver.create()                  # memfd + rings + eventfds
    with LoopbackServer(Session(MemoryFS()), driver.setup()):
        fs = Client(QueueChannel.for_driver(driver))  # virtiofs.client
        fs.listdir("/")

    # or the server in another process:
    with spawn_server(driver, ["--memfs"]):
        fs = Client(QueueChannel.for_driver(driver))

Run as a module (``python -m virtiofs.transport.loopback --setup-fd N --memfs``) it is that other
process: it receives the setup over the unix socket ``N`` and serves until the socket closes.
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import LocalProtocolError, VhostUserError
from ..virtqueue import (
    EventFd,
    GuestAllocator,
    GuestMemory,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
)
from .vhost_user.worker import QueueWorker, RequestHandler, _CallFd

__all__ = [
    "DeviceSetup",
    "DriverQueue",
    "DriverQueueEnd",
    "build_driver_queues",
    "LoopbackDriver",
    "LoopbackServer",
    "ServerProcess",
    "recv_setup",
    "send_setup",
    "spawn_server",
]

log = logging.getLogger("virtiofs.loopback")

DEFAULT_MEMORY = 64 << 20
DEFAULT_QUEUE_SIZE = 256
_SETUP_MAX = 64 * 1024
_MAX_QUEUES = 64

DriverQueue = SplitDriverQueue | PackedDriverQueue


@dataclass(eq=False)
class DriverQueueEnd:
    """One driver queue with its notification eventfds.

    ``kick`` is written by the driver to notify the device; ``call`` by the device to notify
    the driver.  ``index`` is the virtqueue index (0 = hiprio, 1.. request queues).
    """

    index: int
    queue: DriverQueue
    kick: EventFd
    call: EventFd

    @property
    def layout(self) -> SplitLayout | PackedLayout:
        return self.queue.layout

    def close(self) -> None:
        self.kick.close()
        self.call.close()


def build_driver_queues(mem: GuestMemory, allocator: GuestAllocator, count: int, size: int, *,
                        packed: bool = False, event_idx: bool = True,
                        indirect: bool = False) -> list[DriverQueueEnd]:
    """Place ``count`` rings of ``size`` entries in ``mem`` (zeroed) and give each two fresh
    eventfds (non-blocking, close-on-exec)."""
    ends = []
    for i in range(count):
        q: DriverQueue
        if packed:
            base = allocator.alloc(PackedLayout.place(0, size).end, 4096)
            q = PackedDriverQueue(mem, PackedLayout.place(base, size), allocator,
                                  event_idx=event_idx, indirect=indirect)
        else:
            base = allocator.alloc(SplitLayout.place(0, size).end, 4096)
            q = SplitDriverQueue(mem, SplitLayout.place(base, size), allocator,
                                 event_idx=event_idx, indirect=indirect)
        ends.append(DriverQueueEnd(i, q, EventFd(), EventFd()))
    return ends


@dataclass
class DeviceSetup:
    """What the device side needs to serve a driver's queues.

    ``layouts`` are ``(size, desc, avail_or_driver_event, used_or_device_event)`` guest
    addresses per queue; ``memory_fd``, ``kick_fds`` and ``call_fds`` are file descriptors (the
    receiver of :func:`recv_setup` owns them; the :class:`LoopbackDriver` owns its own).
    """

    memory_fd: int
    memory_size: int
    packed: bool
    event_idx: bool
    indirect: bool
    layouts: list[tuple[int, int, int, int]]
    kick_fds: list[int]
    call_fds: list[int]

    def fds(self) -> list[int]:
        return [self.memory_fd, *self.kick_fds, *self.call_fds]

    def describe(self) -> dict[str, Any]:
        """The JSON-able part (everything but the fds)."""
        return {"memory_size": self.memory_size, "packed": self.packed,
                "event_idx": self.event_idx, "indirect": self.indirect,
                "layouts": [list(x) for x in self.layouts]}

    def close(self) -> None:
        """Close every fd (for a setup received from a peer)."""
        for fd in self.fds():
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.memory_fd = -1
        self.kick_fds = [-1] * len(self.kick_fds)
        self.call_fds = [-1] * len(self.call_fds)


class LoopbackDriver:
    """The driver (guest) side: guest memory, rings and eventfds, and channels over them."""

    def __init__(self, mem: GuestMemory, allocator: GuestAllocator,
                 queues: list[DriverQueueEnd], *, packed: bool, event_idx: bool,
                 indirect: bool) -> None:
        self.mem = mem
        self.allocator = allocator
        self.queues = queues
        self.packed = packed
        self.event_idx = event_idx
        self.indirect = indirect

    @classmethod
    def create(cls, *, memory_size: int = DEFAULT_MEMORY, queue_size: int = DEFAULT_QUEUE_SIZE,
               num_request_queues: int = 1, packed: bool = False, event_idx: bool = True,
               indirect: bool = False) -> LoopbackDriver:
        """Allocate ``memory_size`` bytes of guest memory and ``1 + num_request_queues``
        queues of ``queue_size`` entries."""
        if not 1 <= num_request_queues < _MAX_QUEUES:
            raise LocalProtocolError(f"{num_request_queues} request queues")
        mem = GuestMemory.allocate(memory_size, name="virtiofs-loopback")
        alloc = GuestAllocator(mem, 0, memory_size)
        queues = build_driver_queues(mem, alloc, 1 + num_request_queues, queue_size,
                                     packed=packed, event_idx=event_idx, indirect=indirect)
        return cls(mem, alloc, queues, packed=packed, event_idx=event_idx, indirect=indirect)

    def setup(self) -> DeviceSetup:
        """The device's view of this driver (the fds stay owned by the driver)."""
        layouts = [tuple(int(x) for x in q.layout) for q in self.queues]
        return DeviceSetup(self.mem.fd, self.mem.size, self.packed, self.event_idx,
                           self.indirect, layouts,  # type: ignore[arg-type]
                           [q.kick.fileno() for q in self.queues],
                           [q.call.fileno() for q in self.queues])

    def close(self) -> None:
        for q in self.queues:
            q.close()
        self.mem.close()

    def __enter__(self) -> LoopbackDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoopbackServer:
    """The device side: serves a driver's queues with ``handler`` (a ``Session``).

    One :class:`QueueWorker` thread per queue (queue 0 restricted to hiprio opcodes); with
    ``workers > 0`` requests run on a thread pool of that size. The setup's fds are borrowed:
    the memory is mapped through a duplicate, the eventfds are duplicated for the workers.
    """

    def __init__(self, handler: RequestHandler, setup: DeviceSetup, *, workers: int = 0) -> None:
        self.handler = handler
        self.setup = setup
        self.mem = GuestMemory.from_fd(setup.memory_fd, setup.memory_size)
        self.pool: Executor | None = ThreadPoolExecutor(workers, "virtiofs-loopback") \
            if workers else None
        self.workers: list[QueueWorker] = []
        self._kicks: list[int] = []
        self._started = False
        try:
            for i, lay in enumerate(setup.layouts):
                q: SplitDeviceQueue | PackedDeviceQueue
                if setup.packed:
                    q = PackedDeviceQueue(self.mem, PackedLayout(*lay), event_idx=setup.event_idx,
                                          indirect=setup.indirect)
                else:
                    q = SplitDeviceQueue(self.mem, SplitLayout(*lay), event_idx=setup.event_idx,
                                         indirect=setup.indirect)
                calls = _CallFd()
                calls.replace("call", os.dup(setup.call_fds[i]))
                kick = os.dup(setup.kick_fds[i])
                self._kicks.append(kick)
                self.workers.append(QueueWorker(i, q, kick, calls, handler, hiprio=i == 0,
                                                pool=self.pool))
        except BaseException:
            self._release()
            raise

    def start(self) -> LoopbackServer:
        if not self._started:
            self._started = True
            for w in self.workers:
                w.start()
        return self

    def stop(self) -> None:
        """Stop every worker (finishing the request at hand) and unmap the memory."""
        for w in self.workers:
            if self._started:
                w.stop()
        self._release()

    def _release(self) -> None:
        for w in self.workers:
            w.calls.close()
        self.workers = []
        for fd in self._kicks:
            os.close(fd)
        self._kicks = []
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.mem.close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- passing a setup to another process ----------------------------------------------------

def send_setup(sock: socket.socket, setup: DeviceSetup) -> None:
    """Send a setup over a unix socket: a length-prefixed JSON record, the fds in SCM_RIGHTS."""
    body = json.dumps(setup.describe()).encode()
    fds = setup.fds()
    head = len(body).to_bytes(4, "little") + len(fds).to_bytes(4, "little")
    sock.sendmsg([head + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", fds).tobytes())])


def recv_setup(sock: socket.socket, timeout: float = 10.0) -> DeviceSetup:
    """Receive what :func:`send_setup` sent; the caller owns the fds. Raises
    ``VhostUserError`` (a ``ProtocolError``) on anything malformed, closing every fd."""
    sock.settimeout(timeout)
    fds: list[int] = []
    anc_size = socket.CMSG_SPACE(4 * (1 + 2 * _MAX_QUEUES))
    try:
        data, anc, flags, _ = sock.recvmsg(8 + _SETUP_MAX, anc_size, socket.MSG_CMSG_CLOEXEC)
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise VhostUserError("loopback setup truncated")
        if len(data) < 8:
            raise VhostUserError("loopback setup shorter than its header")
        n = int.from_bytes(data[:4], "little")
        nfds = int.from_bytes(data[4:8], "little")
        body = data[8:]
        while len(body) < n:
            more = sock.recv(n - len(body))
            if not more:
                raise VhostUserError("loopback setup cut short")
            body += more
        desc = json.loads(body)
        layouts = [tuple(int(v) for v in x) for x in desc["layouts"]]
        nq = len(layouts)
        if not 2 <= nq <= _MAX_QUEUES or any(len(x) != 4 for x in layouts) or \
                nfds != len(fds) or nfds != 1 + 2 * nq:
            raise VhostUserError(f"loopback setup with {nq} queues and {len(fds)} fds")
        setup = DeviceSetup(fds[0], int(desc["memory_size"]), bool(desc["packed"]),
                            bool(desc["event_idx"]), bool(desc["indirect"]),
                            layouts,  # type: ignore[arg-type]
                            fds[1:1 + nq], fds[1 + nq:])
        fds = []
        return setup
    except (ValueError, KeyError, TypeError) as e:
        raise VhostUserError(f"malformed loopback setup: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)


# -- a server in another process -----------------------------------------------------------

class ServerProcess:
    """A loopback server running in a child process (see :func:`spawn_server`)."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int:
        """Close the control socket (the child stops serving and exits); kill it by pid if it
        does not exit in ``timeout`` seconds. Returns its exit status."""
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_server(driver: LoopbackDriver, fs: Sequence[str], *, workers: int = 0,
                 taskset: str | None = None) -> ServerProcess:
    """Start ``python -m virtiofs.transport.loopback`` serving ``driver``'s queues.

    ``fs`` is the filesystem argument list (``["--memfs"]`` or ``["--passthrough", DIR]``).
    The setup travels over a socketpair with SCM_RIGHTS; the child's only inherited fd is its
    end of that socketpair. ``taskset`` pins the child (e.g. ``"0"``) for benchmarks.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        cmd = [sys.executable, "-m", "virtiofs.transport.loopback",
               "--setup-fd", str(child.fileno()), "--workers", str(workers), *fs]
        if taskset is not None:
            cmd = ["taskset", "-c", taskset, *cmd]
        proc = subprocess.Popen(cmd, pass_fds=[child.fileno()])
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    try:
        send_setup(parent, driver.setup())
        parent.settimeout(30.0)
        ready = parent.recv(1)
        if ready != b"R":
            raise LocalProtocolError("loopback server process did not start")
        parent.settimeout(None)
    except BaseException:
        parent.close()
        proc.kill()
        proc.wait()
        raise
    return ServerProcess(proc, parent)


def _make_fs(args: argparse.Namespace) -> Any:
    if args.passthrough:
        from ..server.passthrough import PassthroughFS
        return PassthroughFS(args.passthrough)
    from ..server.memfs import MemoryFS
    return MemoryFS()


def main(argv: Sequence[str] | None = None) -> int:
    """Child-process entry point: serve one driver until the control socket closes."""
    p = argparse.ArgumentParser(prog="python -m virtiofs.transport.loopback")
    p.add_argument("--setup-fd", type=int, required=True)
    p.add_argument("--workers", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--memfs", action="store_true")
    g.add_argument("--passthrough", metavar="DIR")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from ..server.session import Session
    sock = socket.socket(fileno=args.setup_fd)
    setup = recv_setup(sock)
    session = Session(_make_fs(args))
    try:
        with LoopbackServer(session, setup, workers=args.workers):
            sock.sendall(b"R")
            sock.settimeout(None)
            while sock.recv(64):
                pass
    finally:
        session.close()
        setup.close()
        sock.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
