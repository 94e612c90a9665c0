"""The vhost-user-fs back-end driven by a front-end written in the test (QEMU 7.2's sequence).

The rings live in a memfd shared with the back-end exactly as with QEMU (regions announced with
a front-end virtual address, vring addresses in that space, eventfds for kick and call), and the
back-end serves a real FUSE ``Session``.
"""

from __future__ import annotations

import gc
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _vhost_user_frontend import (
    OUT_HEADER,
    UADDR_BASE,
    Frontend,
    fuse_request,
    init_request,
)

from virtiofs.errors import FuseError
from virtiofs.protocol.structs import Attr, AttrOut
from virtiofs.server.filesystem import Context, Filesystem
from virtiofs.server.session import Session
from virtiofs.transport.vhost_user.backend import DEFAULT_FEATURES, VhostUserBackend
from virtiofs.transport.vhost_user.messages import (
    FrontendReq,
    MemoryRegionDesc,
    ProtocolFeature,
    VirtioFeature,
    decode_config,
    decode_virtio_fs_config,
    encode_config,
    encode_single_region,
    encode_u64,
    encode_vring_state,
)

GETATTR, FORGET, BATCH_FORGET, INIT = 3, 2, 42, 26


class RootFS(Filesystem):
    """Just a root directory; GETATTR of anything else is ENOENT. Records forgets."""

    def __init__(self) -> None:
        self.forgotten: list[tuple[int, int]] = []
        self.destroyed = 0
        self.slow = threading.Event()

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> AttrOut:
        if ino != 1:
            raise FuseError(2)
        return AttrOut(1, 0, 0, Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2))

    def forget(self, items: Any) -> None:
        self.forgotten.extend(items)

    def destroy(self) -> None:
        self.destroyed += 1


def open_fds() -> set[int]:
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(n))
        except OSError:
            continue
        out.add(int(n))
    return out


