"""The virtqueue fast paths (issue 3, speed): ``post_pair`` on the driver side, the
2-descriptor shortcut of ``SplitDeviceQueue.pop``, and ``AdaptivePoll``.

Each fast path must decide exactly as the general path does (SECURITY.md B2): ``post_pair`` as
``add`` + ``needs_kick`` with caller buffers and ``gather=False``; the pop shortcut as the full
descriptor walk on the same descriptors, for every hostile variation of the shape it takes.
"""

from __future__ import annotations

import pytest
from _virtqueue_util import ELEM, U16, HostileSplitDriver, make_pair
from hypothesis import example, given, settings
from hypothesis import strategies as st

from virtiofs.errors import DescriptorChainError, LocalProtocolError, VirtqueueBrokenError
from virtiofs.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    AdaptivePoll,
    Buffer,
    GuestMemory,
    SplitDeviceQueue,
    SplitLayout,
)
from virtiofs.virtqueue.memory import _NO_REGION

KINDS = ["split", "packed"]


# -- post_pair --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("event_idx", [False, True])
def test_post_pair_round_trip_matches_add(kind: str, event_idx: bool) -> None:
    """Same chain, same kick decisions, same completion as add(..., gather=False)."""
    a = make_pair(kind, 8, event_idx=event_idx)
    b = make_pair(kind, 8, event_idx=event_idx)
    try:
        for p in (a, b):
            p.req = p.alloc.alloc(64)
            p.rep = p.alloc.alloc(64)
            p.mem.write(p.req, b"request!")
        for i in range(20):  # past the ring size: heads/ids and wrap counters get reused
            ka = a.drv.post_pair(a.req, 8, a.rep, 32, ("tok", i))
            b.drv.add([Buffer(b.req, 8)], [Buffer(b.rep, 32)], ("tok", i), gather=False)
            assert ka == b.drv.needs_kick()
            ca, cb = a.dev.pop(), b.dev.pop()
            assert ca is not None and cb is not None
            assert ca.read_all() == cb.read_all() == b"request!"
            assert ca.writable_len == cb.writable_len == 32
            assert ca.ndesc == cb.ndesc == 2
            ca.write(b"reply %d" % i)
            cb.write(b"reply %d" % i)
            a.dev.push(ca)
            b.dev.push(cb)
            (da,), (db,) = a.drv.reap(), b.drv.reap()
            assert da.token == db.token == ("tok", i)
            assert da.length == db.length == len(b"reply %d" % i)
            assert da.data == db.data == b""  # gather=False: the caller reads its buffer
            assert da.error is None and da.head == ca.head
            assert a.mem.read(a.rep, da.length) == b"reply %d" % i
            if i % 3 == 0:  # sleep now and then: the next post must then kick
                assert not a.dev.enable_notification() and not b.dev.enable_notification()
            else:
                a.dev.disable_notification()
                b.dev.disable_notification()
        assert a.drv.num_free == 8 and a.drv.outstanding == 0
    finally:
        a.mem.close()
        b.mem.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("raddr,rlen,waddr,wlen", [
    (-16, 8, 0x1000, 8),              # before memory
    (0x1000, 8, (1 << 20) - 4, 8),    # past the end
    (0x1000, -1, 0x2000, 8),          # negative length
    (0x1000, 8, 0x2000, 1 << 32),     # more than a u32 descriptor length
    ((1 << 64) - 8, 16, 0x2000, 8),   # wraps the u64 address space
])
def test_post_pair_refuses_bad_buffers_and_publishes_nothing(kind: str, raddr: int, rlen: int,
                                                             waddr: int, wlen: int) -> None:
    p = make_pair(kind, 8, event_idx=True)
    try:
        with pytest.raises(LocalProtocolError):
            p.drv.post_pair(raddr, rlen, waddr, wlen, "tok")
        assert p.drv.num_free == 8 and p.drv.outstanding == 0
        assert p.dev.pop() is None
    finally:
        p.mem.close()


