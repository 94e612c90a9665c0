"""Packed virtqueue rules (packed-ring.tex, SECURITY.md B2 / B6 items 11, 12, 17), one per test."""

from __future__ import annotations

import pytest
from _virtqueue_util import DESC, HostilePackedDriver, make_pair

from virtiofs.errors import (
    DescriptorChainError,
    LocalProtocolError,
    VirtqueueBrokenError,
    VirtqueueError,
)
from virtiofs.virtqueue import (
    RING_EVENT_FLAGS_DISABLE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    GuestMemory,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
    decode_packed_vring_base,
    encode_packed_vring_base,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
SIZE = 6  # packed sizes need not be powers of 2
BUF = 0x4000
MEM = 0x10000


@pytest.fixture
def ring():
    mem = GuestMemory.allocate(MEM)
    layout = PackedLayout.place(0, SIZE)
    dev = PackedDeviceQueue(mem, layout, indirect=True, event_idx=True)
    drv = HostilePackedDriver(mem, layout)
    yield mem, dev, drv
    mem.close()


def used_desc(mem, pos):
    addr, ln, bid, flags = DESC.unpack(mem.read(16 * pos, 16))
    return bid, ln, flags


def pop_error(dev) -> DescriptorChainError:
    with pytest.raises(DescriptorChainError) as ei:
        dev.pop()
    return ei.value


def test_buffer_id_comes_from_the_last_descriptor(ring):
    mem, dev, drv = ring
    mem.write(BUF, b"abcdef")
    drv.chain([(BUF, 3, 0), (BUF + 3, 3, 0), (BUF + 0x100, 8, WRITE)], bid=42)
    c = dev.pop()
    assert c.head == 42 and c.ndesc == 3 and c.read_all() == b"abcdef"
    c.write(b"12345")
    dev.push(c)
    bid, ln, flags = used_desc(mem, 0)
    assert (bid, ln) == (42, 5) and flags & 0x8080 == 0x8080 and flags & WRITE


def test_descriptor_not_yet_available_is_not_popped(ring):
    _, dev, drv = ring
    drv.write(0, BUF, 4, 1, drv.bits(wrap=False))  # available for the wrong lap
    assert dev.pop() is None
    drv.write(0, BUF, 4, 1, 0x8080)  # looks used
    assert dev.pop() is None


def test_wrap_counters_flip_after_the_last_slot(ring):
    _, dev, drv = ring
    for lap in range(3):
        for k in range(SIZE // 2):
            drv.chain([(BUF, 1, 0), (BUF, 1, WRITE)], bid=k)
        for k in range(SIZE // 2):
            c = dev.pop()
            assert c.head == k
            dev.push(c, 1)
        assert dev.pop() is None
        assert dev.next_avail == (0, lap % 2 == 1)


def test_chain_running_into_an_unavailable_descriptor_breaks_the_queue(ring):
    """The driver exposes the head last, so a partial chain is a spec violation."""
    _, dev, drv = ring
    drv.write(1, BUF, 4, 3, drv.bits(wrap=False))
    drv.write(0, BUF, 4, 3, NEXT | drv.bits())
    with pytest.raises(VirtqueueBrokenError):
        dev.pop()
    assert dev.pop() is None


def test_chain_longer_than_the_ring_breaks_the_queue(ring):
    _, dev, drv = ring
    for pos in range(SIZE):
        drv.write(pos, BUF, 4, 0, NEXT | drv.bits())
    with pytest.raises(VirtqueueBrokenError) as ei:
        dev.pop()
    assert "longer than the ring" in str(ei.value)


def test_buffer_id_reused_while_in_flight_breaks_the_queue(ring):
    _, dev, drv = ring
    drv.chain([(BUF, 4, 0)], bid=1)
    drv.chain([(BUF, 4, 0)], bid=1)
    assert dev.pop().head == 1
    with pytest.raises(VirtqueueBrokenError):
        dev.pop()


def test_bad_chain_id_is_returned_and_the_next_chain_served(ring):
    mem, dev, drv = ring
    drv.chain([(MEM - 2, 4, 0), (BUF, 4, WRITE)], bid=9)
    drv.chain([(BUF, 4, 0)], bid=3)
    err = pop_error(dev)
    assert err.head == 9 and err.field == "addr"
    dev.push(err.head, 0)
    assert dev.pop().head == 3
    assert used_desc(mem, 0)[:2] == (9, 0)


def test_readable_after_writable_is_refused(ring):
    _, dev, drv = ring
    drv.chain([(BUF, 4, WRITE), (BUF, 4, 0)], bid=2)
    assert "readable" in pop_error(dev).what


def test_indirect_table(ring):
    mem, dev, drv = ring
    mem.write(BUF + 0x100, b"req")
    mem.write(BUF, DESC.pack(BUF + 0x100, 3, 0, 0) + DESC.pack(BUF + 0x200, 5, 77, WRITE))
    drv.chain([(BUF, 32, INDIRECT)], bid=5)
    c = dev.pop()
    assert c.head == 5 and c.ndesc == 1 and c.read_all() == b"req" and c.writable_len == 5


@pytest.mark.parametrize("length", [0, 8, 40])
def test_indirect_length_must_be_a_nonzero_multiple_of_16(ring, length):
    _, dev, drv = ring
    drv.chain([(BUF, length, INDIRECT)], bid=5)
    assert pop_error(dev).head == 5


def test_nested_indirect_is_refused(ring):
    mem, dev, drv = ring
    mem.write(BUF, DESC.pack(BUF + 0x100, 16, 0, INDIRECT))
    drv.chain([(BUF, 16, INDIRECT)], bid=5)
    assert "nested" in pop_error(dev).what


def test_indirect_with_next_is_refused(ring):
    mem, dev, drv = ring
    mem.write(BUF, DESC.pack(BUF + 0x100, 4, 0, 0))
    drv.chain([(BUF, 16, INDIRECT), (BUF, 4, WRITE)], bid=5)
    err = pop_error(dev)
    assert "INDIRECT and NEXT" in err.what
    dev.push(err.head, 0)  # both descriptors skipped
    assert dev.next_avail == (2, True)


def test_indirect_without_the_feature_is_refused():
    mem = GuestMemory.allocate(MEM)
    try:
        layout = PackedLayout.place(0, SIZE)
        dev = PackedDeviceQueue(mem, layout)
        drv = HostilePackedDriver(mem, layout)
        mem.write(BUF, DESC.pack(BUF + 0x100, 4, 0, 0))
        drv.chain([(BUF, 16, INDIRECT)], bid=0)
        assert "INDIRECT_DESC" in pop_error(dev).what
    finally:
        mem.close()


def test_indirect_table_outside_memory_is_refused(ring):
    _, dev, drv = ring
    drv.chain([(MEM - 16, 32, INDIRECT)], bid=1)
    assert "indirect table" in pop_error(dev).what


def test_more_chains_in_flight_than_the_ring_holds_breaks_the_queue(ring):
    _, dev, drv = ring
    for k in range(SIZE):
        drv.chain([(BUF, 4, 0)], bid=k)
    assert len(dev.pop_many(SIZE)) == SIZE
    drv.chain([(BUF, 4, 0)], bid=SIZE)  # the driver reuses slots never returned
    with pytest.raises(VirtqueueBrokenError):
        dev.pop()


def test_push_of_an_id_not_in_flight_is_refused(ring):
    _, dev, _ = ring
    with pytest.raises(LocalProtocolError):
        dev.push(3, 0)


@pytest.mark.parametrize("layout", [
    PackedLayout(SIZE, 8, 0x1000, 0x1004),     # desc not 16-aligned
    PackedLayout(SIZE, 0, 0x1002, 0x1008),     # driver area not 4-aligned
    PackedLayout(SIZE, 0, 0x1000, 0x1006),     # device area not 4-aligned
    PackedLayout(0, 0, 0x1000, 0x1004),
    PackedLayout(32769, 0, 0x100000, 0x100004),
    PackedLayout(SIZE, MEM - 32, 0x1000, 0x1004),
    PackedLayout(SIZE, 0, 0x1000, MEM - 2),
])
def test_bad_ring_configuration_is_refused_at_setup(layout):
    mem = GuestMemory.allocate(MEM)
    try:
        with pytest.raises(VirtqueueError):
            PackedDeviceQueue(mem, layout)
        with pytest.raises(VirtqueueError):
            PackedDriverQueue(mem, layout)
    finally:
        mem.close()


def test_non_power_of_two_sizes_are_accepted():
    mem = GuestMemory.allocate(1 << 20)
    try:
        PackedDeviceQueue(mem, PackedLayout.place(0, 32768))
        PackedDeviceQueue(mem, PackedLayout.place(0, 3))
    finally:
        mem.close()


# -- vhost-user base encoding --------------------------------------------------------------------

def test_vring_base_encoding():
    assert encode_packed_vring_base(0, True, 0, True) == 0x8000_8000
    assert encode_packed_vring_base(5, False, 0x7FFF, True) == 0xFFFF_0005
    assert decode_packed_vring_base(0xFFFF_0005) == (5, False, 0x7FFF, True)
    with pytest.raises(ValueError):
        encode_packed_vring_base(0x8000, True, 0, True)


def test_vring_base_lets_a_new_device_continue_the_ring():
    p = make_pair("packed", 5)
    for i in range(4):
        p.drv.add([bytes([i])], token=i)
    for _ in range(4):
        c = p.dev.pop()
        p.dev.push(c, 0)
    assert [c.token for c in p.drv.reap()] == [0, 1, 2, 3]
    for i in range(4, 7):  # positions 4, 0, 1: the driver wraps
        p.drv.add([bytes([i])], token=i)
    c = p.dev.pop()
    p.dev.push(c, 0)
    base = p.dev.vring_base
    assert decode_packed_vring_base(base) == (0, False, 0, False)
    dev2 = p.new_device(vring_base=base)
    got = []
    while (c := dev2.pop()) is not None:
        got.append(c.read_all())
        dev2.push(c, 0)
    assert got == [b"\x05", b"\x06"]
    assert [c.token for c in p.drv.reap()] == [4, 5, 6]
    with pytest.raises(VirtqueueError):  # SET_VRING_BASE from the peer, past the ring
        p.new_device(vring_base=encode_packed_vring_base(5, True, 0, True))


# -- event suppression ---------------------------------------------------------------------------

def test_device_event_disable_suppresses_kicks():
    p = make_pair("packed", 8)
    p.dev.disable_notification()
    p.drv.add([b"x"])
    assert not p.drv.needs_kick()
    assert p.dev.enable_notification()
    p.dev.pop()
    assert not p.dev.enable_notification()
    p.drv.add([b"x"])
    assert p.drv.needs_kick()


def test_event_idx_kick_only_when_crossing_the_device_event_offset():
    p = make_pair("packed", 8, event_idx=True)
    assert not p.dev.enable_notification()  # off_wrap = 0 | wrap 1
    p.drv.add([b"a", b"b"])  # positions 0, 1
    assert p.drv.needs_kick()
    p.drv.add([b"c"])
    assert not p.drv.needs_kick()
    assert len(p.dev.pop_many(8)) == 2
    assert not p.dev.enable_notification()  # off = 3
    p.drv.add([b"d"])
    assert p.drv.needs_kick()


def test_driver_event_disable_suppresses_calls():
    p = make_pair("packed", 8)
    p.drv.disable_interrupts()
    assert p.mem.read(p.layout.driver_event + 2, 2) == bytes([RING_EVENT_FLAGS_DISABLE, 0])
    p.drv.add([b"x"], [4])
    p.dev.push(p.dev.pop(), 0)
    assert not p.dev.needs_notification()
    assert p.drv.enable_interrupts()
    p.drv.reap()
    assert not p.drv.enable_interrupts()
    p.drv.add([b"x"], [4])
    p.dev.push(p.dev.pop(), 0)
    assert p.dev.needs_notification()
    assert not p.dev.needs_notification()


def test_event_idx_call_only_when_crossing_the_driver_event_offset():
    p = make_pair("packed", 8, event_idx=True)
    for _ in range(3):
        p.drv.add([b"x"])
    chains = p.dev.pop_many(3)
    p.dev.push(chains[0], 0)
    assert p.dev.needs_notification()
    p.drv.reap()
    assert not p.drv.enable_interrupts()  # off = 1
    p.dev.push(chains[1], 0)
    assert p.dev.needs_notification()
    p.dev.push(chains[2], 0)
    assert not p.dev.needs_notification()


# -- driver side: hostile device ----------------------------------------------------------------

def make_used(p, pos, bid, ln, wrap=True):
    p.mem.write(p.layout.desc + 16 * pos + 8,
                ln.to_bytes(4, "little") + bid.to_bytes(2, "little"))
    p.mem.write(p.layout.desc + 16 * pos + 14, (0x8080 if wrap else 0).to_bytes(2, "little"))


def test_driver_refuses_a_forged_used_id():
    p = make_pair("packed", 8)
    p.drv.add([b"x"], [4])
    make_used(p, 0, 6, 0)
    with pytest.raises(VirtqueueBrokenError):
        p.drv.reap()


def test_driver_refuses_a_replayed_used_id():
    p = make_pair("packed", 8)
    bid = p.drv.add([b"x"], [4])
    p.drv.add([b"y"], [4])
    make_used(p, 0, bid, 1)
    assert len(p.drv.reap()) == 1
    make_used(p, 2, bid, 1)  # the same id again, at the next used position
    with pytest.raises(VirtqueueBrokenError):
        p.drv.reap()


def test_driver_flags_an_over_reported_used_length():
    p = make_pair("packed", 8)
    bid = p.drv.add([b"x"], [4], token="t")
    make_used(p, 0, bid, 5)
    (c,) = p.drv.reap()
    assert c.error is not None and c.length == 0 and c.token == "t"
    assert p.drv.num_free == 8


def test_driver_indirect_and_queue_full():
    p = make_pair("packed", 3, indirect=True)
    p.drv.add([b"a", b"b"], [1], indirect=True)
    p.drv.add([b"a"], [1])
    with pytest.raises(LocalProtocolError):
        p.drv.add([b"c"], [1])  # 2 wanted, 0 free
    assert p.drv.num_free == 0
    c = p.dev.pop()
    assert c.ndesc == 1 and c.read_all() == b"ab"
