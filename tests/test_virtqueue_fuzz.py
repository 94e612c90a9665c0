"""Fuzz properties: hostile rings written straight into guest memory.

Device side (SECURITY.md B2, B6 item 11): random descriptor tables, indirect tables and ring
indexes over a memory whose regions are separated by unmapped gaps. The device must raise only
``DescriptorChainError``/``VirtqueueBrokenError``, exactly when an independent reference walker
of the spec rules says so, and every chain it returns must be the memory the descriptors name
(so nothing outside the regions is ever reached: a gap has no backing to read).

Driver side (B2 "hostile device", B6 item 12): random used rings; the driver only completes
requests it has outstanding, once, with a length within what it lent, or breaks the queue.
"""

from __future__ import annotations

import random
import struct

from _virtqueue_util import DESC, ELEM, U16, HostileSplitDriver, make_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofs.errors import DescriptorChainError, VirtqueueBrokenError
from virtiofs.virtqueue import (
    GuestMemory,
    PackedDeviceQueue,
    PackedLayout,
    SplitDeviceQueue,
    SplitLayout,
    encode_packed_vring_base,
)

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
SIZE = 8
# Regions: [0, 0x2000) rings + tables, [0x2000, 0x3000) adjacent, gap, [0x8000, 0x9000), gap.
REGIONS = [(0x0, 0x2000), (0x2000, 0x1000), (0x8000, 0x1000)]
TABLES = [0x1800, 0x1FF0, 0x2800]  # where indirect tables may live (0x1FF0 straddles R0/R1)

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def backed(addr: int, length: int) -> bool:
    """Reference: is every byte of [addr, addr+length) inside a region (adjacent ones join)?"""
    end = addr + length
    if addr < 0 or end > 1 << 64:
        return False
    cur = addr
    for gpa, size in REGIONS:
        if gpa <= cur < gpa + size:
            cur = gpa + size
            if cur >= end:
                return True
    return length == 0


def make_memory() -> GuestMemory:
    mem = GuestMemory()
    rnd = random.Random(1)
    for gpa, size in REGIONS:
        mem.allocate_region(gpa, size)
        mem.write(gpa, rnd.randbytes(size))
    return mem


# Biased towards well-formed values (so chains get long and deep) with hostile ones mixed in.
addrs = st.one_of(
    st.integers(0x2000, 0x2FC0), st.integers(0x8000, 0x8FC0), st.sampled_from(TABLES),
    st.sampled_from([0, 0x1FF8, 0x1FFF, 0x2FF0, 0x2FFF, 0x3000, 0x7FF8, 0x8FF0, 0x8FFF, 0x9000,
                     2**64 - 8, 2**63]),
    st.integers(0, 0xA000))
lens = st.one_of(st.integers(0, 64), st.integers(0, 64),
                 st.sampled_from([0, 1, 16, 32, 48, 64, 0x1000, 0x2000, 2**32 - 1]))
_VALID_FLAGS = st.sampled_from([0, NEXT, WRITE, WRITE | NEXT, INDIRECT, INDIRECT | WRITE])
flags16 = st.one_of(*[_VALID_FLAGS] * 8,
                    st.sampled_from([INDIRECT | NEXT, 0x8 | NEXT]), st.integers(0, 0xFFFF))
desc_entries = st.tuples(addrs, lens, flags16,
                         st.one_of(st.integers(0, SIZE - 1), st.integers(0, SIZE + 1)))
table_entries = st.tuples(addrs, lens, flags16, st.integers(0, 4))


_buf_addr = st.one_of(st.integers(0x2000, 0x2FC0), st.integers(0x8000, 0x8FC0))
_hostile_field = st.one_of(
    st.tuples(st.just(0), addrs), st.tuples(st.just(1), lens), st.tuples(st.just(2), flags16),
    st.tuples(st.just(3), st.integers(0, SIZE + 1)))


def _mutate(entry: tuple, mutation: tuple[int, int]) -> tuple:
    field, value = mutation
    return tuple(value if k == field else v for k, v in enumerate(entry))


