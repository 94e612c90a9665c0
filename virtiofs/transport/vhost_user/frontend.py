"""The vhost-user front-end: QEMU's side of a vhost-user-fs device, without a VM.

:class:`Frontend` connects to any vhost-user-fs back-end's socket (QEMU's C virtiofsd, the Rust
virtiofsd, our ``VhostUserBackend``), negotiates as QEMU 7.2 does (shared/docs/
vhost-user-capture.txt; SPEC.md 3.3), shares guest memory (a sealed memfd) and sets up the
hiprio queue and the request queues; the driver rings live in that memory, so a client drives
the back-end through :class:`~virtiofs.client.queue_channel.QueueChannel` exactly as a guest
kernel drives it through QEMU::

    with Frontend.connect("/tmp/vfsd.sock") as fe:
        fs = Client(QueueChannel.for_driver(fe))
        fs.listdir("/")

Message order (QEMU 7.2 against C virtiofsd): GET_FEATURES, GET_PROTOCOL_FEATURES,
SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD (NEED_REPLY),
SET_OWNER, GET_FEATURES, SET_VRING_CALL/ERR per queue, SET_FEATURES, ADD_MEM_REG per region
(NEED_REPLY) or SET_MEM_TABLE without CONFIGURE_MEM_SLOTS, then per queue SET_VRING_NUM,
SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, then SET_VRING_ENABLE 1 per queue.  Stopping:
SET_VRING_ENABLE 0 and GET_VRING_BASE per queue (the answer is the next available index the
back-end would process, which must equal what we made available).

Vring addresses are front-end virtual addresses (vhost-user.rst "vring address"): the address of
our own mapping of the memfd plus the ring's offset in guest memory, and each memory region's
``userspace_addr`` is that same mapping address, so the back-end's ``uaddr -> gpa`` translation
lands on our rings.

QEMU's C virtiofsd (Debian ``qemu-system-common``, ``/usr/lib/qemu/virtiofsd``), measured here:
``virtiofsd --socket-path=S -o source=DIR -o cache=auto`` runs as root in this container with its
default ``-o sandbox=namespace`` (no extra option needed; ``-o sandbox=chroot`` works too); it
creates the socket, serves one front-end and exits when that one disconnects; it speaks FUSE
7.36, offers features 0x1_7500_0000 and protocol features 0x8c2b, and answers GET_QUEUE_NUM 2
and GET_MAX_MEM_SLOTS 32 (exactly the capture). Without ``-o xattr`` it answers ENOSYS to every
xattr request. It answers UNLINK/RMDIR/RENAME of a name it was never asked to LOOKUP with EIO
(it counts on the kernel's lookup): the client looks names up first, as the VFS does.

The back-end request channel (``SET_BACKEND_REQ_FD``) is served on a thread: ``SHMEM_MAP`` /
``SHMEM_UNMAP`` go to the DAX window when one is configured (``dax_window``); every other
request is refused (non-zero REPLY_ACK when a reply is owed).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from virtiofs.errors import LocalProtocolError, ProtocolError, VhostUserError
from virtiofs.transport.loopback import DriverQueueEnd, build_driver_queues
from virtiofs.virtqueue import EventFd, GuestAllocator, GuestMemory, PackedLayout, SplitLayout

from .channel import VhostUserChannel
from .messages import (
    BackendReq,
    FrontendReq,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    ShmemMap,
    VirtioFeature,
    VringAddr,
    decode_u64,
    decode_virtio_fs_config,
    decode_vring_state,
    encode_config,
    encode_memory_table,
    encode_single_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
    features_str,
    validate_message,
)

__all__ = ["DEFAULT_ACK_FEATURES", "FRONTEND_PROTOCOL_FEATURES", "Frontend"]

log = logging.getLogger("virtiofs.vhost_user.frontend")

DEFAULT_ACK_FEATURES = (
    1 << VirtioFeature.VERSION_1
    | 1 << VirtioFeature.INDIRECT_DESC
    | 1 << VirtioFeature.EVENT_IDX
    | 1 << VirtioFeature.PROTOCOL_FEATURES
)
"""The virtio features we take when offered: what QEMU 7.2 acked to C virtiofsd (0x170000000,
capture line 21). NOTIFY_ON_EMPTY and LOG_ALL are left out as QEMU leaves them; RING_PACKED is
added with ``packed=True``."""

FRONTEND_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.LOG_SHMFD
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.BACKEND_REQ
    | 1 << ProtocolFeature.BACKEND_SEND_FD
    | 1 << ProtocolFeature.HOST_NOTIFIER
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.RESET_DEVICE
)
"""Protocol features we accept: QEMU 7.2 acked all of C virtiofsd's 0x8c2b (capture line 5).
LOG_SHMFD and HOST_NOTIFIER change nothing while we never start dirty logging nor take host
notifiers. CONFIG is added when a tag is to be read (QEMU <= 8.1 masks it for vhost-user-fs),
SHMEM (rust-vmm's number) with a DAX window."""

_REPLY_TIMEOUT = 10.0


def _mapping_address(view: memoryview) -> int:
    """The process virtual address of a writable buffer (our mmap of guest memory)."""
    anchor = (ctypes.c_char * 1).from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class Frontend:
    """A vhost-user-fs front-end connection (see the module docstring).

    Parameters mirror the QEMU device: ``queue_size`` (QEMU's default 128),
    ``num_request_queues``, ``packed`` (RING_PACKED, when the back-end offers it),
    ``event_idx``/``indirect`` (taken when offered unless set False), and ``memory_size`` of
    guest memory for rings and request buffers.  ``tag``: when set, GET_CONFIG must report it
    (needs the CONFIG protocol feature).  ``dax_window``: size of a DAX cache window (shared
    memory region 0) for SHMEM_MAP/SHMEM_UNMAP; negative: the size the back-end reports in
    GET_SHMEM_CONFIG (DAX hook, issue 5).

    After :meth:`connect`, ``mem``, ``allocator`` and ``queues`` are what
    ``QueueChannel.for_driver`` needs.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, memory_size: int = 64 << 20,
                 queue_size: int = 128, num_request_queues: int = 1, packed: bool = False,
                 event_idx: bool = True, indirect: bool = True, tag: str | None = None,
                 dax_window: int = 0, timeout: float = _REPLY_TIMEOUT) -> None:
        self.socket_path = os.fspath(socket_path)
        self.memory_size = memory_size
        self.queue_size = queue_size
        self.num_request_queues = num_request_queues
        self.want_packed = packed
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.tag = tag
        self.dax_window_size = dax_window
        self.timeout = timeout
        self.chan: VhostUserChannel | None = None
        self.mem: GuestMemory | None = None
        self.allocator: GuestAllocator | None = None
        self.queues: list[DriverQueueEnd] = []
        self.err_fds: list[EventFd] = []
        self.offered_features = 0
        self.acked_features = 0
        self.offered_protocol_features = 0
        self.acked_protocol_features = 0
        self.backend_queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.config_tag: str | None = None
        self.config_num_request_queues: int | None = None
        self.dax: Any = None
        """The :class:`~virtiofs.dax.window.DaxWindow` (when ``dax_window`` is set)."""
        self.backend_requests: list[tuple[str, int]] = []
        """(request name, status) of every back-end request served, for tests and probes."""
        self.uaddr = 0
        self.log: list[str] = []
        """Every message we sent, by name (the exchange, for tests and ``virtiofs probe``)."""
        self._backend_chan: VhostUserChannel | None = None
        self._backend_thread: threading.Thread | None = None
        self._running = False
        self._shmem_handler: Callable[[ShmemMap, int | None, bool], int] | None = None

    # ------------------------------------------------------------------------------ helpers

    @classmethod
    def connect(cls, socket_path: str | os.PathLike[str], *, connect_timeout: float = 10.0,
                **kwargs: Any) -> Frontend:
        """Create a front-end and bring the device up (see :meth:`start`)."""
        fe = cls(socket_path, **kwargs)
        try:
            fe.start(connect_timeout=connect_timeout)
        except BaseException:
            fe.close()
            raise
        return fe

    def _has(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def _has_proto(self, bit: int) -> bool:
        return bool(self.acked_protocol_features >> bit & 1)

    @property
    def packed(self) -> bool:
        return self._has(VirtioFeature.RING_PACKED)

    def _send(self, req: FrontendReq, payload: bytes = b"", *, fds: tuple[int, ...] = (),
              need_reply: bool = False) -> None:
        """A request without a reply of its own; with ``need_reply`` (REPLY_ACK negotiated)
        the back-end's u64 status must be 0."""
        assert self.chan is not None
        self.log.append(req.name)
        ack = need_reply and self._has_proto(ProtocolFeature.REPLY_ACK)
        if not ack:
            self.chan.send(req, payload, fds=fds)
            return
        msg = self.chan.call(req, payload, fds=fds, need_reply=True, timeout=self.timeout)
        assert msg is not None
        try:
            status = decode_u64(msg.payload)
        finally:
            msg.close_fds()
        if status:
            raise VhostUserError(f"back-end refused {req.name} (status {status:#x})",
                                 field="reply")

    def _get(self, req: FrontendReq, payload: bytes = b"") -> bytes:
        """A request whose reply carries data (GET_*); the reply must hold no fd."""
        assert self.chan is not None
        self.log.append(req.name)
        # call(need_reply=False) would not wait; these requests always get a reply, without
        # the NEED_REPLY flag (vhost-user.rst), so send and wait under the channel's lock.
        with self.chan._call_lock:
            self.chan.send(req, payload)
            msg = self.chan.recv_reply(req, self.timeout)
        if msg.fds:
            msg.close_fds()
            raise VhostUserError(f"reply to {req.name} carries fds", field="fds")
        return msg.payload

    def _get_u64(self, req: FrontendReq) -> int:
        return decode_u64(self._get(req))

    # ------------------------------------------------------------------------------ bring-up

    def start(self, *, connect_timeout: float = 10.0) -> Frontend:
        """Connect and set the device up; the queues are running when this returns."""
        if self.chan is not None:
            raise LocalProtocolError("front-end already started")
        self.chan = VhostUserChannel(self._connect(connect_timeout))
        self._negotiate()
        self._setup_memory_and_queues()
        self._running = True
        return self

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.socket_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                # The back-end creates its socket when it is ready: retry until the deadline.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    def _negotiate(self) -> None:
        self.offered_features = self._get_u64(FrontendReq.GET_FEATURES)
        if not self.offered_features >> VirtioFeature.VERSION_1 & 1:
            raise VhostUserError("back-end does not offer VIRTIO_F_VERSION_1 "
                                 f"({features_str(self.offered_features)})", field="features")
        if self.offered_features >> VirtioFeature.PROTOCOL_FEATURES & 1:
            self.offered_protocol_features = self._get_u64(FrontendReq.GET_PROTOCOL_FEATURES)
            want = FRONTEND_PROTOCOL_FEATURES
            if self.tag is not None:
                want |= 1 << ProtocolFeature.CONFIG
            if self.dax_window_size:
                want |= 1 << ProtocolFeature.SHMEM
            self.acked_protocol_features = self.offered_protocol_features & want
            self._send(FrontendReq.SET_PROTOCOL_FEATURES,
                       encode_u64(self.acked_protocol_features))
        nqueues = 1 + self.num_request_queues
        if self._has_proto(ProtocolFeature.MQ):
            self.backend_queue_num = self._get_u64(FrontendReq.GET_QUEUE_NUM)
            if self.backend_queue_num < nqueues:
                raise VhostUserError(f"back-end serves {self.backend_queue_num} queues, "
                                     f"{nqueues} wanted", field="queue_num")
        elif nqueues > 2:
            raise VhostUserError("back-end has no MQ: only one request queue", field="queue_num")
        if self._has_proto(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._get_u64(FrontendReq.GET_MAX_MEM_SLOTS)
            if self.max_mem_slots < 1:
                raise VhostUserError("back-end offers no memory slot", field="max_mem_slots")
        if self._has_proto(ProtocolFeature.BACKEND_REQ):
            self._start_backend_channel()
        self._send(FrontendReq.SET_OWNER)
        # QEMU asks the features again after SET_OWNER (vhost_dev_init → vhost_user_get_features).
        again = self._get_u64(FrontendReq.GET_FEATURES)
        if again != self.offered_features:
            raise VhostUserError(f"back-end features changed from {self.offered_features:#x} "
                                 f"to {again:#x}", field="features")
        want = DEFAULT_ACK_FEATURES
        if not self.want_event_idx:
            want &= ~(1 << VirtioFeature.EVENT_IDX)
        if not self.want_indirect:
            want &= ~(1 << VirtioFeature.INDIRECT_DESC)
        if self.want_packed:
            want |= 1 << VirtioFeature.RING_PACKED
        self.acked_features = self.offered_features & want
        if self.want_packed and not self.packed:
            raise VhostUserError("packed rings asked for, but the back-end does not offer "
                                 "VIRTIO_F_RING_PACKED", field="features")
        if self.tag is not None:
            self._read_config()

    def _read_config(self) -> None:
        if not self._has_proto(ProtocolFeature.CONFIG):
            raise VhostUserError("a tag was given but the back-end has no CONFIG feature",
                                 field="protocol_features")
        reply = self._get(FrontendReq.GET_CONFIG, encode_config(0, bytes(40)))
        if len(reply) < 12 + 40:
            raise VhostUserError(f"GET_CONFIG reply of {len(reply)} bytes", field="size")
        tag, nrq = decode_virtio_fs_config(reply[12:])
        self.config_tag, self.config_num_request_queues = tag, nrq
        if tag != self.tag:
            raise VhostUserError(f"back-end tag is {tag!r}, not {self.tag!r}", field="tag")

    def _setup_memory_and_queues(self) -> None:
        nqueues = 1 + self.num_request_queues
        self.mem = mem = GuestMemory.allocate(self.memory_size, name="virtiofs-frontend")
        region = mem.regions[0]
        self.uaddr = _mapping_address(region.view)
        region.uaddr = self.uaddr
        self.allocator = alloc = GuestAllocator(mem, 0, self.memory_size)
        self.queues = build_driver_queues(
            mem, alloc, nqueues, self.queue_size, packed=self.packed,
            event_idx=self._has(VirtioFeature.EVENT_IDX),
            indirect=self._has(VirtioFeature.INDIRECT_DESC))
        self.err_fds = [EventFd() for _ in range(nqueues)]
        for q in self.queues:
            self._send(FrontendReq.SET_VRING_CALL, encode_u64(q.index), fds=(q.call.fileno(),))
            self._send(FrontendReq.SET_VRING_ERR, encode_u64(q.index),
                       fds=(self.err_fds[q.index].fileno(),))
        self._send(FrontendReq.SET_FEATURES, encode_u64(self.acked_features))
        desc = MemoryRegionDesc(0, self.memory_size, self.uaddr, 0)
        if self._has_proto(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self._send(FrontendReq.ADD_MEM_REG, encode_single_region(desc),
                       fds=(region.fd,), need_reply=True)
        else:
            self._send(FrontendReq.SET_MEM_TABLE, encode_memory_table([desc]), fds=(region.fd,),
                       need_reply=True)
        for q in self.queues:
            lay = q.layout
            self._send(FrontendReq.SET_VRING_NUM, encode_vring_state(q.index, lay.size))
            # Fresh rings: next avail 0; for packed rings the wrap counters start at 1
            # (packed-ring.tex), encoded in bit 15 (avail) and bit 31 (used).
            base = (1 << 15 | 1 << 31) if self.packed else 0
            self._send(FrontendReq.SET_VRING_BASE, encode_vring_state(q.index, base))
            if isinstance(lay, PackedLayout):
                addr = VringAddr(q.index, 0, self.uaddr + lay.desc, self.uaddr + lay.device_event,
                                 self.uaddr + lay.driver_event, 0)
            else:
                assert isinstance(lay, SplitLayout)
                addr = VringAddr(q.index, 0, self.uaddr + lay.desc, self.uaddr + lay.used,
                                 self.uaddr + lay.avail, 0)
            self._send(FrontendReq.SET_VRING_ADDR, encode_vring_addr(addr))
            self._send(FrontendReq.SET_VRING_KICK, encode_u64(q.index), fds=(q.kick.fileno(),))
        if self._has(VirtioFeature.PROTOCOL_FEATURES):
            for q in self.queues:
                self._send(FrontendReq.SET_VRING_ENABLE, encode_vring_state(q.index, 1))

    # ------------------------------------------------------------------------------ back-end channel

    def _start_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._send(FrontendReq.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),), need_reply=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._backend_chan = VhostUserChannel(ours)
        if self.dax_window_size:
            # DAX hook (issue 5, .dax): with SHMEM negotiated, GET_SHMEM_CONFIG tells what the
            # back-end expects; dax_window < 0 means "the size the back-end asks for".
            from .dax import frontend_window_size
            self.dax_window_size = frontend_window_size(self)
            if self.dax_window_size > 0:
                self._setup_dax()
        self._backend_thread = threading.Thread(target=self._serve_backend,
                                                name="virtiofs-backend-req", daemon=True)
        self._backend_thread.start()

    def _setup_dax(self) -> None:
        """The DAX window (shared memory region 0) of ``dax_window_size`` bytes."""
        from virtiofs.dax.window import DaxWindow
        self.dax = DaxWindow(self.dax_window_size)

    def _serve_backend(self) -> None:
        chan = self._backend_chan
        assert chan is not None
        while True:
            try:
                msg = chan.recv()
            except (ProtocolError, OSError) as e:
                log.warning("back-end request channel: %s", e)
                return
            if msg is None:
                return
            try:
                self._backend_request(chan, msg)
            except (ProtocolError, OSError) as e:
                log.warning("back-end request %s: %s", msg.name(BackendReq), e)
            finally:
                msg.close_fds()

    def _backend_request(self, chan: VhostUserChannel, msg: Message) -> None:
        status = errno.ENOSYS
        name = msg.name(BackendReq)
        try:
            validate_message(msg, backend_channel=True)
        except VhostUserError as e:
            log.warning("refused back-end request: %s", e)
            status = errno.EINVAL
        else:
            if msg.request in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
                status = self._shmem(msg)
        self.backend_requests.append((name, status))
        if msg.need_reply:
            chan.reply_u64(msg, status)

    def _shmem(self, msg: Message) -> int:
        """SHMEM_MAP/UNMAP into the DAX window; the u64 status (0 = done, else an errno)."""
        if self.dax is None:
            return errno.ENODEV
        try:
            m = ShmemMap.decode(msg.payload)
        except VhostUserError:
            return errno.EINVAL
        if m.shmid != 0:
            return errno.EINVAL
        from virtiofs.errors import DaxMappingError
        try:
            if msg.request == BackendReq.SHMEM_MAP:
                fd = msg.take_fd(0)
                try:
                    self.dax.map(m.shm_offset, m.len, fd, m.fd_offset,
                                 writable=bool(m.flags & 1))
                finally:
                    os.close(fd)
            else:
                self.dax.unmap(m.shm_offset, m.len)
        except DaxMappingError as e:
            return e.errno or errno.EINVAL
        return 0

    # ------------------------------------------------------------------------------ stop

    def expected_vring_bases(self) -> list[int]:
        """What GET_VRING_BASE must answer once every chain we made available was taken:
        split rings, our avail index; packed rings, our next avail position with the driver
        wrap counter in bit 15 (vhost-user.rst; the used half, bits 16-31, is the back-end's
        business and not compared)."""
        out = []
        for q in self.queues:
            dq: Any = q.queue
            if self.packed:
                out.append(dq._next_avail | int(dq._avail_wrap) << 15)
            else:
                out.append(dq._avail_idx)
        return out

    def stop(self) -> list[int]:
        """Stop the rings as QEMU does (ENABLE 0, then GET_VRING_BASE per queue); returns the
        next available index the back-end reports for each queue."""
        bases: list[int] = []
        if not self._running or self.chan is None:
            return bases
        self._running = False
        if self._has(VirtioFeature.PROTOCOL_FEATURES):
            for q in self.queues:
                self._send(FrontendReq.SET_VRING_ENABLE, encode_vring_state(q.index, 0))
        for q in self.queues:
            reply = self._get(FrontendReq.GET_VRING_BASE, encode_vring_state(q.index, 0))
            state = decode_vring_state(reply)
            if state.index != q.index:
                raise VhostUserError(f"GET_VRING_BASE answered queue {state.index} for "
                                     f"{q.index}", field="index")
            bases.append(state.num)
        return bases

    def close(self) -> None:
        """Stop (if running), disconnect and release memory, eventfds and the DAX window."""
        try:
            if self._running and self.chan is not None:
                try:
                    self.stop()
                except (ProtocolError, OSError, TimeoutError) as e:
                    log.warning("stopping the back-end: %s", e)
        finally:
            self._running = False
            if self.chan is not None:
                self.chan.close()
            if self._backend_chan is not None:
                self._backend_chan.shutdown()
            if self._backend_thread is not None:
                self._backend_thread.join(5.0)
            if self._backend_chan is not None:
                self._backend_chan.close()
                self._backend_chan = None
            for q in self.queues:
                q.close()
            for efd in self.err_fds:
                efd.close()
            self.queues = []
            self.err_fds = []
            if self.dax is not None:
                self.dax.close()
                self.dax = None
            if self.mem is not None:
                self.mem.close()
                self.mem = None

    def __enter__(self) -> Frontend:
        if self.chan is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
