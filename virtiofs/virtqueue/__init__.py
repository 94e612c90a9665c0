"""Virtqueues over shared memory: split and packed rings, device and driver roles.

Everything here is sans-I/O except the memory mappings and eventfds: a transport (vhost-user
back-end, loopback, client) owns the loop, the sockets and the threads; these objects only read
and write rings in a :class:`GuestMemory`. No queue object is thread-safe: use one thread per
queue or hold a lock around ``pop``/``push`` (``add``/``reap``).

Pieces
------
- :class:`GuestMemory` (``memory.py``): regions ``(gpa, size, fd, mmap_offset, uaddr)``;
  ``allocate(size)`` makes a memfd region at gpa 0 (``mem.fd`` to share it), ``from_fd``/
  ``add_region``/``remove_region`` for a peer's memory (vhost-user ``SET_MEM_TABLE``,
  ``ADD_MEM_REG``), ``translate(gpa, n) -> memoryview`` (one region), ``translate_sg`` (across
  adjacent regions), ``uaddr_to_gpa``, ``read``/``write``. Errors: :class:`GuestMemoryError`.
  :class:`GuestAllocator` places the driver's rings and buffers; :class:`Buffer` is a
  caller-owned ``(addr, length)``.
- :class:`SplitLayout` / :class:`PackedLayout` (``ring.py``): queue size + area addresses,
  ``place(base, size)`` / ``allocate(allocator, size)`` to lay one out, ``validate(mem, ...)``
  (done by every queue).
  Constants (``VIRTQ_DESC_F_*``, feature bits), :func:`vring_need_event`, the packed vhost-user
  base encoding :func:`encode_packed_vring_base` / :func:`decode_packed_vring_base`.
- Device role: :class:`SplitDeviceQueue`, :class:`PackedDeviceQueue` —
  ``pop() -> DescriptorChain | None``, ``pop_many(limit, on_error)``, ``push(chain_or_head,
  written_len=None)``, ``push_many``, ``needs_notification()``, ``disable_notification()``,
  ``enable_notification() -> bool``, ``vring_base`` (vhost-user ``SET/GET_VRING_BASE``),
  ``broken``.
- Driver role: :class:`SplitDriverQueue`, :class:`PackedDriverQueue` —
  ``add(readable, writable, token=None, *, indirect=None, gather=True) -> head``,
  ``needs_kick()``, ``reap(limit=None) -> list[Completion]``, ``has_used()``,
  ``disable_interrupts()``, ``enable_interrupts() -> bool``, ``outstanding_tokens()``.
- :class:`DescriptorChain` (``chain.py``): ``head``, ``readable``/``writable`` memoryview
  lists and their totals; ``read(n)``, ``read_all()``, ``read_views(n)`` (zero copy),
  ``read_fuse_request()``; ``write(data)``, ``writev(bufs)``, ``write_at(off, data)``,
  ``writable_views(length, offset)`` for ``os.preadv`` straight into guest memory,
  ``mark_written(end)``, ``written``.
- :class:`EventFd` (``notify.py``): kick/call eventfds.

Device side (a back-end serving one queue)::

    q = SplitDeviceQueue(mem, SplitLayout(size, desc, avail, used), event_idx=True,
                         indirect=True, next_avail=base)
    while running:
        kick.wait(timeout)
        while True:
            q.disable_notification()
            try:
                chains = q.pop_many(64, on_error=log)   # bad chains already pushed back
            except VirtqueueBrokenError:
                ...stop this queue until it is set up again...
            for c in chains:
                request = c.read_fuse_request()
                c.write(reply)                            # or os.preadv(fd, c.writable_views(...))
                q.push(c)                                 # used len = c.written
            if q.needs_notification():
                call.write(1)
            if not q.enable_notification():
                break

Driver side (a client)::

    mem = GuestMemory.allocate(1 << 24)
    alloc = GuestAllocator(mem, 0, mem.size)
    layout = SplitLayout.allocate(alloc, 256)     # rings; buffers come from alloc too
    q = SplitDriverQueue(mem, layout, alloc, event_idx=True)
    q.add([request_bytes], [reply_capacity], token=unique)
    if q.needs_kick():
        kick.write(1)
    for c in q.reap():        # after call.wait()
        c.token, c.length, c.data, c.error

Two processes share one queue by sharing the memfd (``mem.fd`` via ``pass_fds`` or
``SCM_RIGHTS``; the peer does ``GuestMemory.from_fd(fd, size)``), the layout addresses, and the
two eventfds.

Errors: peer misbehaviour raises :class:`~virtiofs.errors.DescriptorChainError` (one chain,
carries ``head``), :class:`~virtiofs.errors.VirtqueueBrokenError` (the queue is dead) or
:class:`~virtiofs.errors.GuestMemoryError` / :class:`~virtiofs.errors.VirtqueueError` (setup);
misuse by our caller raises :class:`~virtiofs.errors.LocalProtocolError`.
"""

from virtiofs.virtqueue.chain import FUSE_IN_HEADER_SIZE, DescriptorChain
from virtiofs.virtqueue.driver import Completion
from virtiofs.virtqueue.memory import Buffer, GuestAllocator, GuestMemory, MemoryRegion
from virtiofs.virtqueue.notify import EventFd
from virtiofs.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from virtiofs.virtqueue.ring import (
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_ENTRIES,
    MAX_QUEUE_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    PackedLayout,
    SplitLayout,
    decode_packed_vring_base,
    encode_packed_vring_base,
    vring_need_event,
)
from virtiofs.virtqueue.split import SplitDeviceQueue, SplitDriverQueue

__all__ = [
    "FUSE_IN_HEADER_SIZE",
    "MAX_CHAIN_BYTES",
    "MAX_INDIRECT_ENTRIES",
    "MAX_QUEUE_SIZE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "VIRTIO_F_IN_ORDER",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_USED",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Buffer",
    "Completion",
    "DescriptorChain",
    "EventFd",
    "GuestAllocator",
    "GuestMemory",
    "MemoryRegion",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "PackedLayout",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "SplitLayout",
    "decode_packed_vring_base",
    "encode_packed_vring_base",
    "vring_need_event",
]