@st.composite
def valid_split_ring(draw: st.DrawFn) -> tuple[list, list, list, None]:
    """Well-formed chains (direct and indirect) with 0-2 hostile mutations on top."""
    descs: list[tuple] = [(0x2000, 0, 0, 0)] * SIZE
    tables: list[list[tuple]] = [[] for _ in TABLES]
    free = list(range(SIZE))
    heads: list[int] = []
    for _ in range(draw(st.integers(1, 5))):
        nr, nw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        bufs = [(draw(_buf_addr), draw(st.integers(0, 64)), k >= nr) for k in range(nr + nw or 1)]
        t = len([x for x in tables if x])
        if t < len(TABLES) and draw(st.booleans()) and free:
            n = len(bufs)
            tables[t] = [(a, ln, (WRITE if w else 0) | (NEXT if k < n - 1 else 0), k + 1)
                         for k, (a, ln, w) in enumerate(bufs)]
            head = free.pop(draw(st.integers(0, len(free) - 1)))
            descs[head] = (TABLES[t], 16 * n, INDIRECT, 0)
        else:
            if len(bufs) > len(free):
                break
            idx = [free.pop(draw(st.integers(0, len(free) - 1))) for _ in bufs]
            for k, (a, ln, w) in enumerate(bufs):
                last = k == len(bufs) - 1
                descs[idx[k]] = (a, ln, (WRITE if w else 0) | (0 if last else NEXT),
                                 0 if last else idx[k + 1])
            head = idx[0]
        heads.append(head)
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, SIZE + len(TABLES)))
        if where < SIZE:
            descs[where] = _mutate(descs[where], draw(_hostile_field))
        elif where < SIZE + len(TABLES) and tables[where - SIZE]:
            tbl = tables[where - SIZE]
            k = draw(st.integers(0, len(tbl) - 1))
            tbl[k] = _mutate(tbl[k], draw(_hostile_field))
        elif heads:
            heads[draw(st.integers(0, len(heads) - 1))] = draw(st.integers(0, SIZE + 2))
    return descs, tables, heads, None


random_split_ring = st.tuples(
    st.lists(desc_entries, min_size=SIZE, max_size=SIZE),
    st.lists(st.lists(table_entries, max_size=4), min_size=len(TABLES), max_size=len(TABLES)),
    st.lists(st.one_of(*[st.integers(0, SIZE - 1)] * 8, st.integers(0, SIZE + 2)),
             max_size=SIZE + 1),
    st.one_of(*[st.none()] * 8, st.integers(0, 0xFFFF)),
)


class Broken(Exception):
    pass


class ChainErr(Exception):
    pass


def read_desc(mem: GuestMemory, addr: int) -> tuple[int, int, int, int]:
    return DESC.unpack(mem.read(addr, 16))


def ref_split(mem: GuestMemory, layout: SplitLayout, head: int, indirect_ok: bool) -> list:
    """Reference walker of split-ring.tex rules: list of (addr, len, writable) or raises."""
    segs: list[tuple[int, int, bool]] = []
    wseen = False

    def buf(addr: int, ln: int, fl: int) -> None:
        nonlocal wseen
        if fl & WRITE:
            wseen = True
        elif wseen:
            raise ChainErr("readable after writable")
        if ln:
            if not backed(addr, ln):
                raise ChainErr("outside memory")
            segs.append((addr, ln, bool(fl & WRITE)))

    i, count = head, 0
    while True:
        count += 1
        addr, ln, fl, nxt = read_desc(mem, layout.desc + 16 * i)
        if fl & INDIRECT:
            n = ln // 16
            if (not indirect_ok or fl & NEXT or ln == 0 or ln % 16 or n > 65536
                    or not backed(addr, ln)):
                raise ChainErr("bad indirect")
            table = [read_desc(mem, addr + 16 * k) for k in range(n)]
            j, tcount = 0, 0
            while True:
                tcount += 1
                a, tl, f, nx = table[j]
                if f & INDIRECT:
                    raise ChainErr("nested")
                buf(a, tl, f)
                if not f & NEXT:
                    break
                if tcount >= n or nx >= n:
                    raise ChainErr("table loop / next")
                j = nx
            break
        buf(addr, ln, fl)
        if not fl & NEXT:
            break
        if count >= SIZE or nxt >= SIZE:
            raise ChainErr("loop / next")
        i = nxt
    if sum(s[1] for s in segs) > 1 << 32:
        raise ChainErr("too long")
    return segs