@pytest.mark.parametrize("kind", KINDS)
def test_post_pair_on_a_full_ring_publishes_nothing(kind: str) -> None:
    p = make_pair(kind, 4)
    try:
        buf = p.alloc.alloc(64)
        assert p.drv.post_pair(buf, 8, buf + 16, 8, 1) is not None
        p.drv.post_pair(buf, 8, buf + 16, 8, 2)
        with pytest.raises(LocalProtocolError):
            p.drv.post_pair(buf, 8, buf + 16, 8, 3)
        assert p.drv.outstanding == 2 and p.drv.num_free == 0
        assert [p.dev.pop() is not None for _ in range(3)] == [True, True, False]
    finally:
        p.mem.close()


@pytest.mark.parametrize("kind", KINDS)
def test_post_pair_over_reported_used_length_is_an_error_completion(kind: str) -> None:
    p = make_pair(kind, 8)
    try:
        buf = p.alloc.alloc(64)
        p.drv.post_pair(buf, 8, buf + 16, 8, "tok")
        chain = p.dev.pop()
        assert chain is not None
        if kind == "split":
            # A hostile device writes a used length beyond the 8 bytes lent.
            lay = p.layout
            p.mem.write(lay.used + 4, ELEM.pack(chain.head, 4096))
            p.mem.write(lay.used + 2, U16.pack(1))
        else:
            # Packed: the used descriptor's len field (written before its flags by push).
            p.dev.push(chain, 8)
            p.mem.write(p.layout.desc + 8, (4096).to_bytes(4, "little"))
        (c,) = p.drv.reap()
        assert c.token == "tok" and c.error is not None and c.length == 0
        assert p.drv.outstanding == 0
    finally:
        p.mem.close()


def test_post_pair_forged_used_id_breaks_the_queue() -> None:
    p = make_pair("split", 8)
    try:
        buf = p.alloc.alloc(64)
        p.drv.post_pair(buf, 8, buf + 16, 8, "tok")
        p.mem.write(p.layout.used + 4, ELEM.pack(5, 0))  # head 5 was never posted
        p.mem.write(p.layout.used + 2, U16.pack(1))
        with pytest.raises(VirtqueueBrokenError):
            p.drv.reap()
        with pytest.raises(VirtqueueBrokenError):
            p.drv.post_pair(buf, 8, buf + 16, 8, "again")
    finally:
        p.mem.close()


# -- the 2-descriptor shortcut of SplitDeviceQueue.pop ------------------------------------------

SIZE = 8
MEM = 0x10000
FLAGS = st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                         VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT,
                         VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT, 8, 0xFFFF])
ADDR = st.one_of(st.integers(0x4000, 0xC000), st.sampled_from([0, MEM - 16, MEM, MEM + 16,
                                                               (1 << 64) - 16]))
LEN = st.one_of(st.integers(0, 64), st.sampled_from([0, 16, MEM, (1 << 32) - 1]))
NEXT = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([SIZE, 0xFFFF]))


def _outcome(mem: GuestMemory, layout: SplitLayout, size: int, walk: bool) -> object:
    """What a fresh device queue makes of the published head: the chain's bytes, or the
    error. ``walk`` forces the general descriptor walk (no hot region: the shortcut never
    applies, the walk translates every buffer itself)."""
    dev = SplitDeviceQueue(mem, layout, indirect=True)
    if walk:
        mem._hot = _NO_REGION
    try:
        chain = dev.pop()
    except DescriptorChainError as e:
        return ("error", e.field, e.head)
    except VirtqueueBrokenError:
        return ("broken",)
    assert chain is not None
    return ([bytes(v) for v in chain.readable], [bytes(v) for v in chain.writable],
            chain.readable_len, chain.writable_len, chain.ndesc, chain.head)


@settings(max_examples=300, deadline=None)
@given(head=st.integers(0, SIZE - 1), d1=st.tuples(ADDR, LEN, FLAGS, NEXT),
       d2=st.tuples(ADDR, LEN, FLAGS, NEXT), size=st.sampled_from([1, 2, SIZE]))
