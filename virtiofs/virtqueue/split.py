"""Split virtqueues (virtio spec ``split-ring.tex``, SPEC.md 2.3): device and driver roles.

Ring fields are read and written with precompiled ``struct`` objects on memoryviews of the
mapping. Measured on this machine (Python 3.11, ``benchmarks/virtqueue.py --fields``):
``Struct("<QIHH").unpack_from`` of a descriptor 147 ns against 300 ns for the same four fields
through a ``cffi`` ``struct vring_desc[]`` view (``ffi.from_buffer``); a used element
``pack_into`` 73 ns against 199 ns; only a lone u16 is quicker through cffi (43 vs 80 ns read,
61 vs 68 ns write), not enough to carry a second access path: struct it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from virtiofs.errors import (
    DescriptorChainError,
    GuestMemoryError,
    LocalProtocolError,
    VirtqueueBrokenError,
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
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_ENTRIES,
    SPLIT_DESC,
    U16,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    SplitLayout,
    store_u16,
    vring_need_event,
)

__all__ = ["SplitDeviceQueue", "SplitDriverQueue"]

_unpack_desc = SPLIT_DESC.unpack_from
_pack_desc = SPLIT_DESC.pack_into
_unpack_u16 = U16.unpack_from
_pack_u16 = store_u16  # not U16.pack_into: see ring.store_u16
_unpack_elem = USED_ELEM.unpack_from
_pack_elem = USED_ELEM.pack_into

ChainOrHead = DescriptorChain | int


class SplitDeviceQueue:
    """The device side of a split virtqueue: pop available chains, push used ones.

    ``layout`` is validated here (size a power of 2 <= 32768, alignments 16/2/4, each area inside
    one region; :class:`VirtqueueError` otherwise). ``next_avail`` is the vhost-user
    ``SET_VRING_BASE`` value; ``next_used`` defaults to the used ring's ``idx`` in memory (what
    libvhost-user does when a back-end takes over a running ring).

    Serving loop (vhost's notification protocol; one thread per queue, or a lock)::

        while True:
            kick.wait(timeout)                     # the driver kicked (or a timeout)
            while True:
                q.disable_notification()
                for chain in q.pop_many(64, on_error=log): ...serve, q.push(chain, n)...
                if q.needs_notification(): call.write(1)
                if not q.enable_notification():  # False: nothing arrived meanwhile
                    break

    Hostile-driver rules (SECURITY.md B2): heads and ``next`` < size, at most ``size`` steps per
    table, indirect tables of 16-byte multiples, non-empty, <= 65536 entries, not nested, never
    with NEXT, inside memory; total length <= 2**32; no readable after writable; every
    descriptor copied once and only the copy used. A bad chain raises
    :class:`DescriptorChainError` whose ``head`` must be returned with ``push(err.head, 0)``;
    ring-level corruption (avail idx more than ``size`` ahead, a head out of range, more chains
    in flight than the ring holds) raises :class:`VirtqueueBrokenError` once, after which
    ``pop`` returns None, ``push`` is ignored and ``needs_notification`` is False.
    """

    def __init__(
        self,
        mem: GuestMemory,
        layout: SplitLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        next_used: int | None = None,
    ) -> None:
        layout.validate(mem, event_idx)
        self.mem = mem
        self.layout = layout
        self.size = size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        d, a, u = SplitLayout.area_sizes(size, event_idx)
        self._desc = mem.translate(layout.desc, d)
        self._avail = mem.translate(layout.avail, a)
        self._used = mem.translate(layout.used, u)
        self._mask = size - 1
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        self._next_avail = next_avail & 0xFFFF
        self._avail_idx = self._next_avail  # last avail.idx read (shadow)
        if next_used is None:
            next_used = _unpack_u16(self._used, 2)[0]
        self._next_used = next_used & 0xFFFF
        self._inflight = [0] * size
        self._ninflight = 0
        self._checked_used = self._next_used  # used idx at the last needs_notification()
        self._signalled_used: int | None = None
        self.broken = False
        self.broken_reason: str | None = None

    def __repr__(self) -> str:
        return (f"SplitDeviceQueue(size={self.size}, next_avail={self._next_avail}, "
                f"next_used={self._next_used}, inflight={self._ninflight}"
                f"{', BROKEN' if self.broken else ''})")

    # -- vhost-user state -------------------------------------------------------------------

    @property
    def next_avail(self) -> int:
        """Free-running index of the next avail entry to pop (vhost-user GET_VRING_BASE)."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        self._next_avail = self._avail_idx = value & 0xFFFF

    @property
    def next_used(self) -> int:
        """Free-running index of the next used entry to write."""
        return self._next_used

    @next_used.setter
    def next_used(self, value: int) -> None:
        self._next_used = self._checked_used = value & 0xFFFF
        self._signalled_used = None

    @property
    def vring_base(self) -> int:
        """vhost-user ``SET/GET_VRING_BASE`` ``num``: for split rings, ``next_avail``."""
        return self._next_avail

    @vring_base.setter
    def vring_base(self, num: int) -> None:
        self.next_avail = num & 0xFFFF

    @property
    def inflight(self) -> int:
        """Chains popped and not yet pushed."""
        return self._ninflight

    def _break(self, reason: str) -> VirtqueueBrokenError:
        self.broken = True
        self.broken_reason = reason
        return VirtqueueBrokenError(reason)

    # -- popping ------------------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when there is none (or the queue is broken)."""
        if self.broken:
            return None
        na = self._next_avail
        avail = self._avail
        size = self.size
        if na == self._avail_idx:
            idx = _unpack_u16(avail, 2)[0]
            if idx == na:
                return None
            if (idx - na) & 0xFFFF > size:
                # Linux vhost "Guest moved used index from %u to %u"; vm-virtio
                # InvalidAvailRingIndex.
                raise self._break(f"avail idx {idx} is more than {size} ahead of {na}")
            self._avail_idx = idx
        if self._ninflight >= size:
            # CVE-2016-5403: a driver re-posting heads without waiting for them.
            raise self._break(f"more than {size} chains in flight")
        head = _unpack_u16(avail, 4 + 2 * (na & self._mask))[0]
        self._next_avail = (na + 1) & 0xFFFF
        if head >= size:
            raise self._break(f"avail ring head {head} >= queue size {size}")
        self._inflight[head] += 1
        self._ninflight += 1

        # Walk the chain. The guest-memory fast path (the region the last translation hit) is
        # inlined: it halves the cost of a 2-descriptor pop (benchmarks/virtqueue.py).
        desc = self._desc
        mem = self.mem
        hot_base, hot_size, hot_view = mem._hot
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        wseen = False
        i = head
        steps = 0
        while True:
            # One copy of the descriptor; only the copy is used (TOCTOU, kvm-host#49).
            addr, ln, flags, nxt = _unpack_desc(desc, i << 4)
            steps += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if flags & VIRTQ_DESC_F_NEXT:
                    raise DescriptorChainError(
                        "descriptor has both INDIRECT and NEXT", head=head, field="flags")
                rlen, wlen = self._walk_indirect(
                    head, addr, ln, readable, writable, rlen, wlen, wseen)
                break
            if flags & VIRTQ_DESC_F_WRITE:
                wseen = True
                if ln:
                    off = addr - hot_base
                    if 0 <= off <= hot_size - ln:
                        writable.append(hot_view[off:off + ln])
                    else:
                        writable += self._translate(head, i, addr, ln)
                    wlen += ln
            else:
                if wseen:
                    raise DescriptorChainError(
                        "readable descriptor after a writable one", head=head, field="flags")
                if ln:
                    off = addr - hot_base
                    if 0 <= off <= hot_size - ln:
                        readable.append(hot_view[off:off + ln])
                    else:
                        readable += self._translate(head, i, addr, ln)
                    rlen += ln
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if steps >= size:
                # Linux vhost "Loop detected: last one at %u vq size %u".
                raise DescriptorChainError(
                    f"descriptor loop: chain longer than queue size {size}", head=head,
                    field="next")
            if nxt >= size:
                raise DescriptorChainError(
                    f"next index {nxt} >= queue size {size}", head=head, field="next")
            i = nxt
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise DescriptorChainError(
                f"chain of {rlen + wlen} bytes exceeds 2**32", head=head, field="len")
        return DescriptorChain(head, readable, writable, rlen, wlen, steps)

    def _translate(self, head: int, i: int, addr: int, ln: int) -> list[memoryview]:
        try:
            return self.mem.translate_sg(addr, ln)
        except GuestMemoryError as e:
            raise DescriptorChainError(
                f"descriptor {i} buffer: {e.what}", head=head, field="addr") from None

    def _walk_indirect(
        self, head: int, addr: int, ln: int, readable: list[memoryview],
        writable: list[memoryview], rlen: int, wlen: int, wseen: bool,
    ) -> tuple[int, int]:
        # split-ring.tex 2.7.5.3: the WRITE flag of the descriptor pointing at the table is
        # ignored; the table's entries say which buffers are writable.
        if not self.indirect:
            raise DescriptorChainError(
                "INDIRECT descriptor without VIRTIO_RING_F_INDIRECT_DESC", head=head,
                field="flags")
        if ln == 0 or ln % 16:
            raise DescriptorChainError(
                f"indirect table length {ln} is not a non-zero multiple of 16", head=head,
                field="len")
        n = ln >> 4
        if n > MAX_INDIRECT_ENTRIES:
            raise DescriptorChainError(
                f"indirect table of {n} entries (max {MAX_INDIRECT_ENTRIES})", head=head,
                field="len")
        try:
            views = self.mem.translate_sg(addr, ln)
        except GuestMemoryError as e:
            raise DescriptorChainError(
                f"indirect table: {e.what}", head=head, field="addr") from None
        table = views[0] if len(views) == 1 else memoryview(b"".join(views))
        translate_sg = self.mem.translate_sg
        j = 0
        steps = 0
        while True:
            a, blen, f, nx = _unpack_desc(table, j << 4)
            steps += 1
            if f & VIRTQ_DESC_F_INDIRECT:
                raise DescriptorChainError(
                    "nested indirect descriptor", head=head, field="flags")
            if f & VIRTQ_DESC_F_WRITE:
                wseen = True
                if blen:
                    try:
                        writable += translate_sg(a, blen)
                    except GuestMemoryError as e:
                        raise DescriptorChainError(
                            f"indirect entry {j} buffer: {e.what}", head=head,
                            field="addr") from None
                    wlen += blen
            else:
                if wseen:
                    raise DescriptorChainError(
                        "readable descriptor after a writable one", head=head, field="flags")
                if blen:
                    try:
                        readable += translate_sg(a, blen)
                    except GuestMemoryError as e:
                        raise DescriptorChainError(
                            f"indirect entry {j} buffer: {e.what}", head=head,
                            field="addr") from None
                    rlen += blen
            if not f & VIRTQ_DESC_F_NEXT:
                return rlen, wlen
            if steps >= n:
                raise DescriptorChainError(
                    f"descriptor loop in indirect table of {n} entries", head=head, field="next")
            if nx >= n:
                raise DescriptorChainError(
                    f"indirect next {nx} >= table size {n}", head=head, field="next")
            j = nx

    def pop_many(
        self, limit: int, on_error: Callable[[DescriptorChainError], object] | None = None
    ) -> list[DescriptorChain]:
        """Pop up to ``limit`` chains. Bad chains are returned at once with ``push(head, 0)``
        and passed to ``on_error(err)`` when given; a broken ring raises."""
        out: list[DescriptorChain] = []
        pop = self.pop
        while len(out) < limit:
            try:
                chain = pop()
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

    def _used_len(self, item: ChainOrHead, written_len: int | None) -> tuple[int, int]:
        if isinstance(item, DescriptorChain):
            head = item.head
            if written_len is None:
                written_len = item.written
            elif written_len > item.writable_len:
                raise LocalProtocolError(
                    f"used length {written_len} > the chain's {item.writable_len} writable bytes")
        else:
            head = item
            if written_len is None:
                raise LocalProtocolError("push(head) needs written_len")
        if not 0 <= written_len <= 0xFFFF_FFFF:
            raise LocalProtocolError(f"used length {written_len} is not a u32")
        if not 0 <= head < self.size or not self._inflight[head]:
            raise LocalProtocolError(f"head {head} is not in flight")
        return head, written_len

    def push(self, item: ChainOrHead, written_len: int | None = None) -> None:
        """Return a chain (or a head from a :class:`DescriptorChainError`) to the driver with
        ``written_len`` bytes written to its writable part (default: ``chain.written``).

        Completion may be in any order. The used element is written before the used index.
        """
        if self.broken:
            return
        if isinstance(item, DescriptorChain) and 0 <= item.head < self.size:
            # Fast path for the common case; anything unusual goes through _used_len's checks.
            head = item.head
            n = item.written if written_len is None else written_len
            if not 0 <= n <= item.writable_len or n > 0xFFFF_FFFF or not self._inflight[head]:
                head, n = self._used_len(item, written_len)
        else:
            head, n = self._used_len(item, written_len)
        self._inflight[head] -= 1
        self._ninflight -= 1
        nu = self._next_used
        used = self._used
        _pack_elem(used, 4 + 8 * (nu & self._mask), head, n)
        nu = (nu + 1) & 0xFFFF
        self._next_used = nu
        _pack_u16(used, 2, nu)

    def push_many(self, items: Iterable[tuple[ChainOrHead, int | None]]) -> None:
        """Push several chains, publishing the used index once at the end."""
        if self.broken:
            return
        nu = self._next_used
        used = self._used
        mask = self._mask
        inflight = self._inflight
        size = self.size
        try:
            for item, written_len in items:
                if isinstance(item, DescriptorChain) and 0 <= item.head < size:
                    head = item.head
                    n = item.written if written_len is None else written_len
                    if not 0 <= n <= item.writable_len or n > 0xFFFF_FFFF or not inflight[head]:
                        head, n = self._used_len(item, written_len)
                else:
                    head, n = self._used_len(item, written_len)
                inflight[head] -= 1
                self._ninflight -= 1
                _pack_elem(used, 4 + 8 * (nu & mask), head, n)
                nu = (nu + 1) & 0xFFFF
        finally:
            if nu != self._next_used:
                self._next_used = nu
                _pack_u16(used, 2, nu)

    # -- notifications ------------------------------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether to signal the driver (``call``) for what was pushed since the last check.

        Without EVENT_IDX: unless ``VIRTQ_AVAIL_F_NO_INTERRUPT``. With it: whether the used idx
        crossed the driver's ``used_event`` (QEMU ``virtio_split_should_notify``).
        """
        if self.broken:
            return False
        new = self._next_used
        if new == self._checked_used:
            return False
        self._checked_used = new
        if not self.event_idx:
            return not (_unpack_u16(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)
        prev, self._signalled_used = self._signalled_used, new
        if prev is None:
            return True
        return vring_need_event(_unpack_u16(self._avail, self._used_event_off)[0], new, prev)

    def disable_notification(self) -> None:
        """Ask the driver not to kick (``VIRTQ_USED_F_NO_NOTIFY``; with EVENT_IDX a stale
        ``avail_event`` already suppresses kicks, as in Linux vhost)."""
        if not self.event_idx and not self.broken:
            _pack_u16(self._used, 0, VIRTQ_USED_F_NO_NOTIFY)

    def enable_notification(self) -> bool:
        """Ask for kicks again; returns True if buffers became available meanwhile (then keep
        popping instead of waiting, or a kick may have been suppressed)."""
        if self.broken:
            return False
        if self.event_idx:
            _pack_u16(self._used, self._avail_event_off, self._next_avail)
        else:
            _pack_u16(self._used, 0, 0)
        return bool(_unpack_u16(self._avail, 2)[0] != self._next_avail)

    def has_available(self) -> bool:
        """Whether the driver has published chains not popped yet."""
        return not self.broken and _unpack_u16(self._avail, 2)[0] != self._next_avail


class SplitDriverQueue(_DriverBuffers):
    """The driver side of a split virtqueue: add chains, kick, reap completions.

    The driver owns the rings: with ``reset`` (default) the three areas are zeroed. Buffers
    given as bytes or sizes are placed with ``allocator`` and freed on completion; :class:`Buffer`
    items are the caller's. ``use_indirect`` makes multi-buffer chains use an indirect table
    (needs ``indirect``, i.e. VIRTIO_RING_F_INDIRECT_DESC negotiated); ``add(indirect=...)``
    overrides it per chain.

    Hostile device (SECURITY.md B2): a used id that is not an outstanding head (forged,
    replayed, mid-chain) or a used idx running ahead of what is outstanding marks the queue
    broken (:class:`VirtqueueBrokenError`); an over-reported used length yields a
    :class:`Completion` with ``error`` set.
    """

    def __init__(
        self,
        mem: GuestMemory,
        layout: SplitLayout,
        allocator: GuestAllocator | None = None,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        use_indirect: bool = False,
        reset: bool = True,
    ) -> None:
        layout.validate(mem, event_idx)
        if use_indirect and not indirect:
            raise LocalProtocolError("use_indirect needs the indirect feature")
        self.mem = mem
        self.allocator = allocator
        self.layout = layout
        self.size = size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        self.use_indirect = use_indirect
        d, a, u = SplitLayout.area_sizes(size, event_idx)
        if reset:
            mem.fill(layout.desc, d)
            mem.fill(layout.avail, a)
            mem.fill(layout.used, u)
        self._desc = mem.translate(layout.desc, d)
        self._avail = mem.translate(layout.avail, a)
        self._used = mem.translate(layout.used, u)
        self._mask = size - 1
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        self._free = list(range(size - 1, -1, -1))
        self._avail_idx = _unpack_u16(self._avail, 2)[0]
        self._last_used = _unpack_u16(self._used, 2)[0]
        self._num_added = 0
        self._pending: dict[int, _Pending] = {}
        self.broken = False
        self.broken_reason: str | None = None

    def __repr__(self) -> str:
        return (f"SplitDriverQueue(size={self.size}, outstanding={len(self._pending)}, "
                f"free={len(self._free)}{', BROKEN' if self.broken else ''})")

    @property
    def num_free(self) -> int:
        """Free descriptors (a chain of n buffers needs n, or 1 with an indirect table)."""
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Chains added and not yet reaped."""
        return len(self._pending)

    def outstanding_tokens(self) -> list[object]:
        """Tokens of the chains not reaped yet (to fail them when the queue breaks)."""
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
        """Make a chain available: ``readable`` buffers then ``writable`` ones; returns the head.

        ``token`` comes back in the :class:`Completion` (default: the head). ``gather=False``
        skips copying the reply out at completion (for writable :class:`Buffer` items the
        caller reads itself). Raises :class:`LocalProtocolError` when the ring or the allocator
        is full (nothing is published then).
        """
        if self.broken:
            raise VirtqueueBrokenError(self.broken_reason or "queue broken")
        segs, owned, wsegs, wlen = self._stage(readable, writable)
        n = len(segs)
        use_ind = (self.use_indirect and n > 1) if indirect is None else indirect
        if use_ind and not self.indirect:
            self._release(owned)
            raise LocalProtocolError("indirect descriptors were not negotiated")
        desc = self._desc
        free = self._free
        if use_ind:
            if n > MAX_INDIRECT_ENTRIES or not free:
                self._release(owned)
                raise LocalProtocolError("queue full" if not free else "indirect table too big")
            table = self._alloc(16 * n, owned)
            tbl = self.mem.translate(table, 16 * n)
            last = n - 1
            for k, (addr, ln, w) in enumerate(segs):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if k < last else 0)
                _pack_desc(tbl, k << 4, addr, ln, flags, k + 1 if k < last else 0)
            head = free.pop()
            descs = [head]
            _pack_desc(desc, head << 4, table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0)
        else:
            if n > len(free):
                self._release(owned)
                raise LocalProtocolError(f"queue full: {n} descriptors wanted, {len(free)} free")
            descs = [free.pop() for _ in range(n)]
            last = n - 1
            for k, (addr, ln, w) in enumerate(segs):
                if k < last:
                    _pack_desc(desc, descs[k] << 4, addr, ln,
                               (VIRTQ_DESC_F_WRITE if w else 0) | VIRTQ_DESC_F_NEXT, descs[k + 1])
                else:
                    _pack_desc(desc, descs[k] << 4, addr, ln, VIRTQ_DESC_F_WRITE if w else 0, 0)
            head = descs[0]
        self._pending[head] = _Pending(
            head if token is None else token, descs, len(descs), owned, wsegs, wlen, gather)
        # Descriptors, then the ring entry, then the index (see ring.py on ordering).
        ai = self._avail_idx
        _pack_u16(self._avail, 4 + 2 * (ai & self._mask), head)
        ai = (ai + 1) & 0xFFFF
        self._avail_idx = ai
        _pack_u16(self._avail, 2, ai)
        self._num_added += 1
        return head

    def needs_kick(self) -> bool:
        """Whether the device wants a kick for the chains added since the last call
        (Linux ``virtqueue_kick_prepare_split``)."""
        added, self._num_added = self._num_added, 0
        if not added or self.broken:
            return False
        new = self._avail_idx
        if self.event_idx:
            old = (new - added) & 0xFFFF
            return vring_need_event(_unpack_u16(self._used, self._avail_event_off)[0], new, old)
        return not (_unpack_u16(self._used, 0)[0] & VIRTQ_USED_F_NO_NOTIFY)

    def has_used(self) -> bool:
        """Whether the device has returned chains not reaped yet."""
        return bool(_unpack_u16(self._used, 2)[0] != self._last_used)

    def reap(self, limit: int | None = None) -> list[Completion]:
        """Take the chains the device has returned, oldest first.

        A used element naming no outstanding head breaks the queue: the completions before it
        are returned, and the next call raises :class:`VirtqueueBrokenError`.
        """
        if self.broken:
            raise VirtqueueBrokenError(self.broken_reason or "queue broken")
        used = self._used
        idx = _unpack_u16(used, 2)[0]
        lu = self._last_used
        n = (idx - lu) & 0xFFFF
        out: list[Completion] = []
        if not n:
            return out
        if n > len(self._pending):
            self.broken = True
            self.broken_reason = (f"used idx {idx} is {n} ahead, only {len(self._pending)} "
                                  f"chains outstanding")
            raise VirtqueueBrokenError(self.broken_reason)
        if limit is not None:
            n = min(n, limit)
        mask = self._mask
        pending = self._pending
        for _ in range(n):
            head, ln = _unpack_elem(used, 4 + 8 * (lu & mask))
            p = pending.pop(head, None)
            if p is None:
                self.broken = True
                self.broken_reason = f"used id {head} is not an outstanding head"
                if not out:
                    raise VirtqueueBrokenError(self.broken_reason)
                break
            lu = (lu + 1) & 0xFFFF
            self._last_used = lu
            self._free.extend(p.descs)
            out.append(self._complete(p, head, ln))
        return out

    def disable_interrupts(self) -> None:
        """Ask the device not to signal used buffers (``VIRTQ_AVAIL_F_NO_INTERRUPT``; with
        EVENT_IDX a stale ``used_event`` already suppresses them)."""
        if not self.event_idx:
            _pack_u16(self._avail, 0, VIRTQ_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self) -> bool:
        """Ask for a signal at the next used buffer; returns True if some are already there
        (then reap instead of waiting)."""
        if self.event_idx:
            _pack_u16(self._avail, self._used_event_off, self._last_used)
        else:
            _pack_u16(self._avail, 0, 0)
        return self.has_used()