def check_chain(mem: GuestMemory, chain, segs: list) -> None:
    readable = b"".join(mem.read(a, n) for a, n, w in segs if not w)
    writable = b"".join(mem.read(a, n) for a, n, w in segs if w)
    assert chain.read_all() == readable
    assert chain.readable_len == len(readable)
    assert chain.writable_len == len(writable)
    assert b"".join(bytes(v) for v in chain.writable) == writable


@FUZZ
@given(
    ring=st.one_of(valid_split_ring(), random_split_ring),
    start=st.sampled_from([0, 0xFFFA]),
    pushes=st.lists(st.booleans(), max_size=2 * SIZE),
    indirect=st.booleans(),
)
def test_split_device_survives_any_ring(ring, start, pushes, indirect):
    descs, tables, heads, idx = ring
    mem = make_memory()
    try:
        layout = SplitLayout.place(0, SIZE)
        dev = SplitDeviceQueue(mem, layout, indirect=indirect, event_idx=True, next_avail=start,
                               next_used=0)
        drv = HostileSplitDriver(mem, layout)
        drv.idx = start
        for k, d in enumerate(descs):
            drv.desc(k, *d)
        for addr, entries in zip(TABLES, tables, strict=True):
            if entries:
                drv.table(addr, entries)
        drv.publish(*heads)
        if idx is not None:
            drv.set_idx(idx)
        avail_idx = start
        na, inflight = start, 0
        for step in range(2 * SIZE + 2):
            # The reference's view of what pop() must do, from the live memory (the avail idx
            # is re-read once the known entries are consumed, as a device may; the chains'
            # writes can land on the rings themselves).
            expect: object
            if na == avail_idx:
                avail_idx = U16.unpack(mem.read(layout.avail + 2, 2))[0]
            if na == avail_idx:
                expect = None
            elif (avail_idx - na) & 0xFFFF > SIZE or inflight >= SIZE:
                expect = Broken
            else:
                head = U16.unpack(mem.read(layout.avail + 4 + 2 * (na % SIZE), 2))[0]
                if head >= SIZE:
                    expect = Broken
                else:
                    try:
                        expect = (head, ref_split(mem, layout, head, indirect))
                    except ChainErr:
                        expect = (head, ChainErr)
            try:
                chain = dev.pop()
            except DescriptorChainError as e:
                assert isinstance(expect, tuple) and expect == (e.head, ChainErr), expect
                dev.push(e.head, 0)
                na = (na + 1) & 0xFFFF
                continue
            except VirtqueueBrokenError:
                assert expect is Broken
                assert dev.pop() is None
                break
            if expect is None:
                assert chain is None
                break
            assert isinstance(expect, tuple) and expect[1] is not ChainErr, expect
            assert chain is not None and chain.head == expect[0]
            check_chain(mem, chain, expect[1])
            chain.write(b"\xAA" * 64)
            na = (na + 1) & 0xFFFF
            inflight += 1
            if step < len(pushes) and pushes[step]:
                dev.push(chain, min(chain.written, 64))
                inflight -= 1
    finally:
        mem.close()


