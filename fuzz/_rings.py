"""Hostile rings for the split and packed virtqueue targets (SECURITY.md B2, B6 items 11, 12, 17).

Input layout (after the target's own selector handling)::

    byte 0      bits 0-2 log2(queue size), bit 3 EVENT_IDX, bit 4 INDIRECT_DESC,
                bit 5 driver mode (a hostile *device*: the bytes are the used ring),
                bit 6 second pass, bit 7 an odd packed size (size - 1)
    ring        the driver-written areas, byte for byte: split = descriptor table + avail ring,
                packed = descriptor ring + driver event area (driver mode: the device-written
                areas: split used ring, packed descriptor ring + device event area)
    u16 n, n bytes   written at DATA (indirect tables, buffers)
    rest        second pass: patches (u16 offset, u8 length, bytes) into the first 64 KiB,
                then the queue is popped (or reaped) again: descriptors rewritten after they
                were validated, avail index jumps, used ids replayed

Memory: region A [0, 64 KiB), region B [64 KiB, 68 KiB) right after it (buffers that cross a
region boundary), region C [1 MiB, 1 MiB + 4 KiB) behind a hole.  Import inside
``instrumented()``.
"""

from __future__ import annotations

import struct
from typing import Any

from _harness import check

from virtiofs.errors import LocalProtocolError, ProtocolError
from virtiofs.virtqueue import (
    MAX_CHAIN_BYTES,
    GuestAllocator,
    GuestMemory,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
)

A_SIZE = 0x10000
DATA = 0x3000
RING_MAX = 0x3000
U16 = struct.Struct("<H")

_MEM: GuestMemory | None = None


def memory() -> GuestMemory:
    """The fuzzing memory (created once; region A is cleared before every input)."""
    global _MEM
    if _MEM is None:
        mem = GuestMemory.allocate(A_SIZE)
        mem.allocate_region(A_SIZE, 0x1000)
        mem.allocate_region(0x100000, 0x1000)
        _MEM = mem
    return _MEM


def layout(kind: str, size: int, event_idx: bool) -> Any:
    if kind == "split":
        return SplitLayout(size, 0, 0x1000, 0x2000)
    return PackedLayout(size, 0, 0x1000 + 16 * 0, 0x1000 + 4)


def _areas(kind: str, lay: Any, event_idx: bool, driver_mode: bool) -> list[tuple[int, int]]:
    """(gpa, length) of the areas the hostile side writes, in input order."""
    size = lay.size
    if kind == "split":
        d, a, u = SplitLayout.area_sizes(size, event_idx)
        return [(lay.used, u)] if driver_mode else [(lay.desc, d), (lay.avail, a)]
    if driver_mode:
        return [(lay.desc, 16 * size), (lay.device_event, 4)]
    return [(lay.desc, 16 * size), (lay.driver_event, 4)]


def _apply_patches(mem: GuestMemory, rest: bytes) -> None:
    pos = 0
    # Each patch consumes >= 3 bytes: bounded by len(rest) / 3.
    while len(rest) - pos >= 3:
        off = U16.unpack_from(rest, pos)[0] % A_SIZE
        n = rest[pos + 2]
        chunk = rest[pos + 3:pos + 3 + n]
        pos += 3 + n
        chunk = chunk[:A_SIZE - off]
        if chunk:
            mem.write(off, chunk)


def _check_chain(chain: Any, size: int) -> None:
    r = sum(len(v) for v in chain.readable)
    w = sum(len(v) for v in chain.writable)
    check(r == chain.readable_len and w == chain.writable_len,
          "chain view lengths differ from its totals")
    check(r + w <= MAX_CHAIN_BYTES, "chain longer than 2**32 accepted")
    check(0 <= chain.head < size or chain.head < 1 << 16, "chain head out of range")