def guest_mappings() -> int:
    """Mappings of guest memory (memfds named virtiofs-guest) in this process."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:virtiofs-guest" in line)


class Served:
    def __init__(self, tmp: Path, **options: Any) -> None:
        self.fs = RootFS()
        self.path = tmp / "vhost.sock"
        self.backend = VhostUserBackend(lambda: Session(self.fs), self.path, **options)
        self.thread = self.backend.start()

    def connect(self, **kw: Any) -> Frontend:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.path))
        return Frontend(s, **kw)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    srv = Served(tmp_path)
    try:
        yield srv
    finally:
        srv.backend.close()
    assert not srv.path.exists()


def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def out_header(data: bytes) -> tuple[int, int, int]:
    return OUT_HEADER.unpack_from(data)  # type: ignore[return-value]


def do_init(fe: Frontend, q: int = 1) -> None:
    reply = fe.fuse(q, init_request(unique=1), 4096)
    length, error, unique = out_header(reply)
    assert (error, unique) == (0, 1) and length == len(reply)


# -- handshake ------------------------------------------------------------------------------

def test_handshake_offers_what_qemu_needs(served: Served) -> None:
    fe = served.connect()
    try:
        features, proto = fe.handshake()
        for bit in (VirtioFeature.VERSION_1, VirtioFeature.EVENT_IDX, VirtioFeature.INDIRECT_DESC,
                    VirtioFeature.RING_PACKED, VirtioFeature.PROTOCOL_FEATURES):
            assert features >> bit & 1, bit
        for pbit in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ,
                     ProtocolFeature.BACKEND_SEND_FD, ProtocolFeature.CONFIGURE_MEM_SLOTS):
            assert proto >> pbit & 1, pbit
        assert fe.nqueues >= 2
        assert fe.get_u64(FrontendReq.GET_MAX_MEM_SLOTS) == 32
        dev = served.backend.device
        assert dev is not None and dev.backend_channel is not None and dev.memory is not None
    finally:
        fe.close()


def test_need_reply_gets_a_reply_ack_and_refusals_are_nonzero(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        assert fe.ack(FrontendReq.SET_VRING_NUM, encode_vring_state(1, 64)) == 0
        assert fe.ack(FrontendReq.SET_VRING_NUM, encode_vring_state(1, 0)) != 0
        assert fe.ack(FrontendReq.SET_VRING_NUM, encode_vring_state(200, 64)) != 0
        assert fe.ack(FrontendReq.SET_FEATURES, encode_u64(1 << 63)) != 0  # never offered
        # SET_CONFIG: the virtio-fs config space is read-only for the driver.
        assert fe.ack(FrontendReq.SET_CONFIG, encode_config(0, b"\0" * 4)) != 0
        # A region whose fd is a pipe, and one larger than its memfd.
        r, w = os.pipe()
        try:
            reg = MemoryRegionDesc(1 << 30, 4096, UADDR_BASE + (1 << 30), 0)
            assert fe.ack(FrontendReq.ADD_MEM_REG, encode_single_region(reg), fds=(r,)) != 0
        finally:
            os.close(r)
            os.close(w)
        big = MemoryRegionDesc(1 << 30, 1 << 30, UADDR_BASE + (1 << 30), 0)
        assert fe.ack(FrontendReq.ADD_MEM_REG, encode_single_region(big), fds=(fe.mem.fd,)) != 0
        # Overlapping the region already there.
        dup = MemoryRegionDesc(4096, 4096, UADDR_BASE + (2 << 30), 0)
        assert fe.ack(FrontendReq.ADD_MEM_REG, encode_single_region(dup), fds=(fe.mem.fd,)) != 0
        # The connection is still fine.
        assert fe.get_u64(FrontendReq.GET_QUEUE_NUM) == fe.nqueues
    finally:
        fe.close()


def test_vring_call_fd_that_is_not_an_eventfd_is_refused(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        r, w = os.pipe()
        try:
            assert fe.ack(FrontendReq.SET_VRING_CALL, encode_u64(1), fds=(w,)) != 0
        finally:
            os.close(r)
            os.close(w)
    finally:
        fe.close()


def test_get_config_with_a_tag(tmp_path: Path) -> None:
    srv = Served(tmp_path, tag="myfs", num_request_queues=2)
    fe = srv.connect()
    try:
        fe.handshake()
        proto = fe.get_u64(FrontendReq.GET_PROTOCOL_FEATURES)
        assert proto >> ProtocolFeature.CONFIG & 1
        reply = fe.call(FrontendReq.GET_CONFIG, encode_config(0, b"\0" * 40))
        cfg = decode_config(reply.payload)
        assert decode_virtio_fs_config(cfg.data) == ("myfs", 2)
    finally:
        fe.close()
        srv.backend.close()


# -- requests over the rings ----------------------------------------------------------------

@pytest.mark.parametrize(("packed", "event_idx", "indirect"), [
    (False, True, True), (False, False, False), (True, True, True), (True, False, False),
])
def test_fuse_requests_over_the_rings(served: Served, packed: bool, event_idx: bool,
                                      indirect: bool) -> None:
    fe = served.connect()
    try:
        fe.handshake(packed=packed, event_idx=event_idx, indirect=indirect)
        fe.setup_queue(0)
        fe.setup_queue(1)
        do_init(fe)
        for i in range(300):  # > 2 x queue size: wraps the ring (and packed wrap counters)
            reply = fe.fuse(1, fuse_request(GETATTR, 100 + i, b"\0" * 16), 256)
            length, error, unique = out_header(reply)
            assert (length, error, unique) == (len(reply), 0, 100 + i) and length == 16 + 104
        # Used length == bytes written == out_header.len for an error reply too.
        reply = fe.fuse(1, fuse_request(GETATTR, 999, b"\0" * 16, nodeid=7), 256)
        assert out_header(reply) == (16, -2, 999) and len(reply) == 16
        base = fe.stop_queue(1)
        if packed:
            # 302 chains of 2 descriptors each: 604 slots, 9 wraps of a 64-slot ring.
            assert base == (604 % 64) | (0 << 15) | (604 % 64) << 16 | (0 << 31)
        else:
            assert base == 302  # INIT + 300 GETATTR + 1: the next avail index
    finally:
        fe.close()


def test_set_mem_table_with_two_regions_and_buffers_across_them(served: Served) -> None:
    """Without CONFIGURE_MEM_SLOTS QEMU sends the whole table at once; a buffer straddling two
    adjacent regions is served as one byte stream."""
    fe = served.connect()
    try:
        fe.handshake(mem_table=True)
        dev = served.backend.device
        assert dev is not None and dev.memory is not None and len(dev.memory.regions) == 2
        fe.setup_queue(0)
        q = fe.setup_queue(1)
        do_init(fe)
        half = fe.mem.size // 2
        from virtiofs.virtqueue import Buffer

        req = fuse_request(GETATTR, 9, b"\0" * 16)
        fe.mem.write(half - 20, req)  # the request straddles the region boundary
        q.add([Buffer(half - 20, len(req))], [256])
        os.eventfd_write(fe.kicks[1], 1)
        (c,) = fe.wait(1)
        assert out_header(c.data) == (120, 0, 9)
    finally:
        fe.close()


def test_reset_device_then_set_up_again(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        fe.setup_queue(1)
        do_init(fe)
        assert fe.ack(FrontendReq.RESET_DEVICE) == 0
        dev = served.backend.device
        assert dev is not None and dev.running_queues == []
        # As after a guest reboot: features again, rings from scratch, a new INIT.
        fe.send(FrontendReq.SET_FEATURES, encode_u64(dev.features & ~(1 << VirtioFeature.RING_PACKED)))
        for i in (0, 1):
            os.close(fe.kicks.pop(i))
            os.close(fe.calls.pop(i))
        fe.setup_queue(0)
        fe.setup_queue(1)
        # The rebooted driver's INIT ends the old FUSE session and starts a new one.
        reply = fe.fuse(1, init_request(unique=30), 4096)
        assert out_header(reply)[1:] == (0, 30)
        assert served.fs.destroyed == 1
        reply = fe.fuse(1, fuse_request(GETATTR, 31, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 31)
    finally:
        fe.close()


def test_request_split_across_many_descriptors(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake(indirect=True)
        fe.setup_queue(0)
        q = fe.setup_queue(1)
        do_init(fe)
        req = fuse_request(GETATTR, 5, b"\0" * 16)
        # Byte-by-byte readable descriptors, reply scattered over small writable ones (Linux
        # splits in_header / args / pages: never assume one descriptor per struct).
        parts = [req[i:i + 7] for i in range(0, len(req), 7)]
        q.add(parts, [3, 13, 50, 100], indirect=True)
        if q.needs_kick():
            os.eventfd_write(fe.kicks[1], 1)
        (c,) = fe.wait(1)
        assert out_header(c.data) == (120, 0, 5) and c.length == 120
    finally:
        fe.close()


def test_hiprio_forget_gets_no_reply_and_other_opcodes_are_refused(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        fe.setup_queue(1)
        do_init(fe)
        # FORGET alone as Linux sends it: one readable descriptor, no writable part.
        fe.submit(0, fuse_request(FORGET, 50, struct.pack("<Q", 3), nodeid=9), 0)
        (c,) = fe.wait(0)
        assert c.length == 0
        batch = struct.pack("<II", 2, 0) + struct.pack("<QQ", 10, 1) + struct.pack("<QQ", 11, 2)
        fe.submit(0, fuse_request(BATCH_FORGET, 51, batch), 0)
        (c,) = fe.wait(0)
        assert c.length == 0
        assert wait_for(lambda: (9, 3) in served.fs.forgotten and (11, 2) in served.fs.forgotten)
        # INIT (or any other request) on hiprio: -EINVAL, never reaching the session.
        reply = fe.fuse(0, init_request(unique=52), 64)
        assert out_header(reply) == (16, -22, 52)
        reply = fe.fuse(0, fuse_request(GETATTR, 53, b"\0" * 16), 64)
        assert out_header(reply) == (16, -22, 53)
        # The session still has its first INIT: a request queue serves normally.
        reply = fe.fuse(1, fuse_request(GETATTR, 54, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 54)
    finally:
        fe.close()


def test_multiple_request_queues_each_have_a_worker(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        for i in (1, 2, 3):
            fe.setup_queue(i)
        do_init(fe, 2)
        dev = served.backend.device
        assert dev is not None and wait_for(lambda: dev.running_queues == [0, 1, 2, 3])
        for round_ in range(20):
            for qi in (1, 2, 3):
                fe.submit(qi, fuse_request(GETATTR, 1000 * qi + round_, b"\0" * 16), 256)
        for qi in (1, 2, 3):
            done = fe.wait(qi, 20)
            assert sorted(out_header(c.data)[2] for c in done) == [1000 * qi + r for r in range(20)]
    finally:
        fe.close()


# -- hostile rings --------------------------------------------------------------------------

def test_bad_chain_is_returned_with_len_0_and_the_queue_goes_on(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        q = fe.setup_queue(1)
        do_init(fe)
        # A descriptor pointing past the end of guest memory (rewritten after the driver
        # queued it: the driver-side queue refuses to build one).
        head = q.add([b"x" * 64], [64])
        struct.pack_into("<Q", fe.mem.translate(q.layout.desc + 16 * head, 8), 0,
                         fe.mem.size - 8)
        os.eventfd_write(fe.kicks[1], 1)
        (c,) = fe.wait(1)
        assert c.length == 0
        # A request whose in_header.len lies (larger than what is readable): answered EIO.
        bad = bytearray(fuse_request(GETATTR, 77, b"\0" * 16))
        struct.pack_into("<I", bad, 0, 4000)
        reply = fe.fuse(1, bytes(bad), 64)
        assert out_header(reply) == (16, -5, 77)
        # Readable part shorter than a header, nothing writable.
        fe.submit(1, b"\x01\x02", 0)
        (c,) = fe.wait(1)
        assert c.length == 0
        # A reply that does not fit the writable part: -EIO rather than a truncated reply.
        reply = fe.fuse(1, fuse_request(GETATTR, 78, b"\0" * 16), 40)
        assert out_header(reply) == (16, -5, 78)
        # Still serving.
        reply = fe.fuse(1, fuse_request(GETATTR, 79, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 79)
    finally:
        fe.close()


def test_broken_ring_stops_its_queue_signals_err_and_others_go_on(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        q1 = fe.setup_queue(1)
        fe.setup_queue(2)
        err = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            assert fe.ack(FrontendReq.SET_VRING_ERR, encode_u64(1), fds=(err,)) == 0
            do_init(fe, 2)
            # The avail index jumps far ahead of what the ring holds: ring-level corruption.
            struct.pack_into("<H", fe.mem.translate(q1.layout.avail + 2, 2), 0, 1000)
            os.eventfd_write(fe.kicks[1], 1)
            assert wait_for(lambda: _readable(err))
            dev = served.backend.device
            assert dev is not None and wait_for(lambda: 1 not in dev.running_queues)
            # Kicking the broken queue again does nothing (no crash, no processing) ...
            os.eventfd_write(fe.kicks[1], 1)
            # ... and the other request queue goes on.
            reply = fe.fuse(2, fuse_request(GETATTR, 5, b"\0" * 16), 256)
            assert out_header(reply)[1:] == (0, 5)
            assert dev.running_queues == [0, 2]
        finally:
            os.close(err)
    finally:
        fe.close()


def _readable(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


# -- lifecycle ------------------------------------------------------------------------------

def test_memory_added_while_rings_run(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        fe.setup_queue(1)
        do_init(fe)
        extra = os.memfd_create("extra")
        try:
            os.ftruncate(extra, 1 << 20)
            reg = MemoryRegionDesc(1 << 32, 1 << 20, UADDR_BASE + (1 << 32), 0)
            assert fe.ack(FrontendReq.ADD_MEM_REG, encode_single_region(reg), fds=(extra,)) == 0
        finally:
            os.close(extra)
        reply = fe.fuse(1, fuse_request(GETATTR, 5, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 5)
        assert fe.ack(FrontendReq.REM_MEM_REG, encode_single_region(reg)) == 0
        reply = fe.fuse(1, fuse_request(GETATTR, 6, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 6)
    finally:
        fe.close()


def test_restart_after_get_vring_base_resumes_at_the_base(served: Served) -> None:
    fe = served.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        q = fe.setup_queue(1)
        do_init(fe)
        for i in range(5):
            fe.fuse(1, fuse_request(GETATTR, 10 + i, b"\0" * 16), 256)
        base = fe.stop_queue(1)
        assert base == 6
        # Restart as QEMU does after a stop: NUM, BASE, ADDR, KICK, ENABLE with the same ring.
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        fe.send(FrontendReq.SET_VRING_BASE, encode_vring_state(1, base))
        os.close(fe.kicks[1])
        fe.kicks[1] = kick
        fe.send(FrontendReq.SET_VRING_KICK, encode_u64(1), fds=(kick,))
        fe.send(FrontendReq.SET_VRING_ENABLE, encode_vring_state(1, 1))
        assert q is fe.queues[1]
        reply = fe.fuse(1, fuse_request(GETATTR, 20, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 20)
    finally:
        fe.close()


def test_disconnect_leaks_no_fd_or_mapping_and_reconnect_serves_the_next(tmp_path: Path) -> None:
    gc.collect()
    before_fds = open_fds()
    before_maps = guest_mappings()
    srv = Served(tmp_path, reconnect=True)
    try:
        for round_ in range(3):
            fe = srv.connect()
            fe.handshake(packed=round_ == 1)
            fe.setup_queue(0)
            fe.setup_queue(1)
            do_init(fe)
            reply = fe.fuse(1, fuse_request(GETATTR, 3, b"\0" * 16), 256)
            assert out_header(reply)[1:] == (0, 3)
            fe.close()  # the front-end goes away with rings running (QEMU killed)
            assert wait_for(lambda: srv.backend.device is None)
            assert wait_for(lambda r=round_: srv.fs.destroyed == r + 1)
        assert srv.backend.connections == 3
        assert wait_for(lambda: not [t for t in threading.enumerate()
                                     if t.name.startswith("virtiofs-vq")])
    finally:
        srv.backend.close()
    srv.thread.join(5)
    assert not srv.thread.is_alive()
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before_fds}
    assert not leaked
    assert guest_mappings() == before_maps  # no gc.collect(): unmapped at once, not later


def test_without_reconnect_serving_ends_with_the_front_end(tmp_path: Path) -> None:
    srv = Served(tmp_path)
    fe = srv.connect()
    fe.handshake()
    fe.close()
    srv.thread.join(5)
    assert not srv.thread.is_alive()
    srv.backend.close()
    assert not srv.path.exists()


def test_close_from_another_thread_while_connected(tmp_path: Path) -> None:
    srv = Served(tmp_path)
    fe = srv.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        fe.setup_queue(1)
        do_init(fe)
        t0 = time.monotonic()
        srv.backend.close()
        assert time.monotonic() - t0 < 5
        assert not srv.thread.is_alive() and not srv.path.exists()
        assert fe.chan.recv(timeout=2) is None  # the back-end hung up
    finally:
        fe.close()


@pytest.mark.parametrize("garbage", [
    struct.pack("=III", 1, 0x41, 0),            # reserved flag
    struct.pack("=III", 1, 0x2, 0),             # version 2
    struct.pack("=III", 999, 0x1, 0),           # unknown request
    struct.pack("=III", 1, 0x1, 0x2000),        # oversized
    struct.pack("=III", FrontendReq.GET_VRING_BASE, 0x1, 8) + encode_vring_state(99, 0),
])
def test_malformed_messages_end_the_connection_not_the_backend(tmp_path: Path,
                                                               garbage: bytes) -> None:
    srv = Served(tmp_path, reconnect=True)
    try:
        fe = srv.connect()
        fe.chan.sock.sendall(garbage)
        assert fe.chan.recv(timeout=5) is None
        fe.close()
        fe2 = srv.connect()
        try:
            assert fe2.get_u64(FrontendReq.GET_FEATURES) == DEFAULT_FEATURES
        finally:
            fe2.close()
    finally:
        srv.backend.close()


def test_thread_pool_serves_requests(tmp_path: Path) -> None:
    srv = Served(tmp_path, thread_pool_size=4)
    fe = srv.connect()
    try:
        fe.handshake()
        fe.setup_queue(0)
        fe.setup_queue(1)
        do_init(fe)
        for i in range(30):
            fe.submit(1, fuse_request(GETATTR, 100 + i, b"\0" * 16), 256)
        done = fe.wait(1, 30)
        assert sorted(out_header(c.data)[2] for c in done) == list(range(100, 130))
    finally:
        fe.close()
        srv.backend.close()


def test_existing_non_socket_file_is_not_replaced(tmp_path: Path) -> None:
    p = tmp_path / "not-a-socket"
    p.write_text("precious")
    with pytest.raises(FileExistsError):
        VhostUserBackend(lambda: Session(RootFS()), p)
    assert p.read_text() == "precious"


def test_setlkw_waits_on_the_pool_and_never_stalls_its_queue(tmp_path: Path) -> None:
    """A SETLKW that must wait for another process's lock goes to the pool: the same request
    queue keeps serving (its unlock could be the very next request), then the lock comes."""
    import subprocess
    import sys

    from virtiofs.protocol import Opcode, encode_request
    from virtiofs.protocol.structs import FileLock, LkIn, OpenIn
    from virtiofs.server.passthrough import PassthroughFS

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "f").write_bytes(b"x")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys; f=open(sys.argv[1],'r+'); "
         "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(shared / "f")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fs = PassthroughFS(shared, passthrough=False)
    backend = VhostUserBackend(lambda: Session(fs), tmp_path / "s.sock")
    backend.start()
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp_path / "s.sock"))
        fe = Frontend(s)
        try:
            fe.handshake()
            fe.setup_queue(0)
            fe.setup_queue(1)
            do_init(fe)
            reply = fe.fuse(1, encode_request(Opcode.LOOKUP, 2, 1, names=[b"f"]), 256)
            nodeid = struct.unpack_from("<Q", reply, 16)[0]
            reply = fe.fuse(1, encode_request(Opcode.OPEN, 3, nodeid, OpenIn(os.O_RDWR)), 256)
            fh = struct.unpack_from("<Q", reply, 16)[0]
            lk = LkIn(fh, owner=7, lk=FileLock(0, (1 << 63) - 1, 1, 4242))  # F_WRLCK
            fe.submit(1, encode_request(Opcode.SETLKW, 4, nodeid, lk), 256)
            t0 = time.monotonic()
            reply = fe.fuse(1, fuse_request(GETATTR, 5, b"\0" * 16), 256)
            assert out_header(reply)[1:] == (0, 5) and time.monotonic() - t0 < 5
            holder.stdin.close()  # type: ignore[union-attr]
            holder.wait(10)
            (c,) = fe.wait(1, timeout=10)
            assert out_header(c.data) == (16, 0, 4)
        finally:
            fe.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        backend.close()
        fs.close()


def test_without_protocol_features_rings_start_on_their_kick(served: Served) -> None:
    """vhost-user.rst: a front-end that does not ack VHOST_USER_F_PROTOCOL_FEATURES never
    sends SET_VRING_ENABLE; rings are enabled as soon as they are started (kicked)."""
    from virtiofs.transport.vhost_user.messages import encode_memory_table

    fe = served.connect()
    try:
        fe.send(FrontendReq.SET_OWNER)
        fe.send(FrontendReq.SET_FEATURES, encode_u64(1 << VirtioFeature.VERSION_1
                                                     | 1 << VirtioFeature.EVENT_IDX))
        fe.event_idx = True
        region = MemoryRegionDesc(0, fe.mem.size, UADDR_BASE, 0)
        fe.send(FrontendReq.SET_MEM_TABLE, encode_memory_table([region]), fds=(fe.mem.fd,))
        fe.setup_queue(0, enable=False)
        fe.setup_queue(1, enable=False)
        do_init(fe)
        reply = fe.fuse(1, fuse_request(GETATTR, 8, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 8)
        # SET_VRING_ENABLE is not part of this dialect: refused, the connection goes on.
        fe.send(FrontendReq.SET_VRING_ENABLE, encode_vring_state(1, 0))
        reply = fe.fuse(1, fuse_request(GETATTR, 9, b"\0" * 16), 256)
        assert out_header(reply)[1:] == (0, 9)
    finally:
        fe.close()