def ref_packed(mem: GuestMemory, layout: PackedLayout, pos: int, wrap: bool,
               inflight: set[int], indirect_ok: bool):
    """Reference walker of packed-ring.tex rules: None, Broken, (id, ChainErr) or
    (id, segs, ndesc)."""
    def is_avail(fl: int, w: bool) -> bool:
        return bool(fl & AVAIL) == w and bool(fl & USED) != w

    if not is_avail(read_desc(mem, layout.desc + 16 * pos)[3], wrap):
        return None
    if len(inflight) >= layout.size:
        return Broken
    segs: list[tuple[int, int, bool]] = []
    err = False
    wseen = False
    n = 0
    while True:
        addr, ln, bid, fl = read_desc(mem, layout.desc + 16 * pos)
        if n and not is_avail(fl, wrap):
            return Broken
        n += 1
        pos += 1
        if pos == layout.size:
            pos, wrap = 0, not wrap
        if not err:
            try:
                if fl & INDIRECT:
                    if not indirect_ok or fl & NEXT or ln == 0 or ln % 16 or not backed(addr, ln):
                        raise ChainErr
                    for k in range(ln // 16):
                        a, tl, _i, f = read_desc(mem, addr + 16 * k)
                        if f & INDIRECT:
                            raise ChainErr
                        if f & WRITE:
                            wseen = True
                        elif wseen:
                            raise ChainErr
                        if tl:
                            if not backed(a, tl):
                                raise ChainErr
                            segs.append((a, tl, bool(f & WRITE)))
                else:
                    if fl & WRITE:
                        wseen = True
                    elif wseen:
                        raise ChainErr
                    if ln:
                        if not backed(addr, ln):
                            raise ChainErr
                        segs.append((addr, ln, bool(fl & WRITE)))
            except ChainErr:
                err = True
        if not fl & NEXT:
            break
        if n >= layout.size:
            return Broken
    if bid in inflight:
        return Broken
    if not err and sum(s[1] for s in segs) > 1 << 32:
        err = True
    return (bid, ChainErr, n) if err else (bid, segs, n)


packed_entries = st.tuples(
    addrs, lens, st.integers(0, 7), flags16,
    st.sampled_from(["avail", "avail", "avail", "used", "raw"]))


@st.composite
def valid_packed_ring(draw: st.DrawFn) -> tuple[tuple[int, bool], list, list]:
    """Well-formed chains from the device's start position, with 0-2 mutations on top."""
    size = SIZE - 2
    pos = draw(st.integers(0, size - 1))
    ring: list[tuple] = [(0x2000, 0, 0, 0, "raw")] * size
    tables: list[list[tuple]] = [[] for _ in TABLES]
    p, left, bid = pos, size, 0
    for _ in range(draw(st.integers(1, 4))):
        nr, nw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        bufs = [(draw(_buf_addr), draw(st.integers(0, 64)), k >= nr) for k in range(nr + nw or 1)]
        t = len([x for x in tables if x])
        if t < len(TABLES) and draw(st.booleans()):
            tables[t] = [(a, ln, 0, WRITE if w else 0, 0) for a, ln, w in bufs]
            descs = [(TABLES[t], 16 * len(bufs), INDIRECT)]
        else:
            descs = [(a, ln, WRITE if w else 0) for a, ln, w in bufs]
        if len(descs) > left:
            break
        for k, (a, ln, f) in enumerate(descs):
            last = k == len(descs) - 1
            ring[p] = (a, ln, bid if last else 0, f | (0 if last else NEXT), "avail")
            p = (p + 1) % size
        left -= len(descs)
        bid += draw(st.integers(1, 2))
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(0, size - 1))
        field, value = draw(_hostile_field)
        e = list(ring[k])
        e[(0, 1, 3, 2)[field]] = value if field != 3 else value % 8  # next -> a buffer id
        ring[k] = tuple(e)
    return (pos, draw(st.booleans())), ring, [[e[:2] + (e[3], e[2]) for e in t] for t in tables]


random_packed_ring = st.tuples(
    st.tuples(st.integers(0, SIZE - 3), st.booleans()),
    st.lists(packed_entries, min_size=SIZE - 2, max_size=SIZE - 2),
    st.lists(st.lists(table_entries, max_size=4), min_size=len(TABLES), max_size=len(TABLES)),
)