def run_device(kind: str, data: bytes) -> None:
    """Pop (and push) everything a hostile driver offers; the device must survive."""
    sel = data[0]
    size = 1 << (sel & 7)
    if kind == "packed" and sel & 0x80 and size > 2:
        size -= 1  # packed rings need not be powers of 2
    event_idx = bool(sel & 8)
    indirect = bool(sel & 16)
    mem = memory()
    mem.fill(0, A_SIZE)
    lay = layout(kind, size, event_idx)
    pos = 1
    for gpa, n in _areas(kind, lay, event_idx, False):
        chunk = data[pos:pos + n]
        mem.write(gpa, chunk)
        pos += n
    dlen = U16.unpack_from(data, pos)[0] if len(data) - pos >= 2 else 0
    pos += 2
    chunk = data[pos:pos + min(dlen, A_SIZE - DATA)]
    mem.write(DATA, chunk)
    pos += len(chunk)
    rest = data[pos:]
    cls = SplitDeviceQueue if kind == "split" else PackedDeviceQueue
    q = cls(mem, lay, event_idx=event_idx, indirect=indirect)
    passes = 2 if sel & 0x40 else 1
    for p in range(passes):
        if p:
            _apply_patches(mem, rest)
        errors: list[ProtocolError] = []
        # pop_many pushes bad chains back itself (cloud-hypervisor#8401); the ring-level
        # VirtqueueBrokenError propagates (allowed) and the queue must stay dead afterwards.
        try:
            chains = q.pop_many(4 * size + 4, on_error=errors.append)
        except ProtocolError:
            check(q.broken, "a ring-level error left the queue usable")
            check(q.pop() is None, "a broken queue still pops")
            raise
        check(len(chains) + len(errors) <= size, f"{len(chains) + len(errors)} chains popped "
              f"from a ring of {size} in one pass")
        check(q.inflight <= size, "more chains in flight than the ring holds")
        for c in chains:
            _check_chain(c, size)
            if c.writable_len:
                c.write(b"R" * min(c.writable_len, 64))
        for c in chains:
            q.push(c)
        q.needs_notification()
        q.enable_notification()


def run_driver(kind: str, data: bytes) -> None:
    """Our driver facing a hostile device: forged/replayed used ids, over-reported lengths."""
    sel = data[0]
    size = 1 << max(1, sel & 7)
    event_idx = bool(sel & 8)
    mem = memory()
    mem.fill(0, A_SIZE)
    lay = layout(kind, size, event_idx)
    alloc = GuestAllocator(mem, DATA, A_SIZE - DATA)
    cls = SplitDriverQueue if kind == "split" else PackedDriverQueue
    drv = cls(mem, lay, alloc, event_idx=event_idx, indirect=True,
              use_indirect=bool(sel & 16))
    tokens = set()
    for k in range(min(size, 4)):
        try:
            drv.add([b"request %d" % k], [32], token=("t", k))
        except LocalProtocolError:
            break
        tokens.add(("t", k))
    pos = 1
    areas = _areas(kind, lay, event_idx, True)
    passes = 2 if sel & 0x40 else 1
    seen: set[Any] = set()
    for _ in range(passes):
        for gpa, n in areas:
            chunk = data[pos:pos + n]
            mem.write(gpa, chunk)
            pos += n
        for c in drv.reap():
            check(c.token in tokens, f"completion for a token never added: {c.token!r}")
            check(c.token not in seen, f"token {c.token!r} completed twice")
            seen.add(c.token)
            check(c.error is not None or c.length <= 32, "used.len over the lent bytes "
                  "accepted")
            check(len(c.data) <= 32, "completion data longer than the buffer")


def seeds(kind: str) -> list[bytes]:
    """Rings our own driver writes (direct, indirect, several chains), in the input format."""
    out = []
    mem = GuestMemory.allocate(A_SIZE)
    try:
        for log2 in (0, 2, 3):
            for ind in (False, True):
                for event_idx in (False, True):
                    size = 1 << log2
                    mem.fill(0, A_SIZE)
                    lay = layout(kind, size, event_idx)
                    alloc = GuestAllocator(mem, DATA, A_SIZE - DATA)
                    cls = SplitDriverQueue if kind == "split" else PackedDriverQueue
                    drv = cls(mem, lay, alloc, event_idx=event_idx, indirect=True,
                              use_indirect=ind)
                    for k in range(size):
                        try:
                            drv.add([b"in header %d" % k, b"body"], [40, 4096 + k])
                        except LocalProtocolError:
                            break
                    sel = log2 | (8 if event_idx else 0) | (16 if ind or True else 0)
                    body = b"".join(mem.read(gpa, n)
                                    for gpa, n in _areas(kind, lay, event_idx, False))
                    blob = mem.read(DATA, 0x400)
                    out.append(bytes([sel]) + body + U16.pack(len(blob)) + blob)
                    out.append(bytes([sel | 0x40]) + body + U16.pack(len(blob)) + blob
                               + U16.pack(0x1002) + b"\x02\xff\x00")
                    # Driver mode: a device answering every head once, in order.
                    used = bytearray()
                    if kind == "split":
                        used += U16.pack(0) + U16.pack(size)
                        for k in range(size):
                            used += struct.pack("<II", k, 8)
                        used += bytes(2)
                    else:
                        for k in range(size):
                            used += struct.pack("<QIHH", 0, 8, k, 0x8080 if True else 0)
                        used += bytes(4)
                    out.append(bytes([log2 | 0x20 | (8 if event_idx else 0)]) + bytes(used))
    finally:
        mem.close()
    return out


def one_input(kind: str, data: bytes) -> None:
    if not data:
        return
    if data[0] & 0x20:
        run_driver(kind, data)
    else:
        run_device(kind, data)
