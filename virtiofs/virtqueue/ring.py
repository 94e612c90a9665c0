"""Virtqueue constants, ring layouts and the arithmetic both layouts share.

Sources: virtio spec ``split-ring.tex`` / ``packed-ring.tex`` (SPEC.md 2.3, 2.4), Linux
``include/uapi/linux/virtio_ring.h``, QEMU ``docs/interop/vhost-user.rst`` (vring base encoding).

Memory ordering. Python has no barriers. Both sides store in program order: the driver writes a
descriptor, then the ring entry, then the index (split) or the head's flags (packed); the device
writes the used element, then the used index / flags. For another process on x86 that order is
what it sees: every store here is one ``memcpy`` into the shared mapping done while holding the
GIL (a full compiler barrier: the stores are separate C calls), and x86-TSO makes stores visible
to other cores in program order and never reorders a load with an older load. The same holds for
the reader side (index read before the entries it covers). On weakly ordered CPUs (arm64) this
would need real barriers; the package targets x86-64 Linux.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from virtiofs.errors import GuestMemoryError, VirtqueueError
from virtiofs.virtqueue.memory import GuestAllocator, GuestMemory

__all__ = [
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
    "PackedLayout",
    "SplitLayout",
    "decode_packed_vring_base",
    "encode_packed_vring_base",
    "store_u16",
    "vring_need_event",
]

# Descriptor flags (both layouts; AVAIL/USED are packed only).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15

# Split ring notification suppression flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Packed ring event suppression (struct pvirtq_event_suppress.flags).
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

# Feature bits (content.tex "Reserved Feature Bits").
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

MAX_QUEUE_SIZE = 32768
# Linux vhost get_indirect: "Indirect buffer length too big" past USHRT_MAX + 1 entries.
MAX_INDIRECT_ENTRIES = 65536
# split-ring.tex: the total length of a chain is at most 2^32 (vm-virtio#236 found by fuzzing).
MAX_CHAIN_BYTES = 1 << 32

DESC_SIZE = 16
# struct virtq_desc / pvirtq_desc, little-endian.
SPLIT_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
USED_ELEM = struct.Struct("<II")  # id, len
EVENT_SUPPRESS = struct.Struct("<HH")  # off_wrap / desc, flags


def store_u16(buf: memoryview, offset: int, value: int) -> None:
    """Store a u16 ring field in shared memory with one 2-byte store.

    ``struct.pack_into`` zeroes its destination before writing the fields (CPython
    ``s_pack_internal`` begins with a memset), so a peer process polling a ring index could
    read 0 in between: measured with the loopback transport across two processes, the driver
    read used.idx == 0 every few thousand requests and marked the queue broken. Assigning
    through a memoryview cast to ``H`` is one 2-byte memcpy (a single aligned store on x86-64,
    native byte order = little-endian there). Added by the client/loopback engineer.
    """
    buf[offset:offset + 2].cast("H")[0] = value


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``virtio-queue.h`` vring_need_event: did ``old -> new`` step over ``event_idx``?

    All arithmetic is modulo 2**16, as in C on ``u16``.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def encode_packed_vring_base(avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool) -> int:
    """vhost-user ``SET/GET_VRING_BASE`` ``num`` for a packed ring.

    Bits 0-14 next avail index, bit 15 driver (avail) wrap counter, bits 16-30 next used
    index, bit 31 device (used) wrap counter (QEMU ``virtio_queue_packed_get_last_avail_idx``).
    """
    if not (0 <= avail_idx < 0x8000 and 0 <= used_idx < 0x8000):
        raise ValueError("packed ring indexes are 15-bit")
    return avail_idx | (int(avail_wrap) << 15) | (used_idx << 16) | (int(used_wrap) << 31)


def decode_packed_vring_base(num: int) -> tuple[int, bool, int, bool]:
    """Inverse of :func:`encode_packed_vring_base`: ``(avail_idx, avail_wrap, used_idx, used_wrap)``."""
    return num & 0x7FFF, bool(num & 0x8000), (num >> 16) & 0x7FFF, bool(num & 0x8000_0000)


def _check_area(mem: GuestMemory, what: str, addr: int, length: int, align: int) -> None:
    if addr % align:
        raise VirtqueueError(f"{what} at {addr:#x} is not {align}-byte aligned", field=what)
    try:
        mem.translate(addr, length)
    except GuestMemoryError as e:
        raise VirtqueueError(f"{what} [{addr:#x}, +{length:#x}) is not inside one memory "
                             f"region: {e}", field=what) from None


class SplitLayout(NamedTuple):
    """Where a split virtqueue lives: queue size and the gpa of its three areas.

    vhost-user ``SET_VRING_ADDR`` gives ``desc``, ``avail``, ``used`` as front-end addresses:
    translate them with :meth:`GuestMemory.uaddr_to_gpa` first.
    """

    size: int
    desc: int
    avail: int
    used: int

    @staticmethod
    def area_sizes(size: int, event_idx: bool = True) -> tuple[int, int, int]:
        """Bytes of (descriptor table, avail ring, used ring); the event fields count only with
        EVENT_IDX (Linux vhost ``vhost_get_avail_size``)."""
        extra = 2 if event_idx else 0
        return DESC_SIZE * size, 4 + 2 * size + extra, 4 + 8 * size + extra

    @classmethod
    def place(cls, base: int, size: int, *, align: int = 4096) -> SplitLayout:
        """Lay a queue out from ``base``: table, avail ring right after it, used ring at the next
        ``align`` boundary (the legacy ``vring_size()`` layout; any valid alignment works)."""
        d, a, _ = cls.area_sizes(size)
        avail = base + d
        used = (avail + a + align - 1) // align * align
        return cls(size, base, avail, used)

    @classmethod
    def allocate(cls, allocator: GuestAllocator, size: int, *, align: int = 4096) -> SplitLayout:
        """Reserve room for a queue of ``size`` with ``allocator`` and lay it out there."""
        base = allocator.alloc(cls.place(0, size, align=align).end, align)
        return cls.place(base, size, align=align)

    @property
    def end(self) -> int:
        """First byte after the used ring (event field included)."""
        return self.used + self.area_sizes(self.size)[2]

    def validate(self, mem: GuestMemory, event_idx: bool) -> None:
        """Check size (power of 2, <= 32768), alignments (16/2/4) and that each area lies inside
        one memory region (vm-virtio ``Queue::is_valid``). Raises :class:`VirtqueueError`."""
        s = self.size
        if not (isinstance(s, int) and 0 < s <= MAX_QUEUE_SIZE and s & (s - 1) == 0):
            raise VirtqueueError(f"split queue size {s} is not a power of 2 <= 32768", field="size")
        d, a, u = self.area_sizes(s, event_idx)
        _check_area(mem, "desc", self.desc, d, 16)
        _check_area(mem, "avail", self.avail, a, 2)
        _check_area(mem, "used", self.used, u, 4)


class PackedLayout(NamedTuple):
    """Where a packed virtqueue lives.

    ``driver_event`` is the driver event suppression area (written by the driver, read by the
    device: vhost-user's "avail" address); ``device_event`` is the device area (written by the
    device: vhost-user's "used" address).
    """

    size: int
    desc: int
    driver_event: int
    device_event: int

    @classmethod
    def place(cls, base: int, size: int) -> PackedLayout:
        """Descriptor ring at ``base`` (16-aligned), then the two 4-byte event areas."""
        drv = base + DESC_SIZE * size
        return cls(size, base, drv, drv + 4)

    @classmethod
    def allocate(cls, allocator: GuestAllocator, size: int) -> PackedLayout:
        """Reserve room for a queue of ``size`` with ``allocator`` and lay it out there."""
        return cls.place(allocator.alloc(cls.place(0, size).end, 16), size)

    @property
    def end(self) -> int:
        """First byte after the device event area."""
        return self.device_event + 4

    def validate(self, mem: GuestMemory) -> None:
        """Check size (1..32768; packed sizes need not be powers of 2), alignments (16/4/4) and
        that each area lies inside one memory region. Raises :class:`VirtqueueError`."""
        s = self.size
        if not (isinstance(s, int) and 0 < s <= MAX_QUEUE_SIZE):
            raise VirtqueueError(f"packed queue size {s} is not in 1..32768", field="size")
        _check_area(mem, "desc", self.desc, DESC_SIZE * s, 16)
        _check_area(mem, "driver_event", self.driver_event, 4, 4)
        _check_area(mem, "device_event", self.device_event, 4, 4)
