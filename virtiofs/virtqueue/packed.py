"""Packed virtqueues (virtio spec ``packed-ring.tex``, SPEC.md 2.4): device and driver roles.

One ring of 16-byte descriptors ``{le64 addr; le32 len; le16 id; le16 flags}`` shared both ways.
Each side keeps a position and a 1-bit wrap counter starting at 1. A descriptor is available
when its AVAIL bit equals the driver's wrap counter and its USED bit differs; used when both
equal the device's counter. The buffer id is in the last descriptor of a chain; the device
writes one used descriptor per chain (at its own used position) and both sides then skip the
chain's descriptor count. The driver writes the head's flags last so a chain is never seen
half-written; both sides read a descriptor's flags before the rest of it.

Field access: ``struct`` on memoryviews, like ``split.py`` (figures there).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

from virtiofs.errors import (
    DescriptorChainError,
    GuestMemoryError,
    LocalProtocolError,
    VirtqueueBrokenError,
    VirtqueueError,
)
from virtiofs.virtqueue.chain import DescriptorChain
from virtiofs.virtqueue.driver import (
    Completion,
    ReadableItem,
    WritableItem,
    _DriverBuffers,
    _Pending,
)
from virtiofs.virtqueue.memory import GuestAllocator, GuestMemory
from virtiofs.virtqueue.ring import (
    EVENT_SUPPRESS,
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_ENTRIES,
    PACKED_DESC,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    U16,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    PackedLayout,
    decode_packed_vring_base,
    encode_packed_vring_base,
    store_u16,
    vring_need_event,
)

__all__ = ["PackedDeviceQueue", "PackedDriverQueue"]

_unpack_desc = PACKED_DESC.unpack_from
_pack_desc = PACKED_DESC.pack_into
_unpack_u16 = U16.unpack_from
_pack_u16 = store_u16  # not U16.pack_into: see ring.store_u16
_unpack_event = EVENT_SUPPRESS.unpack_from
_pack_event = EVENT_SUPPRESS.pack_into
_AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
# A used descriptor's {len, id} (and a head's {addr, len, id}) go in one store before its flags.
_LEN_ID = struct.Struct("<IH")
_ADDR_LEN_ID = struct.Struct("<QIH")

ChainOrId = DescriptorChain | int


def _avail_bits(wrap: bool) -> int:
    """Flags marking a descriptor available for a driver wrap counter ``wrap``."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


