"""The vhost-user-fs back-end (the virtiofsd role): device state machine and socket server.

:class:`VhostUserFsDevice` answers every front-end request QEMU 7.2 sends to a vhost-user-fs
back-end (vhost-user-capture.txt; SPEC.md 3.3) for one connection: features, protocol
features, owner, the memory table (``SET_MEM_TABLE`` or ``ADD/REM_MEM_REG`` with
CONFIGURE_MEM_SLOTS, mapped through :class:`~virtiofs.virtqueue.memory.GuestMemory` and
translated from the front-end's virtual addresses via each region's ``uaddr``), vring
num/addr/base/kick/call/err/enable, ``GET_VRING_BASE`` (stops the ring and answers the next
available index; the packed encoding when RING_PACKED was negotiated), queue count, config
space, the back-end request channel, resets, and REPLY_ACK for every NEED_REPLY message.

Rings follow the vhost-user state rules (SPEC.md 3.1): a ring is *started* by its kick fd and
stopped by ``GET_VRING_BASE``; with PROTOCOL_FEATURES negotiated it is also *disabled* until
``SET_VRING_ENABLE 1``. A started, enabled ring gets a :class:`~.worker.QueueWorker` thread;
the hiprio queue (index 0) has its own, so FORGETs are never stalled behind requests.
Memory-table changes pause the running workers, swap the mappings and resume them.

:class:`VhostUserBackend` owns the listening unix socket, serves one front-end at a time
(vhost-user is one connection), and with ``reconnect=True`` serves the next one when the
previous goes away; each connection gets a fresh FUSE session and leaves nothing behind (every
received fd closed, every mapping unmapped).

Errors: a malformed header or an unknown request ends the connection (the framing can no
longer be trusted); a request whose content is refused is answered with a non-zero REPLY_ACK
when the front-end asked for one, and logged otherwise; a request that owes a reply
(``GET_*``) and cannot be answered ends the connection.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtiofs.errors import GuestMemoryError, ProtocolError, VhostUserError, VirtqueueError
from virtiofs.server.dispatch import ALL, DEFAULT_POOLED, WorkerPool
from virtiofs.virtqueue.memory import GuestMemory
from virtiofs.virtqueue.packed import PackedDeviceQueue
from virtiofs.virtqueue.ring import PackedLayout, SplitLayout
from virtiofs.virtqueue.split import SplitDeviceQueue

from .channel import VhostUserChannel
from .messages import (
    MAX_CONFIG_SIZE,
    ConfigSpace,
    FrontendReq,
    Message,
    ProtocolFeature,
    VirtioFeature,
    VringAddr,
    decode_config,
    decode_memory_table,
    decode_single_region,
    decode_u64,
    decode_vring_addr,
    decode_vring_fd_index,
    decode_vring_state,
    encode_config,
    encode_u64,
    encode_virtio_fs_config,
    encode_vring_state,
    features_str,
    validate_message,
)
from .worker import DeviceQueue, QueueWorker, RequestHandler, _CallFd

__all__ = [
    "ConnectionStats",
    "DEFAULT_FEATURES",
    "DEFAULT_PROTOCOL_FEATURES",
    "SessionFactory",
    "VhostUserBackend",
    "VhostUserFsDevice",
    "listen_unix",
]

log = logging.getLogger("virtiofs.vhost_user")

SessionFactory = Callable[[], RequestHandler]

DEFAULT_FEATURES = (
    1 << VirtioFeature.VERSION_1
    | 1 << VirtioFeature.INDIRECT_DESC
    | 1 << VirtioFeature.EVENT_IDX
    | 1 << VirtioFeature.RING_PACKED
    | 1 << VirtioFeature.PROTOCOL_FEATURES
)
"""Offered virtio features. RING_PACKED must be offered or QEMU silently falls back to split
rings with ``packed=on`` (GUEST.md). LOG_ALL is not offered: no dirty logging (migration)."""

DEFAULT_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.BACKEND_REQ
    | 1 << ProtocolFeature.BACKEND_SEND_FD
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.RESET_DEVICE
)
"""Offered protocol features. CONFIG is added when a tag is configured (QEMU <= 8.1 masks it
off for vhost-user-fs anyway, SPEC.md 3.3 GET_CONFIG)."""

#: GET_MAX_MEM_SLOTS answer (what C virtiofsd says, capture line 9).
MAX_MEM_SLOTS = 32
#: Requests that carry their own reply; NEED_REPLY adds nothing to them (vhost-user.rst).
_HAS_REPLY = frozenset({
    FrontendReq.GET_FEATURES, FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.GET_VRING_BASE,
    FrontendReq.GET_QUEUE_NUM, FrontendReq.GET_CONFIG, FrontendReq.GET_MAX_MEM_SLOTS,
    FrontendReq.GET_INFLIGHT_FD, FrontendReq.POSTCOPY_ADVISE, FrontendReq.POSTCOPY_END,
    FrontendReq.GET_STATUS, FrontendReq.CHECK_DEVICE_STATE, FrontendReq.SET_DEVICE_STATE_FD,
    FrontendReq.GET_SHMEM_CONFIG, FrontendReq.GET_SHARED_OBJECT,
})
_MAX_QUEUE_SIZE = 32768
_KNOWN_REQUESTS = frozenset(int(r) for r in FrontendReq)


@dataclass
class ConnectionStats:
    """What one front-end connection negotiated and how much each queue served."""

    features: int = 0
    protocol_features: int = 0
    served: dict[int, int] = field(default_factory=dict)
    """Requests (chains) served per queue index."""
    bad_chains: int = 0
    broken_queues: list[int] = field(default_factory=list)
    queue_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return bool(self.features >> VirtioFeature.RING_PACKED & 1)

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> VirtioFeature.EVENT_IDX & 1)

    @property
    def indirect(self) -> bool:
        return bool(self.features >> VirtioFeature.INDIRECT_DESC & 1)


class _Vring:
    """One ring's vhost-user state (the device owns every fd in here)."""

    __slots__ = ("index", "num", "addr", "base", "kick", "calls", "started", "enabled",
                 "worker", "queue", "broken")

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: VringAddr | None = None
        self.base = 0
        self.kick = -1
        self.calls = _CallFd()
        self.started = False
        self.enabled = False
        self.worker: QueueWorker | None = None
        self.queue: DeviceQueue | None = None
        self.broken = False