def test_pop_shortcut_decides_as_the_descriptor_walk(head: int, d1: tuple[int, int, int, int],
                                                     d2: tuple[int, int, int, int],
                                                     size: int) -> None:
    mem = GuestMemory.allocate(MEM)
    try:
        layout = SplitLayout.place(0, size)
        drv = HostileSplitDriver(mem, layout)
        head %= size
        drv.desc(head, *d1)
        nxt = d1[3]
        if nxt < size and nxt != head:
            drv.desc(nxt, *d2)
        mem.write(0x4000, bytes(range(256)) * 0x20)
        drv.publish(head)
        fast = _outcome(mem, layout, size, walk=False)
        slow = _outcome(mem, layout, size, walk=True)
        assert fast == slow
    finally:
        mem.close()


IN_MEM = st.integers(0x4000, 0xC000)


@settings(max_examples=300, deadline=None)
@given(head=st.integers(0, SIZE - 1),
       a1=st.one_of(IN_MEM, ADDR), l1=st.one_of(st.integers(1, 64), LEN),
       nxt=st.one_of(st.integers(0, SIZE - 1), NEXT),
       a2=st.one_of(IN_MEM, ADDR), l2=st.one_of(st.integers(1, 64), LEN), n2=NEXT,
       f2=st.sampled_from([VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                           VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT, 0]),
       size=st.sampled_from([1, 2, SIZE, SIZE]))
@example(head=0, a1=0x4000, l1=0, nxt=1, a2=0x5000, l2=16, n2=0, f2=VIRTQ_DESC_F_WRITE,
         size=SIZE)  # empty readable: the walk leaves it out
@example(head=0, a1=0x4000, l1=16, nxt=1, a2=0x5000, l2=0, n2=0, f2=VIRTQ_DESC_F_WRITE,
         size=SIZE)  # empty writable
@example(head=1, a1=0x4000, l1=16, nxt=1, a2=0x5000, l2=16, n2=0, f2=VIRTQ_DESC_F_WRITE,
         size=SIZE)  # next is the head itself (read twice by the walk)
@example(head=0, a1=0x4000, l1=16, nxt=0, a2=0x5000, l2=16, n2=0, f2=VIRTQ_DESC_F_WRITE,
         size=1)  # a one-entry ring: any NEXT is a loop
@example(head=0, a1=MEM - 8, l1=16, nxt=1, a2=0x5000, l2=16, n2=0, f2=VIRTQ_DESC_F_WRITE,
         size=SIZE)  # readable runs off the end of memory
@example(head=0, a1=0x4000, l1=16, nxt=1, a2=MEM, l2=1, n2=0, f2=VIRTQ_DESC_F_WRITE,
         size=SIZE)  # writable starts at the end of memory
@example(head=0, a1=0x4000, l1=16, nxt=SIZE, a2=0x5000, l2=16, n2=0, f2=VIRTQ_DESC_F_WRITE,
         size=SIZE)  # next out of range
@example(head=0, a1=0x4000, l1=16, nxt=1, a2=0x5000, l2=16, n2=0,
         f2=VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, size=2)  # the writable one chains on
def test_pop_shortcut_on_its_own_shape_with_hostile_fields(head: int, a1: int, l1: int,
                                                           nxt: int, a2: int, l2: int, n2: int,
                                                           f2: int, size: int) -> None:
    """The shape the shortcut looks for (readable + NEXT, then writable), with every field
    hostile: out of memory, empty, 2**32 - 1 long, next out of range or back to the head."""
    test_pop_shortcut_decides_as_the_descriptor_walk.hypothesis.inner_test(  # type: ignore[attr-defined]
        head, (a1, l1, VIRTQ_DESC_F_NEXT, nxt), (a2, l2, f2, n2), size)