class PackedDeviceQueue:
    """The device side of a packed virtqueue: pop available chains, push used ones.

    Same contract as :class:`~virtiofs.virtqueue.split.SplitDeviceQueue` (serving loop, errors,
    broken state); ``DescriptorChain.head`` is the buffer id. ``vring_base`` is the vhost-user
    encoding (bits 0-14 next avail, 15 avail wrap, 16-30 next used, 31 used wrap); the default
    is a fresh ring (positions 0, wrap counters 1).

    A chain whose end cannot be found (it runs into a descriptor that is not available, or is
    longer than the ring) leaves no id to return, so it breaks the queue; a chain with a known id
    but bad contents raises :class:`DescriptorChainError` (push its id with length 0). Entries of
    an indirect table may carry only WRITE (NEXT is ignored, as the spec says; INDIRECT is
    refused as nesting).
    """

    def __init__(
        self,
        mem: GuestMemory,
        layout: PackedLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        vring_base: int | None = None,
    ) -> None:
        layout.validate(mem)
        self.mem = mem
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc = mem.translate(layout.desc, 16 * layout.size)
        self._drv_event = mem.translate(layout.driver_event, 4)
        self._dev_event = mem.translate(layout.device_event, 4)
        self._next_avail = 0
        self._avail_wrap = True
        self._next_used = 0
        self._used_wrap = True
        self._inflight: dict[int, int] = {}
        self._pushes = 0
        self._checked_pushes = 0
        self._signalled: int | None = None
        self.broken = False
        self.broken_reason: str | None = None
        if vring_base is not None:
            self.vring_base = vring_base

    def __repr__(self) -> str:
        return (f"PackedDeviceQueue(size={self.size}, avail={self._next_avail}/"
                f"{int(self._avail_wrap)}, used={self._next_used}/{int(self._used_wrap)}, "
                f"inflight={len(self._inflight)}{', BROKEN' if self.broken else ''})")

    @property
    def vring_base(self) -> int:
        """vhost-user ``GET_VRING_BASE`` ``num`` (see :func:`encode_packed_vring_base`)."""
        return encode_packed_vring_base(
            self._next_avail, self._avail_wrap, self._next_used, self._used_wrap)

    @vring_base.setter
    def vring_base(self, num: int) -> None:
        a, aw, u, uw = decode_packed_vring_base(num)
        if a >= self.size or u >= self.size:
            # The value comes from the front-end (SET_VRING_BASE): a peer error.
            raise VirtqueueError(f"vring base {num:#x} outside a ring of {self.size}",
                                 field="vring_base")
        self._next_avail, self._avail_wrap, self._next_used, self._used_wrap = a, aw, u, uw
        self._signalled = None

    @property
    def next_avail(self) -> tuple[int, bool]:
        """(position, wrap counter) of the next descriptor to pop."""
        return self._next_avail, self._avail_wrap

    @property
    def next_used(self) -> tuple[int, bool]:
        """(position, wrap counter) of the next used descriptor to write."""
        return self._next_used, self._used_wrap

    @property
    def inflight(self) -> int:
        """Chains popped and not yet pushed."""
        return len(self._inflight)

    def _break(self, reason: str) -> VirtqueueBrokenError:
        self.broken = True
        self.broken_reason = reason
        return VirtqueueBrokenError(reason)

    def _is_avail(self, pos: int, wrap: bool) -> bool:
        flags = _unpack_u16(self._desc, (pos << 4) + 14)[0]
        return bool((flags & _AVAIL_USED) == _avail_bits(wrap))

    def has_available(self) -> bool:
        """Whether the descriptor at the device's position is available."""
        return not self.broken and self._is_avail(self._next_avail, self._avail_wrap)

    # -- popping ------------------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when there is none (or the queue is broken)."""
        if self.broken:
            return None
        desc = self._desc
        pos = self._next_avail
        wrap = self._avail_wrap
        want = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
        if (_unpack_u16(desc, (pos << 4) + 14)[0] & _AVAIL_USED) != want:
            return None
        size = self.size
        if len(self._inflight) >= size:
            raise self._break(f"more than {size} chains in flight")
        # Guest-memory fast path inlined, as in SplitDeviceQueue.pop.
        hot_base, hot_size, hot_view = self.mem._hot
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        wseen = False
        n = 0
        while True:
            # One copy of the descriptor, used for everything (TOCTOU).
            addr, ln, bid, flags = _unpack_desc(desc, pos << 4)
            if n and (flags & _AVAIL_USED) != want:
                raise self._break(
                    f"chain at {self._next_avail} runs into descriptor {pos}, not available")
            n += 1
            pos += 1
            if pos == size:
                pos = 0
                wrap = not wrap
                want = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
            try:
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if flags & VIRTQ_DESC_F_NEXT:
                        raise _ChainFault("descriptor has both INDIRECT and NEXT", "flags")
                    rlen, wlen = self._walk_indirect(addr, ln, readable, writable, rlen, wlen,
                                                     wseen)
                elif flags & VIRTQ_DESC_F_WRITE:
                    wseen = True
                    if ln:
                        off = addr - hot_base
                        if 0 <= off <= hot_size - ln:
                            writable.append(hot_view[off:off + ln])
                        else:
                            writable += self._translate(addr, ln)
                        wlen += ln
                else:
                    if wseen:
                        raise _ChainFault("readable descriptor after a writable one", "flags")
                    if ln:
                        off = addr - hot_base
                        if 0 <= off <= hot_size - ln:
                            readable.append(hot_view[off:off + ln])
                        else:
                            readable += self._translate(addr, ln)
                        rlen += ln
            except _ChainFault as fault:
                self._skip_bad_chain(pos, wrap, n, flags, bid, fault)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if n >= size:
                raise self._break(f"chain at {self._next_avail} is longer than the ring")
        inflight = self._inflight
        if bid in inflight:
            raise self._break(f"buffer id {bid} made available while in flight")
        inflight[bid] = n
        self._next_avail = pos
        self._avail_wrap = wrap
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise DescriptorChainError(
                f"chain of {rlen + wlen} bytes exceeds 2**32", head=bid, field="len")
        return DescriptorChain(bid, readable, writable, rlen, wlen, n)

    def _translate(self, addr: int, ln: int) -> list[memoryview]:
        try:
            return self.mem.translate_sg(addr, ln)
        except GuestMemoryError as e:
            raise _ChainFault(f"descriptor buffer: {e.what}", "addr") from None

    def _skip_bad_chain(
        self, pos: int, wrap: bool, n: int, flags: int, bid: int, fault: _ChainFault
    ) -> NoReturn:
        """A defect was found at descriptor ``n`` of the chain: find the chain's end (and so its
        buffer id, which the used descriptor must carry), consume it, raise the chain error."""
        desc = self._desc
        size = self.size
        want = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
        while flags & VIRTQ_DESC_F_NEXT:
            if n >= size:
                raise self._break(f"chain at {self._next_avail} is longer than the ring")
            _addr, _ln, bid, flags = _unpack_desc(desc, pos << 4)
            if (flags & _AVAIL_USED) != want:
                raise self._break(
                    f"chain at {self._next_avail} runs into descriptor {pos}, not available")
            n += 1
            pos += 1
            if pos == size:
                pos = 0
                wrap = not wrap
                want = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
        if bid in self._inflight:
            raise self._break(f"buffer id {bid} made available while in flight")
        self._inflight[bid] = n
        self._next_avail = pos
        self._avail_wrap = wrap
        raise DescriptorChainError(fault.args[0], head=bid, field=fault.args[1])

    def _walk_indirect(
        self, addr: int, ln: int, readable: list[memoryview], writable: list[memoryview],
        rlen: int, wlen: int, wseen: bool,
    ) -> tuple[int, int]:
        if not self.indirect:
            raise _ChainFault("INDIRECT descriptor without VIRTIO_RING_F_INDIRECT_DESC", "flags")
        if ln == 0 or ln % 16:
            raise _ChainFault(f"indirect table length {ln} is not a non-zero multiple of 16",
                              "len")
        n = ln >> 4
        if n > MAX_INDIRECT_ENTRIES:
            raise _ChainFault(f"indirect table of {n} entries (max {MAX_INDIRECT_ENTRIES})", "len")
        try:
            views = self.mem.translate_sg(addr, ln)
        except GuestMemoryError as e:
            raise _ChainFault(f"indirect table: {e.what}", "addr") from None
        table = views[0] if len(views) == 1 else memoryview(b"".join(views))
        translate_sg = self.mem.translate_sg
        for j in range(n):
            a, blen, _bid, f = _unpack_desc(table, j << 4)
            if f & VIRTQ_DESC_F_INDIRECT:
                raise _ChainFault("nested indirect descriptor", "flags")
            if f & VIRTQ_DESC_F_WRITE:
                wseen = True
                if blen:
                    try:
                        writable += translate_sg(a, blen)
                    except GuestMemoryError as e:
                        raise _ChainFault(f"indirect entry {j} buffer: {e.what}", "addr") from None
                    wlen += blen
            else:
                if wseen:
                    raise _ChainFault("readable descriptor after a writable one", "flags")
                if blen:
                    try:
                        readable += translate_sg(a, blen)
                    except GuestMemoryError as e:
                        raise _ChainFault(f"indirect entry {j} buffer: {e.what}", "addr") from None
                    rlen += blen
        return rlen, wlen

    def pop_many(
        self, limit: int, on_error: Callable[[DescriptorChainError], object] | None = None
    ) -> list[DescriptorChain]:
        """Pop up to ``limit`` chains; bad chains are pushed back at once with length 0 and
        passed to ``on_error(err)`` when given; a broken ring raises."""
        out: list[DescriptorChain] = []
        while len(out) < limit:
            try:
                chain = self.pop()
            except DescriptorChainError as e:
                self.push(e.head, 0)
                if on_error is not None:
                    on_error(e)
                continue
            if chain is None:
                break
            out.append(chain)
        return out

    # -- pushing ------------------------------------------------------------------------------

    def push(self, item: ChainOrId, written_len: int | None = None) -> None:
        """Return a chain (or the id of a :class:`DescriptorChainError`) with ``written_len``
        bytes written (default ``chain.written``). Any order; the used descriptor's id and
        length are stored before its flags."""
        if self.broken:
            return
        if isinstance(item, DescriptorChain):
            bid = item.head
            if written_len is None:
                written_len = item.written
            elif written_len > item.writable_len:
                raise LocalProtocolError(
                    f"used length {written_len} > the chain's {item.writable_len} writable bytes")
        else:
            bid = item
            if written_len is None:
                raise LocalProtocolError("push(id) needs written_len")
        if not 0 <= written_len <= 0xFFFF_FFFF:
            raise LocalProtocolError(f"used length {written_len} is not a u32")
        ndesc = self._inflight.pop(bid, None)
        if ndesc is None:
            raise LocalProtocolError(f"buffer id {bid} is not in flight")
        pos = self._next_used
        wrap = self._used_wrap
        off = pos << 4
        desc = self._desc
        _LEN_ID.pack_into(desc, off + 8, written_len, bid)
        _pack_u16(desc, off + 14,
                  (_AVAIL_USED if wrap else 0) | (VIRTQ_DESC_F_WRITE if written_len else 0))
        pos += ndesc
        if pos >= self.size:
            pos -= self.size
            self._used_wrap = not wrap
        self._next_used = pos
        self._pushes += 1

    def push_many(self, items: Iterable[tuple[ChainOrId, int | None]]) -> None:
        """Push several chains."""
        for item, n in items:
            self.push(item, n)

    # -- notifications ------------------------------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether to signal the driver for what was pushed since the last check (QEMU
        ``virtio_packed_should_notify``: the driver event suppression area decides)."""
        if self.broken or self._pushes == self._checked_pushes:
            return False
        self._checked_pushes = self._pushes
        off_wrap, flags = _unpack_event(self._drv_event, 0)
        new = self._next_used
        old, self._signalled = self._signalled, new
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx or old is None:
            return True
        off = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self._used_wrap:
            off -= self.size
        return vring_need_event(off, new, old)

    def disable_notification(self) -> None:
        """Ask the driver not to kick (device event suppression flags = DISABLE)."""
        if not self.broken:
            _pack_event(self._dev_event, 0, 0, RING_EVENT_FLAGS_DISABLE)

    def enable_notification(self) -> bool:
        """Ask for kicks again (at our position with EVENT_IDX); returns True if a chain is
        available already."""
        if self.broken:
            return False
        if self.event_idx:
            _pack_event(self._dev_event, 0,
                        self._next_avail | (int(self._avail_wrap) << 15), RING_EVENT_FLAGS_DESC)
        else:
            _pack_event(self._dev_event, 0, 0, RING_EVENT_FLAGS_ENABLE)
        return self._is_avail(self._next_avail, self._avail_wrap)


class _ChainFault(Exception):
    """Internal: a chain defect found while the chain's end (and id) is still unknown."""