@FUZZ
@given(
    spec=st.one_of(valid_packed_ring(), random_packed_ring),
    pushes=st.lists(st.booleans(), max_size=2 * SIZE),
    indirect=st.booleans(),
)
def test_packed_device_survives_any_ring(spec, pushes, indirect):
    start, ring, tables = spec
    size = SIZE - 2  # not a power of 2
    mem = make_memory()
    try:
        layout = PackedLayout.place(0, size)
        pos, wrap = start
        dev = PackedDeviceQueue(mem, layout, indirect=indirect, event_idx=True,
                                vring_base=encode_packed_vring_base(pos, wrap, pos, wrap))
        for k, (addr, ln, bid, fl, kind) in enumerate(ring):
            w = wrap if k >= pos else not wrap  # slots before the start belong to the next lap
            if kind == "avail":
                fl = (fl & ~(AVAIL | USED)) | (AVAIL if w else USED)
            elif kind == "used":
                fl = (fl & ~(AVAIL | USED)) | ((AVAIL | USED) if w else 0)
            mem.write(layout.desc + 16 * k, DESC.pack(addr, ln, bid, fl))
        for addr, entries in zip(TABLES, tables, strict=True):
            if entries:
                mem.write(addr, b"".join(DESC.pack(*e) for e in entries))
        inflight: set[int] = set()
        for step in range(2 * size + 2):
            p, w = dev.next_avail
            expect = ref_packed(mem, layout, p, w, inflight, indirect)
            try:
                chain = dev.pop()
            except DescriptorChainError as e:
                assert isinstance(expect, tuple) and expect[:2] == (e.head, ChainErr), expect
                dev.push(e.head, 0)
                continue
            except VirtqueueBrokenError:
                assert expect is Broken
                assert dev.pop() is None
                break
            if expect is None:
                assert chain is None
                break
            assert isinstance(expect, tuple) and expect[1] is not ChainErr, expect
            assert chain.head == expect[0] and chain.ndesc == expect[2]
            check_chain(mem, chain, expect[1])
            inflight.add(chain.head)
            if step < len(pushes) and pushes[step]:
                dev.push(chain, 0)
                inflight.discard(chain.head)
    finally:
        mem.close()


# -- driver side: hostile device ------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["split", "packed"]),
    requests=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 3)), min_size=1, max_size=5),
    used=st.lists(st.tuples(st.integers(0, 20), st.sampled_from([0, 1, 7, 8, 9, 2**32 - 1])),
                  max_size=8),
    idx_skew=st.integers(-2, 3),
)
def test_driver_survives_any_used_ring(kind, requests, used, idx_skew):
    p = make_pair(kind, 8)
    try:
        wlen: dict[object, int] = {}
        heads = []
        for k, (nr, nw) in enumerate(requests):
            try:
                heads.append(p.drv.add([b"r"] * nr, [3] * nw, token=k))
                wlen[k] = 3 * nw
            except Exception:
                break
        # The hostile device writes used entries naming outstanding heads, other numbers, and
        # replays, then moves the index as it likes.
        if kind == "split":
            for k, (hid, ln) in enumerate(used):
                h = heads[hid % len(heads)] if hid < 10 and heads else hid
                p.mem.write(p.layout.used + 4 + 8 * (k % 8), ELEM.pack(h, ln))
            p.mem.write(p.layout.used + 2, U16.pack((len(used) + idx_skew) & 0xFFFF))
        else:
            pos = 0
            for hid, ln in used:
                h = heads[hid % len(heads)] if hid < 10 and heads else hid
                p.mem.write(p.layout.desc + 16 * pos + 8, struct.pack("<IHH", ln, h, 0x8080))
                pos = (pos + 1 + hid % 3) % 8
        seen: set[object] = set()
        for _ in range(3):
            try:
                done = p.drv.reap()
            except VirtqueueBrokenError:
                assert p.drv.broken
                break
            for c in done:
                assert c.token in wlen and c.token not in seen
                seen.add(c.token)
                if c.error is None:
                    assert c.length <= wlen[c.token] and len(c.data) == c.length
                else:
                    assert c.length == 0 and c.data == b""
        assert set(p.drv.outstanding_tokens()) == set(wlen) - seen
    finally:
        p.mem.close()