def test_pop_shortcut_refuses_a_pair_longer_than_2_pow_32() -> None:
    """Two buffers each inside a sparse 3 GiB region, 6 GiB together: the shortcut leaves the
    chain to the walk, which refuses it (vm-virtio#236)."""
    mem = GuestMemory.allocate(3 << 30)
    try:
        layout = SplitLayout.place(0, SIZE)
        drv = HostileSplitDriver(mem, layout)
        drv.desc(0, 0x10000, (3 << 30) - 0x10000, VIRTQ_DESC_F_NEXT, 1)
        drv.desc(1, 0x10000, (3 << 30) - 0x10000, VIRTQ_DESC_F_WRITE)
        drv.publish(0)
        with pytest.raises(DescriptorChainError) as ei:
            SplitDeviceQueue(mem, layout).pop()
        assert "2**32" in ei.value.what
    finally:
        mem.close()


def test_pop_shortcut_takes_the_common_request_shape() -> None:
    """A readable + writable pair inside the hot region: one buffer each, two descriptors."""
    mem = GuestMemory.allocate(MEM)
    try:
        layout = SplitLayout.place(0, SIZE)
        drv = HostileSplitDriver(mem, layout)
        drv.desc(3, 0x4000, 40, VIRTQ_DESC_F_NEXT, 5)
        drv.desc(5, 0x5000, 120, VIRTQ_DESC_F_WRITE)
        mem.write(0x4000, b"x" * 40)
        drv.publish(3)
        dev = SplitDeviceQueue(mem, layout)
        chain = dev.pop()
        assert chain is not None and chain.head == 3 and chain.ndesc == 2
        assert chain.read_all() == b"x" * 40 and chain.writable_len == 120
        # The chain is a copy: rewriting the descriptors now changes nothing (TOCTOU).
        drv.desc(3, 0x6000, 8, VIRTQ_DESC_F_NEXT, 5)
        assert chain.readable_len == 40 and bytes(chain.readable[0]) == b"x" * 40
        assert dev.inflight == 1
        dev.push(chain, 16)
        assert dev.inflight == 0
    finally:
        mem.close()


# -- AdaptivePoll -------------------------------------------------------------------------------

def test_adaptive_poll_finds_what_is_ready() -> None:
    p = AdaptivePoll(1e-3)
    if not p.limit:
        pytest.skip("single-CPU machine: polling is off")
    calls = []

    def ready() -> bool:
        calls.append(1)
        return len(calls) >= 10
    assert p.poll(ready) and p.hits == 1 and p.misses == 0


def test_adaptive_poll_backs_off_exponentially_and_a_hit_resets_it() -> None:
    p = AdaptivePoll(1e-5)
    if not p.limit:
        pytest.skip("single-CPU machine: polling is off")
    looked = []

    def never() -> bool:
        looked.append(1)
        return False

    def pattern(n: int) -> str:
        """'p' for a wait that polled, '-' for one that skipped polling."""
        out = ""
        for _ in range(n):
            before = len(looked)
            assert not p.poll(never)
            out += "p" if len(looked) > before else "-"
        return out
    # Two misses in a row, then pauses of 1, 2, 4, 8 waits, each followed by one probe.
    assert pattern(2 + 1 + 1 + 2 + 1 + 4 + 1 + 8 + 1) == "pp-p--p----p--------p"
    assert p.misses == 6
    # A probe that finds work ends the back-off.
    while p._pause:
        assert not p.poll(never)
    assert p.poll(lambda: True) and p.hits == 1
    assert pattern(3) == "pp-"


def test_adaptive_poll_pause_is_bounded() -> None:
    p = AdaptivePoll(1e-6)
    if not p.limit:
        pytest.skip("single-CPU machine: polling is off")
    for _ in range(20000):
        p.poll(lambda: False)
    assert p._backoff <= 1024 and p._pause <= 1024


def test_adaptive_poll_zero_limit_never_calls() -> None:
    p = AdaptivePoll(0)

    def boom() -> bool:
        raise AssertionError("polled with limit 0")
    assert not p.poll(boom)