class VhostUserFsDevice:
    """Device state for one front-end connection.

    ``handle(msg)`` takes a received :class:`~.messages.Message` and returns the payload of the
    reply to send (or ``None``); it takes ownership of the message's fds (closing any it does
    not keep). :meth:`close` stops every worker, closes every fd and unmaps guest memory.
    """

    def __init__(
        self,
        session: RequestHandler,
        *,
        tag: str | None = None,
        num_request_queues: int = 1,
        max_request_queues: int = 16,
        features: int = DEFAULT_FEATURES,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        pool: Executor | None = None,
        pooled: Collection[int] = (),
    ) -> None:
        if num_request_queues < 1 or max_request_queues < num_request_queues:
            raise ValueError("need 1 <= num_request_queues <= max_request_queues")
        if 1 + max_request_queues > 256:
            raise ValueError("vhost-user addresses at most 256 queues (8-bit index)")
        self.session = session
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.num_queues = 1 + max_request_queues
        self.features = features
        if tag is not None:
            encode_virtio_fs_config(tag, num_request_queues)  # validate early
            protocol_features |= 1 << ProtocolFeature.CONFIG
        self.offered_protocol_features = protocol_features
        self.pool = pool
        self.pooled = pooled
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.features_set = False
        self.owner = False
        self.memory: GuestMemory | None = None
        self.backend_channel: VhostUserChannel | None = None
        self.vrings = [_Vring(i) for i in range(self.num_queues)]
        self.stats = ConnectionStats()
        self._closed = False

    # -- negotiated state ------------------------------------------------------------------

    def _has(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def _has_proto(self, bit: int) -> bool:
        return bool(self.acked_protocol_features >> bit & 1)

    @property
    def packed(self) -> bool:
        return self._has(VirtioFeature.RING_PACKED)

    @property
    def reply_ack(self) -> bool:
        return self._has_proto(ProtocolFeature.REPLY_ACK)

    @property
    def running_queues(self) -> list[int]:
        """Indexes of rings with a live worker."""
        return [v.index for v in self.vrings if v.worker is not None and v.worker.alive]

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Process one front-end request; the reply payload or None (REPLY_ACK is the caller's).

        Raises :class:`VhostUserError` (or another ``ProtocolError``) when the request is
        refused; the fds of ``msg`` are closed in every case except those kept.
        """
        try:
            validate_message(msg)
            req = FrontendReq(msg.request)
            handler = getattr(self, "_" + req.name.lower(), None)
            if handler is None:
                raise VhostUserError(f"{req.name} is not supported by this back-end",
                                     field="request")
            result: bytes | None = handler(msg)
            return result
        finally:
            msg.close_fds()

    def _vring(self, index: int) -> _Vring:
        if not 0 <= index < self.num_queues:
            raise VhostUserError(f"queue index {index} >= {self.num_queues}", field="index")
        return self.vrings[index]

    # -- features ---------------------------------------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.features)

    def _set_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload)
        if value & ~self.features:
            raise VhostUserError(f"features {features_str(value & ~self.features)} not offered",
                                 field="features")
        if self.running_queues and (value ^ self.acked_features) & ~(1 << VirtioFeature.LOG_ALL):
            raise VhostUserError("ring features changed while rings run", field="features")
        self.acked_features = self.stats.features = value
        self.features_set = True
        log.debug("features acked: %s", features_str(value))
        if not self._has(VirtioFeature.PROTOCOL_FEATURES):
            # vhost-user.rst: without PROTOCOL_FEATURES rings are enabled as soon as started.
            for v in self.vrings:
                v.enabled = True
                self._maybe_start(v)
        return None

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload)
        if value & ~self.offered_protocol_features:
            raise VhostUserError(
                f"protocol features {features_str(value & ~self.offered_protocol_features, ProtocolFeature)} not offered",
                field="protocol_features")
        self.acked_protocol_features = self.stats.protocol_features = value
        log.debug("protocol features acked: %s", features_str(value, ProtocolFeature))
        return None

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(self.num_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return encode_u64(MAX_MEM_SLOTS)

    def _set_owner(self, msg: Message) -> None:
        if self.owner:
            raise VhostUserError("SET_OWNER sent twice")
        self.owner = True
        return None

    def _reset_owner(self, msg: Message) -> None:
        self._reset()
        return None

    def _reset_device(self, msg: Message) -> None:
        self._reset()
        return None

    def _reset(self) -> None:
        """Disable and stop every ring, forget negotiated features (vhost-user RESET_DEVICE)."""
        for v in self.vrings:
            self._stop_ring(v)
            self._close_ring_fds(v)
            self.vrings[v.index] = _Vring(v.index)
        self.acked_features = 0
        self.features_set = False
        self.owner = False

    # -- memory -----------------------------------------------------------------------------

    def _pause(self) -> list[_Vring]:
        paused = [v for v in self.vrings if v.worker is not None]
        for v in paused:
            self._stop_worker(v)
        return paused

    def _resume(self, paused: list[_Vring]) -> None:
        for v in paused:
            self._maybe_start(v)

    def _set_mem_table(self, msg: Message) -> None:
        regions = decode_memory_table(msg.payload)
        new = GuestMemory()
        try:
            for r, fd in zip(regions, msg.fds, strict=True):
                new.add_region(r.guest_phys_addr, r.memory_size, fd, r.mmap_offset,
                               r.userspace_addr)
        except BaseException:
            new.close()
            raise
        paused = self._pause()
        old, self.memory = self.memory, new
        if old is not None:
            old.close()
        self._resume(paused)
        log.debug("memory table: %r", new)
        return None

    def _add_mem_reg(self, msg: Message) -> None:
        r = decode_single_region(msg.payload)
        mem = self.memory
        if mem is not None and len(mem.regions) >= MAX_MEM_SLOTS:
            raise VhostUserError(f"more than {MAX_MEM_SLOTS} memory regions")
        paused = self._pause()
        try:
            if mem is None:
                mem = self.memory = GuestMemory()
            mem.add_region(r.guest_phys_addr, r.memory_size, msg.fds[0], r.mmap_offset,
                           r.userspace_addr)
        finally:
            self._resume(paused)
        log.debug("memory region added: gpa=%#x size=%#x uaddr=%#x", r.guest_phys_addr,
                  r.memory_size, r.userspace_addr)
        return None

    def _rem_mem_reg(self, msg: Message) -> None:
        r = decode_single_region(msg.payload)
        if self.memory is None:
            raise VhostUserError("REM_MEM_REG without a memory table")
        paused = self._pause()
        try:
            match = [x for x in self.memory.regions
                     if x.gpa == r.guest_phys_addr and x.size == r.memory_size
                     and x.uaddr == r.userspace_addr]
            if not match:
                raise VhostUserError(f"no memory region at gpa {r.guest_phys_addr:#x}")
            self.memory.remove_region(r.guest_phys_addr, r.memory_size)
        finally:
            self._resume(paused)
        return None

    # -- rings ------------------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        index, num = decode_vring_state(msg.payload)
        v = self._vring(index)
        if not 0 < num <= _MAX_QUEUE_SIZE:
            raise VhostUserError(f"queue size {num}", field="num")
        if v.worker is not None:
            raise VhostUserError(f"SET_VRING_NUM on running queue {index}")
        v.num = num
        return None

    def _set_vring_addr(self, msg: Message) -> None:
        addr = decode_vring_addr(msg.payload)
        v = self._vring(addr.index)
        if v.worker is not None:
            raise VhostUserError(f"SET_VRING_ADDR on running queue {addr.index}")
        v.addr = addr
        return None

    def _set_vring_base(self, msg: Message) -> None:
        index, num = decode_vring_state(msg.payload)
        v = self._vring(index)
        if v.worker is not None:
            raise VhostUserError(f"SET_VRING_BASE on running queue {index}")
        if not self.packed and num > 0xFFFF:
            raise VhostUserError(f"split ring base {num:#x} wider than 16 bits", field="num")
        v.base = num
        v.queue = None
        return None

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = decode_vring_state(msg.payload)
        v = self._vring(index)
        self._stop_ring(v)
        log.debug("queue %d stopped at base %#x", index, v.base)
        return encode_vring_state(index, v.base)

    def _set_vring_kick(self, msg: Message) -> None:
        index, has_fd = decode_vring_fd_index(msg.payload)
        v = self._vring(index)
        if not has_fd:
            # Polling mode (no kick fd) needs a busy-polling back-end; refused rather than
            # silently never serving the ring.
            raise VhostUserError(f"queue {index}: polling without a kick fd is not supported")
        fd = msg.take_fd(0)
        self._check_eventfd(fd)
        self._stop_worker(v)
        if v.kick >= 0:
            os.close(v.kick)
        v.kick = fd
        v.started = True
        if not self._has(VirtioFeature.PROTOCOL_FEATURES) and self.features_set:
            v.enabled = True
        self._maybe_start(v)
        return None

    def _set_vring_call(self, msg: Message) -> None:
        index, has_fd = decode_vring_fd_index(msg.payload)
        v = self._vring(index)
        fd = msg.take_fd(0) if has_fd else -1
        if fd >= 0:
            self._check_eventfd(fd)
        v.calls.replace("call", fd)
        return None

    def _set_vring_err(self, msg: Message) -> None:
        index, has_fd = decode_vring_fd_index(msg.payload)
        v = self._vring(index)
        fd = msg.take_fd(0) if has_fd else -1
        if fd >= 0:
            self._check_eventfd(fd)
        v.calls.replace("err", fd)
        return None

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = decode_vring_state(msg.payload)
        v = self._vring(index)
        if num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE {num}", field="num")
        if not self._has(VirtioFeature.PROTOCOL_FEATURES) and self.features_set:
            raise VhostUserError("SET_VRING_ENABLE without PROTOCOL_FEATURES")
        v.enabled = bool(num)
        if v.enabled:
            self._maybe_start(v)
        else:
            # Disabled: no more buffers are used; finish what is in flight.
            self._stop_worker(v)
        return None

    @staticmethod
    def _check_eventfd(fd: int) -> None:
        # An eventfd is an anonymous inode: S_IFMT is 0. Refuse sockets, files, pipes: writing
        # 8 bytes to a file the front-end handed us must never happen.
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise VhostUserError(f"vring fd: {e}") from None
        if stat.S_IFMT(st.st_mode) != 0:
            os.close(fd)
            raise VhostUserError("vring notification fd is not an eventfd", field="fds")

    def _make_queue(self, v: _Vring) -> DeviceQueue:
        assert v.addr is not None and self.memory is not None
        mem = self.memory
        a = v.addr
        event_idx = self._has(VirtioFeature.EVENT_IDX)
        indirect = self._has(VirtioFeature.INDIRECT_DESC)
        try:
            if self.packed:
                desc = mem.uaddr_to_gpa(a.desc, 16 * v.num)
                drv = mem.uaddr_to_gpa(a.avail, 4)
                dev = mem.uaddr_to_gpa(a.used, 4)
                pq = PackedDeviceQueue(mem, PackedLayout(v.num, desc, drv, dev),
                                       event_idx=event_idx, indirect=indirect)
                pq.vring_base = v.base
                return pq
            d, av, u = SplitLayout.area_sizes(v.num, event_idx)
            layout = SplitLayout(v.num, mem.uaddr_to_gpa(a.desc, d), mem.uaddr_to_gpa(a.avail, av),
                                 mem.uaddr_to_gpa(a.used, u))
            return SplitDeviceQueue(mem, layout, event_idx=event_idx, indirect=indirect,
                                    next_avail=v.base)
        except (GuestMemoryError, VirtqueueError) as e:
            raise VhostUserError(f"queue {v.index}: {e}") from None
        except Exception as e:  # LocalProtocolError from a base outside the ring
            raise VhostUserError(f"queue {v.index}: {e}") from None

    def _maybe_start(self, v: _Vring) -> None:
        """Start a worker when the ring is started, enabled and fully described."""
        if (v.worker is not None or not v.started or not v.enabled or v.broken
                or v.addr is None or not v.num or self.memory is None or v.kick < 0):
            return
        if v.queue is None:
            v.queue = self._make_queue(v)
        w = QueueWorker(v.index, v.queue, v.kick, v.calls, self.session, hiprio=v.index == 0,
                        pool=self.pool, pooled=self.pooled, on_broken=self._on_broken)
        v.worker = w
        w.start()
        log.debug("queue %d running (%s, size %d)", v.index,
                  "packed" if self.packed else "split", v.num)

    def _on_broken(self, index: int, reason: str) -> None:
        self.vrings[index].broken = True
        self.stats.broken_queues.append(index)

    def _stop_worker(self, v: _Vring, pool_timeout: float | None = None) -> None:
        w, v.worker = v.worker, None
        if w is None:
            return
        ok = w.stop(pool_timeout=pool_timeout)
        st = self.stats
        st.served[v.index] = st.served.get(v.index, 0) + w.served
        st.bad_chains += w.bad_chains
        st.queue_sizes[v.index] = v.num
        if not ok:
            # A handler stuck in the filesystem: its thread is a daemon and the ring state is
            # kept; nothing else can be done safely from here.
            log.error("queue %d worker did not stop in time", v.index)

    def _stop_ring(self, v: _Vring) -> None:
        """GET_VRING_BASE semantics: stop processing and remember where the ring stands."""
        self._stop_worker(v)
        if v.queue is not None:
            v.base = v.queue.vring_base
            v.queue = None
        v.started = False

    @staticmethod
    def _close_ring_fds(v: _Vring) -> None:
        if v.kick >= 0:
            os.close(v.kick)
            v.kick = -1
        v.calls.close()

    # -- config, back-end channel, misc -----------------------------------------------------

    def config_space(self) -> bytes:
        """``struct virtio_fs_config`` as the guest would read it (tag, num_request_queues,
        notify_buf_size = 0)."""
        if self.tag is None:
            raise VhostUserError("no tag configured: the config space is QEMU's")
        return encode_virtio_fs_config(self.tag, self.num_request_queues) + b"\0" * 4

    def _get_config(self, msg: Message) -> bytes:
        cfg: ConfigSpace = decode_config(msg.payload)
        space = self.config_space().ljust(MAX_CONFIG_SIZE, b"\0")
        return encode_config(cfg.offset, space[cfg.offset:cfg.offset + cfg.size], cfg.flags)

    def _set_config(self, msg: Message) -> None:
        decode_config(msg.payload)
        # virtio spec 5.11.4: "The driver MUST NOT write to device configuration fields."
        raise VhostUserError("the virtio-fs config space is read-only")

    def _set_backend_req_fd(self, msg: Message) -> None:
        if not self._has_proto(ProtocolFeature.BACKEND_REQ):
            raise VhostUserError("SET_BACKEND_REQ_FD without BACKEND_REQ")
        chan = VhostUserChannel.from_fd(msg.take_fd(0))
        old, self.backend_channel = self.backend_channel, chan
        if old is not None:
            old.close()
        return None

    def _set_vring_endian(self, msg: Message) -> None:
        raise VhostUserError("legacy vring endianness is not supported (VERSION_1 only)")

    # -- teardown ---------------------------------------------------------------------------

    def close(self, pool_timeout: float | None = 1.0) -> None:
        """Stop every ring and release every fd and mapping (idempotent).

        Requests still on the pool after ``pool_timeout`` s (a SETLKW waiting for a lock; the
        session's close wakes it) are dropped: the front-end is gone.
        """
        if self._closed:
            return
        self._closed = True
        for v in self.vrings:
            self._stop_worker(v, pool_timeout)
        for v in self.vrings:
            self._close_ring_fds(v)
            v.queue = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None


def _end_session(session: object) -> None:
    for name in ("close", "destroy"):
        fn = getattr(session, name, None)
        if callable(fn):
            try:
                fn()
            except Exception:
                log.exception("session %s failed", name)
            return


def listen_unix(path: str | os.PathLike[str], mode: int | None = None) -> socket.socket:
    """Bind and listen on a unix socket at ``path`` (what QEMU's ``-chardev socket`` connects
    to). A stale socket there is replaced (virtiofsd does the same); any other file is not.

    The socket is bound under a temporary name and renamed into place once it listens: whoever
    waits for the path to appear (a test harness, libvirt) can connect at once, never getting
    ECONNREFUSED from a socket bound but not yet listening.
    """
    p = Path(path)
    try:
        st = p.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(p))
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if tmp.is_socket():
            tmp.unlink()
        s.bind(str(tmp))
        try:
            if mode is not None:
                os.chmod(tmp, mode)
            s.listen(1)
            os.rename(tmp, p)
        except BaseException:
            tmp.unlink()
            raise
    except BaseException:
        s.close()
        raise
    return s


class VhostUserBackend:
    """Serve a FUSE session over vhost-user on a unix socket (the virtiofsd role).

    ``session_factory()`` makes the FUSE session for each front-end connection (a fresh
    ``Session(fs)``); the listening socket exists as soon as the object does, so a front-end
    may be started right after construction. :meth:`serve_forever` blocks; :meth:`start` runs
    it in a thread; :meth:`close` (any thread) stops serving, ends the current connection
    cleanly and removes the socket. Without ``reconnect`` serving ends when the first
    front-end disconnects.

    ``device_options`` go to :class:`VhostUserFsDevice` (``tag``, ``num_request_queues``,
    ``max_request_queues``, ``features``, ``protocol_features``). Requests are served in each
    queue's thread (Rust virtiofsd's default: a handoff costs a thread wake-up per request),
    except those that may wait without bound (SETLKW), which go to a small pool so that the
    unlock can still be read; ``thread_pool_size > 0`` serves every request on a pool of that
    many threads instead (C virtiofsd's model).
    """

    # DAX hook (issue 5, virtiofs/transport/vhost_user/dax.py): the device class made for each
    # connection; DaxVhostUserBackend swaps in DaxVhostUserFsDevice (SHMEM_MAP/UNMAP).
    device_class: type[VhostUserFsDevice] = VhostUserFsDevice

    def __init__(
        self,
        session_factory: SessionFactory,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        sock: socket.socket | None = None,
        listener: socket.socket | None = None,
        reconnect: bool = False,
        thread_pool_size: int = 0,
        socket_mode: int | None = None,
        **device_options: Any,
    ) -> None:
        if sum(x is not None for x in (socket_path, sock, listener)) != 1:
            raise ValueError("give exactly one of socket_path, sock and listener")
        self.session_factory = session_factory
        self.reconnect = reconnect
        self.device_options = device_options
        self.thread_pool_size = thread_pool_size
        self.connections = 0
        self.history: list[ConnectionStats] = []
        """Stats of every finished connection, oldest first."""
        self.device: VhostUserFsDevice | None = None
        self.connected = threading.Event()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._serving = False
        self._owns_path = False
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self._listener: socket.socket | None = listener
        self._conn_sock: socket.socket | None = sock
        if self.socket_path is not None:
            self._listener = listen_unix(self.socket_path, socket_mode)
            self._owns_path = True
        # Validate device options now rather than at the first connection.
        self.device_class(_NullSession(), **device_options).close()  # DAX hook: device_class

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (any thread, or a signal handler)."""
        self._stopping = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def start(self) -> threading.Thread:
        """Run :meth:`serve_forever` in a daemon thread and return it."""
        t = threading.Thread(target=self.serve_forever, name="virtiofs-vhost-user", daemon=True)
        self._thread = t
        t.start()
        return t

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving, wait (bounded) for :meth:`serve_forever` to return, remove the socket.

        Safe from any thread other than the serving one, and from the serving thread once
        ``serve_forever`` has returned.
        """
        self.stop()
        if self._serving and not self._done.wait(timeout):
            log.error("vhost-user back-end did not stop within %.0f s", timeout)
            return
        self._cleanup()

    def __enter__(self) -> VhostUserBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_connected(self, timeout: float) -> bool:
        """Whether a front-end connected within ``timeout`` seconds."""
        return self.connected.wait(timeout)

    # -- serving ----------------------------------------------------------------------------

    def _wait(self, fd: int, timeout_ms: int = 1000) -> bool:
        """Wait for ``fd`` readable; False when asked to stop."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while not self._stopping:
            ready = {f for f, _ in poller.poll(timeout_ms)}
            if self._stopping or self._stop_r in ready:
                return False
            if fd in ready:
                return True
        return False

    def serve_forever(self) -> None:
        """Serve front-ends until :meth:`stop` (or the first disconnect without reconnect)."""
        self._serving = True
        if self.thread_pool_size > 0:
            pool, pooled = WorkerPool(self.thread_pool_size, name="virtiofs-pool"), ALL
        else:
            pool, pooled = WorkerPool(2, name="virtiofs-pool"), DEFAULT_POOLED
        try:
            while not self._stopping:
                if self._conn_sock is not None:
                    conn, self._conn_sock = self._conn_sock, None
                else:
                    assert self._listener is not None
                    if not self._wait(self._listener.fileno()):
                        break
                    try:
                        conn, _ = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                self.connections += 1
                log.info("front-end connected (#%d)", self.connections)
                self._serve_connection(conn, pool, pooled)
                log.info("front-end disconnected")
                if not self.reconnect or self._listener is None:
                    break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._done.set()

    def _serve_connection(self, conn: socket.socket, pool: Executor,
                          pooled: Collection[int]) -> None:
        chan = VhostUserChannel(conn)
        session = self.session_factory()
        device = self.device_class(session, pool=pool, pooled=pooled,  # DAX hook: device_class
                                   **self.device_options)
        self.device = device
        self.connected.set()
        try:
            while self._wait(chan.fileno()):
                try:
                    msg = chan.recv(timeout=0)
                except TimeoutError:
                    continue
                except VhostUserError as e:
                    log.error("vhost-user framing error, dropping the front-end: %s", e)
                    break
                if msg is None:
                    break
                if not self._dispatch(device, chan, msg):
                    break
        except OSError as e:
            log.error("vhost-user connection failed: %s", e)
        finally:
            device.close()
            self.history.append(device.stats)
            self.device = None
            chan.close()
            _end_session(session)
            self.connected.clear()

    def _dispatch(self, device: VhostUserFsDevice, chan: VhostUserChannel, msg: Message) -> bool:
        """Handle one message and answer it; False to end the connection."""
        name = msg.name()
        log.debug("<- %s flags=%#x size=%d fds=%d", name, msg.flags, len(msg.payload),
                  len(msg.fds))
        has_reply = msg.request in _HAS_REPLY
        known = msg.request in _KNOWN_REQUESTS
        try:
            payload = device.handle(msg)
        except ProtocolError as e:
            if has_reply or not known:
                log.error("%s refused, dropping the front-end: %s", name, e)
                return False
            log.warning("%s refused: %s", name, e)
            if msg.need_reply and device.reply_ack:
                chan.reply_u64(msg, 1)
            return True
        except OSError as e:
            log.error("%s failed: %s", name, e)
            if has_reply:
                return False
            if msg.need_reply and device.reply_ack:
                chan.reply_u64(msg, 1)
            return True
        if has_reply:
            assert payload is not None
            chan.reply(msg, payload)
        elif msg.need_reply and device.reply_ack:
            chan.reply_u64(msg, 0)
        return True

    def _cleanup(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._conn_sock is not None:
            self._conn_sock.close()
            self._conn_sock = None
        if self._owns_path and self.socket_path is not None:
            try:
                if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                    self.socket_path.unlink()
            except OSError:
                pass
            self._owns_path = False
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._stop_r = self._stop_w = -1


class _NullSession:
    def handle(self, request: bytes) -> None:
        return None
