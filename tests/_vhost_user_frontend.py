"""A minimal vhost-user front-end for tests: QEMU 7.2's sequence, rings in a memfd.

It speaks through the same ``messages``/``channel`` modules as the back-end and drives the rings
with the driver-side queues of ``virtiofs.virtqueue``, so a test sees the back-end exactly as QEMU
does: memory regions announced with a front-end virtual address (``uaddr``) different from the
guest-physical one, vring addresses in that virtual space, eventfds for kick and call.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from typing import Any

from virtiofs.transport.vhost_user.channel import VhostUserChannel
from virtiofs.transport.vhost_user.messages import (
    FrontendReq,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    VirtioFeature,
    VringAddr,
    decode_u64,
    decode_vring_state,
    encode_memory_table,
    encode_single_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from virtiofs.virtqueue import (
    GuestAllocator,
    GuestMemory,
    PackedDriverQueue,
    PackedLayout,
    SplitDriverQueue,
    SplitLayout,
)

#: Where the "front-end" pretends to have mapped guest memory (as QEMU's 0x7fab87fff000).
UADDR_BASE = 0x7F12_3400_0000
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")


def fuse_request(opcode: int, unique: int, body: bytes = b"", nodeid: int = 1) -> bytes:
    return IN_HEADER.pack(40 + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def init_request(unique: int = 1, minor: int = 41) -> bytes:
    # fuse_init_in 7.36+: major minor max_readahead flags flags2 unused[11] (64 bytes)
    body = struct.pack("<IIIII44x", 7, minor, 1 << 20, 0x7FFF_FFFF, 0)
    return fuse_request(26, unique, body)


class Frontend:
    """Drive a vhost-user-fs back-end over ``sock``."""

    def __init__(self, sock: socket.socket, *, mem_size: int = 8 << 20) -> None:
        self.chan = VhostUserChannel(sock)
        self.mem = GuestMemory.allocate(mem_size)
        self.alloc = GuestAllocator(self.mem, 0, mem_size)
        self.queues: dict[int, Any] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.packed = False
        self.event_idx = False
        self.indirect = False

    # -- raw messages -----------------------------------------------------------------------

    def send(self, req: int, payload: bytes = b"", *, fds: tuple[int, ...] = (),
             need_reply: bool = False) -> None:
        self.chan.send(req, payload, fds=fds, need_reply=need_reply)

    def call(self, req: int, payload: bytes = b"", *, fds: tuple[int, ...] = ()) -> Message:
        msg = self.chan.call(req, payload, fds=fds, timeout=10)
        assert msg is not None
        return msg

    def ack(self, req: int, payload: bytes = b"", *, fds: tuple[int, ...] = ()) -> int:
        return self.chan.call_ack(req, payload, fds=fds, timeout=10)

    def get_u64(self, req: int) -> int:
        return decode_u64(self.call(req).payload)

    # -- QEMU 7.2's handshake (vhost-user-capture.txt) --------------------------------------

    def handshake(self, *, packed: bool = False, event_idx: bool = True, indirect: bool = True,
                  backend_req: bool = True, mem_table: bool = False) -> tuple[int, int]:
        """QEMU 7.2's bring-up up to the memory table. ``mem_table``: do not take
        CONFIGURE_MEM_SLOTS and send SET_MEM_TABLE with guest memory split in two regions
        (what QEMU does with a back-end that lacks the feature)."""
        features = self.get_u64(FrontendReq.GET_FEATURES)
        proto = self.get_u64(FrontendReq.GET_PROTOCOL_FEATURES)
        want = proto & (1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK
                        | 1 << ProtocolFeature.BACKEND_REQ | 1 << ProtocolFeature.BACKEND_SEND_FD)
        if not mem_table:
            want |= proto & 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, encode_u64(want))
        self.nqueues = self.get_u64(FrontendReq.GET_QUEUE_NUM)
        self.get_u64(FrontendReq.GET_MAX_MEM_SLOTS)
        if backend_req:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                assert self.ack(FrontendReq.SET_BACKEND_REQ_FD, fds=(b.fileno(),)) == 0
            finally:
                b.close()
            self.backend_sock = a
        self.send(FrontendReq.SET_OWNER)
        ack = (1 << VirtioFeature.VERSION_1 | 1 << VirtioFeature.PROTOCOL_FEATURES)
        if event_idx:
            ack |= 1 << VirtioFeature.EVENT_IDX
        if indirect:
            ack |= 1 << VirtioFeature.INDIRECT_DESC
        if packed:
            ack |= 1 << VirtioFeature.RING_PACKED
        assert ack & ~features == 0, hex(features)
        self.packed, self.event_idx, self.indirect = packed, event_idx, indirect
        self.send(FrontendReq.SET_FEATURES, encode_u64(ack))
        if mem_table:
            half = self.mem.size // 2
            regions = [MemoryRegionDesc(0, half, UADDR_BASE, 0),
                       MemoryRegionDesc(half, half, UADDR_BASE + half, half)]
            assert self.ack(FrontendReq.SET_MEM_TABLE, encode_memory_table(regions),
                            fds=(self.mem.fd, self.mem.fd)) == 0
            return features, proto
        region = MemoryRegionDesc(0, self.mem.size, UADDR_BASE, 0)
        assert self.ack(FrontendReq.ADD_MEM_REG, encode_single_region(region),
                        fds=(self.mem.fd,)) == 0
        return features, proto

    def setup_queue(self, index: int, size: int = 64, *, base: int | None = None,
                    enable: bool = True) -> Any:
        if self.packed:
            layout: Any = PackedLayout.place(self.alloc.alloc(PackedLayout.place(0, size).end,
                                                              4096), size)
            q: Any = PackedDriverQueue(self.mem, layout, self.alloc, event_idx=self.event_idx,
                                       indirect=self.indirect)
            addr = VringAddr(index, 0, UADDR_BASE + layout.desc, UADDR_BASE + layout.device_event,
                             UADDR_BASE + layout.driver_event, 0)
            default_base = 0x8000_8000  # both wrap counters 1 (QEMU's packed encoding)
        else:
            layout = SplitLayout.place(self.alloc.alloc(SplitLayout.place(0, size).end, 4096),
                                       size)
            q = SplitDriverQueue(self.mem, layout, self.alloc, event_idx=self.event_idx,
                                 indirect=self.indirect)
            addr = VringAddr(index, 0, UADDR_BASE + layout.desc, UADDR_BASE + layout.used,
                             UADDR_BASE + layout.avail, 0)
            default_base = 0
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks[index], self.calls[index], self.queues[index] = kick, call, q
        self.send(FrontendReq.SET_VRING_CALL, encode_u64(index), fds=(call,))
        self.send(FrontendReq.SET_VRING_NUM, encode_vring_state(index, size))
        self.send(FrontendReq.SET_VRING_BASE,
                  encode_vring_state(index, default_base if base is None else base))
        self.send(FrontendReq.SET_VRING_ADDR, encode_vring_addr(addr))
        self.send(FrontendReq.SET_VRING_KICK, encode_u64(index), fds=(kick,))
        if enable:
            self.send(FrontendReq.SET_VRING_ENABLE, encode_vring_state(index, 1))
        return q

    def stop_queue(self, index: int) -> int:
        self.send(FrontendReq.SET_VRING_ENABLE, encode_vring_state(index, 0))
        reply = self.call(FrontendReq.GET_VRING_BASE, encode_vring_state(index, 0))
        i, num = decode_vring_state(reply.payload)
        assert i == index
        return num

    # -- requests over a ring ----------------------------------------------------------------

    def submit(self, index: int, request: bytes, reply_size: int, **kw: Any) -> int:
        q = self.queues[index]
        head: int = q.add([request] if request else [],
                          [reply_size] if reply_size else [], **kw)
        if q.needs_kick():
            os.eventfd_write(self.kicks[index], 1)
        return head

    def wait(self, index: int, count: int = 1, timeout: float = 10.0) -> list[Any]:
        """Reap ``count`` completions from queue ``index``, waiting on its call eventfd."""
        q = self.queues[index]
        out: list[Any] = []
        poller = select.poll()
        poller.register(self.calls[index], select.POLLIN)
        import time

        deadline = time.monotonic() + timeout
        while len(out) < count:
            out += q.reap()
            if len(out) >= count:
                break
            # Re-arm the used-buffer notification (used_event with EVENT_IDX), as Linux's
            # virtqueue_enable_cb does, and look again: a completion may have slipped in.
            if q.enable_interrupts():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(out)} of {count} completions on queue {index}")
            if poller.poll(int(min(left, 1.0) * 1000)):
                try:
                    os.eventfd_read(self.calls[index])
                except BlockingIOError:
                    pass
        return out

    def fuse(self, index: int, request: bytes, reply_size: int = 4096) -> bytes:
        self.submit(index, request, reply_size)
        (c,) = self.wait(index)
        assert c.error is None, c.error
        data: bytes = c.data
        return data

    def close(self) -> None:
        self.chan.close()
        for fd in list(self.kicks.values()) + list(self.calls.values()):
            os.close(fd)
        self.kicks.clear()
        self.calls.clear()
        sock = getattr(self, "backend_sock", None)
        if sock is not None:
            sock.close()
        # Drop every view into the mapping first, or munmap is deferred to the garbage collector.
        self.queues.clear()
        self.alloc = None  # type: ignore[assignment]
        self.mem.close()