class PackedDriverQueue(_DriverBuffers):
    """The driver side of a packed virtqueue: add chains, kick, reap completions.

    Same contract as :class:`~virtiofs.virtqueue.split.SplitDriverQueue`; ``add`` returns the
    buffer id. Ids are taken from a free list, descriptors in ring order.
    """

    def __init__(
        self,
        mem: GuestMemory,
        layout: PackedLayout,
        allocator: GuestAllocator | None = None,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        use_indirect: bool = False,
        reset: bool = True,
    ) -> None:
        layout.validate(mem)
        if use_indirect and not indirect:
            raise LocalProtocolError("use_indirect needs the indirect feature")
        self.mem = mem
        self.allocator = allocator
        self.layout = layout
        self.size = size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        self.use_indirect = use_indirect
        if reset:
            mem.fill(layout.desc, 16 * size)
            mem.fill(layout.driver_event, 4)
            mem.fill(layout.device_event, 4)
        self._desc = mem.translate(layout.desc, 16 * size)
        self._drv_event = mem.translate(layout.driver_event, 4)
        self._dev_event = mem.translate(layout.device_event, 4)
        self._next_avail = 0
        self._avail_wrap = True
        self._last_used = 0
        self._used_wrap = True
        self._num_free = size
        self._free_ids = list(range(size - 1, -1, -1))
        self._num_added = 0
        self._pending: dict[int, _Pending] = {}
        self.broken = False
        self.broken_reason: str | None = None

    def __repr__(self) -> str:
        return (f"PackedDriverQueue(size={self.size}, outstanding={len(self._pending)}, "
                f"free={self._num_free}{', BROKEN' if self.broken else ''})")

    @property
    def num_free(self) -> int:
        """Free descriptor slots."""
        return self._num_free

    @property
    def outstanding(self) -> int:
        """Chains added and not yet reaped."""
        return len(self._pending)

    def outstanding_tokens(self) -> list[object]:
        """Tokens of the chains not reaped yet."""
        return [p.token for p in self._pending.values()]

    def add(
        self,
        readable: Sequence[ReadableItem] = (),
        writable: Sequence[WritableItem] = (),
        token: object = None,
        *,
        indirect: bool | None = None,
        gather: bool = True,
    ) -> int:
        """Make a chain available; returns its buffer id (see ``SplitDriverQueue.add``)."""
        if self.broken:
            raise VirtqueueBrokenError(self.broken_reason or "queue broken")
        segs, owned, wsegs, wlen = self._stage(readable, writable)
        n = len(segs)
        use_ind = (self.use_indirect and n > 1) if indirect is None else indirect
        if use_ind and not self.indirect:
            self._release(owned)
            raise LocalProtocolError("indirect descriptors were not negotiated")
        ndesc = 1 if use_ind else n
        if ndesc > self._num_free or not self._free_ids:
            self._release(owned)
            raise LocalProtocolError(f"queue full: {ndesc} descriptors wanted, "
                                     f"{self._num_free} free")
        if use_ind:
            if n > MAX_INDIRECT_ENTRIES:
                self._release(owned)
                raise LocalProtocolError("indirect table too big")
            table = self._alloc(16 * n, owned)
            tbl = self.mem.translate(table, 16 * n)
            for k, (addr, ln, w) in enumerate(segs):
                _pack_desc(tbl, k << 4, addr, ln, 0, VIRTQ_DESC_F_WRITE if w else 0)
            ring = [(table, 16 * n, VIRTQ_DESC_F_INDIRECT)]
        else:
            ring = [(a, ln, VIRTQ_DESC_F_WRITE if w else 0) for a, ln, w in segs]
        bid = self._free_ids.pop()
        desc = self._desc
        size = self.size
        head_pos = self._next_avail
        head_wrap = self._avail_wrap
        pos, wrap = head_pos, head_wrap
        last = ndesc - 1
        head_flags = 0
        for k, (addr, ln, f) in enumerate(ring):
            flags = f | (VIRTQ_DESC_F_NEXT if k < last else 0) | _avail_bits(wrap)
            if k == 0:
                head_flags = flags
                _ADDR_LEN_ID.pack_into(desc, pos << 4, addr, ln, bid)
            else:
                _pack_desc(desc, pos << 4, addr, ln, bid, flags)
            pos += 1
            if pos == size:
                pos = 0
                wrap = not wrap
        # The head's flags last: the device sees the whole chain or none of it.
        _pack_u16(desc, (head_pos << 4) + 14, head_flags)
        self._next_avail = pos
        self._avail_wrap = wrap
        self._num_free -= ndesc
        self._num_added += ndesc
        self._pending[bid] = _Pending(
            bid if token is None else token, [], ndesc, owned, wsegs, wlen, gather)
        return bid

    def needs_kick(self) -> bool:
        """Whether the device wants a kick for what was added since the last call (Linux
        ``virtqueue_kick_prepare_packed``)."""
        added, self._num_added = self._num_added, 0
        if not added or self.broken:
            return False
        off_wrap, flags = _unpack_event(self._dev_event, 0)
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return bool(flags != RING_EVENT_FLAGS_DISABLE)
        new = self._next_avail
        old = new - added
        event = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self._avail_wrap:
            event -= self.size
        return vring_need_event(event, new, old)

    def has_used(self) -> bool:
        """Whether the descriptor at the driver's used position has been used."""
        flags = _unpack_u16(self._desc, (self._last_used << 4) + 14)[0]
        return bool((flags & _AVAIL_USED) == (_AVAIL_USED if self._used_wrap else 0))

    def reap(self, limit: int | None = None) -> list[Completion]:
        """Take the chains the device has returned, in used-ring order (see
        ``SplitDriverQueue.reap``)."""
        if self.broken:
            raise VirtqueueBrokenError(self.broken_reason or "queue broken")
        out: list[Completion] = []
        desc = self._desc
        pending = self._pending
        size = self.size
        while limit is None or len(out) < limit:
            off = self._last_used << 4
            flags = _unpack_u16(desc, off + 14)[0]
            if (flags & _AVAIL_USED) != (_AVAIL_USED if self._used_wrap else 0):
                break
            ln, bid = _LEN_ID.unpack_from(desc, off + 8)
            p = pending.pop(bid, None)
            if p is None:
                self.broken = True
                self.broken_reason = f"used buffer id {bid} is not outstanding"
                if not out:
                    raise VirtqueueBrokenError(self.broken_reason)
                break
            pos = self._last_used + p.ndesc
            if pos >= size:
                pos -= size
                self._used_wrap = not self._used_wrap
            self._last_used = pos
            self._num_free += p.ndesc
            self._free_ids.append(bid)
            out.append(self._complete(p, bid, ln))
        return out

    def disable_interrupts(self) -> None:
        """Ask the device not to signal (driver event suppression flags = DISABLE)."""
        _pack_event(self._drv_event, 0, 0, RING_EVENT_FLAGS_DISABLE)

    def enable_interrupts(self) -> bool:
        """Ask for a signal at the next used chain; True if one is there already."""
        if self.event_idx:
            _pack_event(self._drv_event, 0,
                        self._last_used | (int(self._used_wrap) << 15), RING_EVENT_FLAGS_DESC)
        else:
            _pack_event(self._drv_event, 0, 0, RING_EVENT_FLAGS_ENABLE)
        return self.has_used()
