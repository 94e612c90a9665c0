"""Split virtqueue rules (split-ring.tex, SECURITY.md B2 / B6 items 11, 12, 17), one per test."""

from __future__ import annotations

import pytest
from _virtqueue_util import ELEM, U16, HostileSplitDriver, make_pair

from virtiofs.errors import (
    DescriptorChainError,
    LocalProtocolError,
    VirtqueueBrokenError,
    VirtqueueError,
)
from virtiofs.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Buffer,
    GuestMemory,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
SIZE = 8
BUF = 0x4000  # buffers from here; rings at 0
MEM = 0x10000


@pytest.fixture
def ring():
    """A device queue over a hostile hand-written split ring (indirect + event idx on)."""
    mem = GuestMemory.allocate(MEM)
    layout = SplitLayout.place(0, SIZE)
    dev = SplitDeviceQueue(mem, layout, indirect=True, event_idx=True)
    drv = HostileSplitDriver(mem, layout)
    yield mem, dev, drv
    mem.close()


def pop_error(dev) -> DescriptorChainError:
    with pytest.raises(DescriptorChainError) as ei:
        dev.pop()
    return ei.value


# -- well-formed chains ----------------------------------------------------------------------

def test_chain_is_readable_then_writable_as_byte_streams(ring):
    mem, dev, drv = ring
    mem.write(BUF, b"0123456789")
    drv.desc(0, BUF, 4, NEXT, 5)
    drv.desc(5, BUF + 4, 6, NEXT, 2)
    drv.desc(2, BUF + 100, 8, WRITE | NEXT, 3)
    drv.desc(3, BUF + 200, 8, WRITE)
    drv.publish(0)
    c = dev.pop()
    assert c.head == 0 and c.ndesc == 4
    assert c.read_all() == b"0123456789" and c.readable_len == 10
    assert c.writable_len == 16
    assert c.write(b"A" * 12) == 12
    dev.push(c)
    assert drv.used() == [(0, 12)]
    assert mem.read(BUF + 100, 8) == b"A" * 8 and mem.read(BUF + 200, 4) == b"A" * 4


def test_chain_of_exactly_queue_size_descriptors_is_accepted(ring):
    _, dev, drv = ring
    for i in range(SIZE):
        drv.desc(i, BUF + i, 1, NEXT if i < SIZE - 1 else 0, i + 1)
    drv.publish(0)
    assert dev.pop().readable_len == SIZE


def test_zero_length_descriptors_are_skipped(ring):
    _, dev, drv = ring
    drv.desc(0, 0xFFFF_FFFF_0000, 0, NEXT, 1)  # address never touched
    drv.desc(1, BUF, 4, WRITE)
    drv.publish(0)
    c = dev.pop()
    assert c.readable == [] and c.writable_len == 4


def test_write_flag_on_the_indirect_descriptor_is_ignored(ring):
    mem, dev, drv = ring
    drv.table(BUF, [(BUF + 0x100, 3, NEXT, 1), (BUF + 0x200, 5, WRITE, 0)])
    drv.desc(0, BUF, 32, INDIRECT | WRITE)
    drv.publish(0)
    c = dev.pop()
    assert (c.readable_len, c.writable_len) == (3, 5)


def test_indirect_after_direct_descriptors_is_accepted(ring):
    _, dev, drv = ring
    drv.table(BUF, [(BUF + 0x100, 3, WRITE, 0)])
    drv.desc(0, BUF + 0x300, 7, NEXT, 1)
    drv.desc(1, BUF, 16, INDIRECT)
    drv.publish(0)
    c = dev.pop()
    assert (c.readable_len, c.writable_len) == (7, 3)


def test_indirect_table_entries_follow_next_not_table_order(ring):
    mem, dev, drv = ring
    mem.write(BUF + 0x100, b"ab")
    mem.write(BUF + 0x200, b"cd")
    drv.table(BUF, [(BUF + 0x100, 2, NEXT, 2), (BUF + 0x300, 9, 0, 0), (BUF + 0x200, 2, 0, 0)])
    drv.desc(0, BUF, 48, INDIRECT)  # entry 1 is not part of the chain
    drv.publish(0)
    assert dev.pop().read_all() == b"abcd"


# -- hostile driver: chain-level errors return the head and the queue goes on -----------------

def test_bad_chain_head_is_returned_and_the_next_chain_served(ring):
    """cloud-hypervisor#8401: a parse error must not leak the head."""
    _, dev, drv = ring
    drv.desc(0, BUF, 4, NEXT, 99)
    drv.desc(1, BUF, 4)
    drv.publish(0, 1)
    err = pop_error(dev)
    assert err.head == 0 and isinstance(err, VirtqueueError)
    dev.push(err.head, 0)
    assert dev.pop().head == 1
    assert drv.used() == [(0, 0)]
    assert not dev.broken


def test_next_index_out_of_range_is_refused(ring):
    _, dev, drv = ring
    drv.desc(3, BUF, 4, NEXT, SIZE)
    drv.publish(3)
    assert pop_error(dev).head == 3


def test_descriptor_loop_is_detected(ring):
    _, dev, drv = ring
    drv.desc(0, BUF, 4, NEXT, 1)
    drv.desc(1, BUF, 4, NEXT, 0)
    drv.publish(0)
    assert "loop" in pop_error(dev).what


def test_self_loop_is_detected(ring):
    _, dev, drv = ring
    drv.desc(2, BUF, 4, WRITE | NEXT, 2)
    drv.publish(2)
    assert "loop" in pop_error(dev).what


def test_readable_after_writable_is_refused(ring):
    _, dev, drv = ring
    drv.desc(0, BUF, 4, WRITE | NEXT, 1)
    drv.desc(1, BUF, 4)
    drv.publish(0)
    assert "readable" in pop_error(dev).what


def test_readable_after_zero_length_writable_is_refused(ring):
    _, dev, drv = ring
    drv.desc(0, BUF, 0, WRITE | NEXT, 1)
    drv.desc(1, BUF, 4)
    drv.publish(0)
    assert "readable" in pop_error(dev).what


def test_readable_in_indirect_table_after_direct_writable_is_refused(ring):
    _, dev, drv = ring
    drv.table(BUF, [(BUF + 0x100, 3, 0, 0)])
    drv.desc(0, BUF + 0x300, 7, WRITE | NEXT, 1)
    drv.desc(1, BUF, 16, INDIRECT)
    drv.publish(0)
    assert "readable" in pop_error(dev).what


@pytest.mark.parametrize("addr,length", [
    (MEM - 4, 5),              # over the last byte of memory
    (MEM, 1),                  # just past it
    (2**64 - 2, 4),            # u64 wrap-around
    (0xFFFF_FFFF_FFFF_0000, 0x10000),
])
def test_buffer_outside_guest_memory_is_refused(ring, addr, length):
    _, dev, drv = ring
    drv.desc(0, addr, length)
    drv.publish(0)
    assert pop_error(dev).field == "addr"


def test_buffer_ending_on_the_last_byte_of_memory_is_accepted(ring):
    _, dev, drv = ring
    drv.desc(0, MEM - 4, 4, WRITE)
    drv.publish(0)
    assert dev.pop().writable_len == 4


def test_indirect_without_the_feature_is_refused():
    mem = GuestMemory.allocate(MEM)
    try:
        layout = SplitLayout.place(0, SIZE)
        dev = SplitDeviceQueue(mem, layout, indirect=False)
        drv = HostileSplitDriver(mem, layout)
        drv.table(BUF, [(BUF + 0x100, 3, 0, 0)])
        drv.desc(0, BUF, 16, INDIRECT)
        drv.publish(0)
        assert "INDIRECT_DESC" in pop_error(dev).what
    finally:
        mem.close()


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_length_must_be_a_nonzero_multiple_of_16(ring, length):
    _, dev, drv = ring
    drv.desc(0, BUF, length, INDIRECT)
    drv.publish(0)
    assert pop_error(dev).field == "len"


def test_indirect_table_over_65536_entries_is_refused(ring):
    """Linux vhost "Indirect buffer length too big"; refused before the table is mapped."""
    _, dev, drv = ring
    drv.desc(0, BUF, 16 * 65537, INDIRECT)
    drv.publish(0)
    assert "65536" in pop_error(dev).what


def test_indirect_table_outside_memory_is_refused(ring):
    _, dev, drv = ring
    drv.desc(0, MEM - 16, 32, INDIRECT)
    drv.publish(0)
    assert "indirect table" in pop_error(dev).what


def test_nested_indirect_is_refused(ring):
    _, dev, drv = ring
    drv.table(BUF, [(BUF + 0x100, 16, INDIRECT, 0)])
    drv.table(BUF + 0x100, [(BUF + 0x200, 4, 0, 0)])
    drv.desc(0, BUF, 16, INDIRECT)
    drv.publish(0)
    assert "nested" in pop_error(dev).what


def test_indirect_with_next_is_refused(ring):
    _, dev, drv = ring
    drv.table(BUF, [(BUF + 0x100, 4, 0, 0)])
    drv.desc(0, BUF, 16, INDIRECT | NEXT, 1)
    drv.desc(1, BUF, 4, WRITE)
    drv.publish(0)
    assert "INDIRECT and NEXT" in pop_error(dev).what


def test_loop_inside_an_indirect_table_is_detected(ring):
    _, dev, drv = ring
    drv.table(BUF, [(BUF + 0x100, 4, NEXT, 1), (BUF + 0x100, 4, NEXT, 0)])
    drv.desc(0, BUF, 32, INDIRECT)
    drv.publish(0)
    assert "loop" in pop_error(dev).what


def test_indirect_next_out_of_table_is_refused(ring):
    _, dev, drv = ring
    drv.table(BUF, [(BUF + 0x100, 4, NEXT, 2), (BUF + 0x100, 4, 0, 0)])
    drv.desc(0, BUF, 32, INDIRECT)
    drv.publish(0)
    assert pop_error(dev).field == "next"


def test_total_length_over_2_pow_32_is_refused():
    """vm-virtio#236: the sum of lengths is capped at 2**32 (sparse 2 GiB memfd, never touched)."""
    mem = GuestMemory.allocate(1 << 31)
    try:
        layout = SplitLayout.place(0, SIZE)
        dev = SplitDeviceQueue(mem, layout)
        drv = HostileSplitDriver(mem, layout)
        drv.desc(0, 0x10000, (1 << 31) - 0x10000, NEXT, 1)
        drv.desc(1, 0x10000, (1 << 31) - 0x10000, NEXT, 2)
        drv.desc(2, 0x10000, 0x30000, WRITE)
        drv.publish(0)
        assert "2**32" in pop_error(dev).what
    finally:
        mem.close()


def test_descriptor_rewritten_after_pop_does_not_change_the_chain(ring):
    """TOCTOU (kvm-host#49): the chain is built from one copy of each descriptor."""
    mem, dev, drv = ring
    drv.desc(0, BUF, 8, WRITE)
    drv.publish(0)
    c = dev.pop()
    drv.desc(0, BUF, 0xFFFF_FFFF, WRITE)
    assert c.writable_len == 8 and sum(len(v) for v in c.writable) == 8
    dev.push(c, 8)
    with pytest.raises(LocalProtocolError):
        dev.push(0, 0)  # head no longer in flight


# -- hostile driver: ring-level corruption breaks the queue -------------------------------------

def test_avail_ring_head_out_of_range_breaks_the_queue(ring):
    _, dev, drv = ring
    drv.publish(SIZE)
    with pytest.raises(VirtqueueBrokenError):
        dev.pop()
    assert dev.broken


def test_avail_idx_more_than_size_ahead_breaks_the_queue(ring):
    _, dev, drv = ring
    drv.desc(0, BUF, 4)
    drv.set_idx(SIZE + 1)
    with pytest.raises(VirtqueueBrokenError):
        dev.pop()


def test_avail_idx_exactly_size_ahead_is_accepted(ring):
    _, dev, drv = ring
    for i in range(SIZE):
        drv.desc(i, BUF, 4)
    drv.publish(*range(SIZE))
    assert len(dev.pop_many(100)) == SIZE


def test_more_chains_in_flight_than_the_ring_holds_breaks_the_queue(ring):
    """CVE-2016-5403: a driver re-posting heads the device never returned."""
    _, dev, drv = ring
    drv.desc(0, BUF, 4)
    for _ in range(SIZE):
        drv.publish(0)
        assert dev.pop() is not None
    drv.publish(0)
    with pytest.raises(VirtqueueBrokenError):
        dev.pop()


def test_a_broken_queue_pops_nothing_ignores_pushes_and_never_notifies(ring):
    _, dev, drv = ring
    drv.desc(0, BUF, 4)
    drv.publish(0)
    c = dev.pop()
    drv.set_idx(drv.idx + SIZE + 5)
    with pytest.raises(VirtqueueBrokenError):
        dev.pop()
    assert dev.pop() is None and dev.pop_many(10) == []
    dev.push(c, 0)
    assert drv.used() == []
    assert not dev.needs_notification()
    assert not dev.enable_notification()


def test_pop_many_returns_bad_chains_itself(ring):
    _, dev, drv = ring
    drv.desc(0, BUF, 4, NEXT, 0)
    drv.desc(1, BUF, 4)
    drv.publish(0, 1)
    errors = []
    chains = dev.pop_many(10, on_error=errors.append)
    assert [c.head for c in chains] == [1] and [e.head for e in errors] == [0]
    assert drv.used() == [(0, 0)]


# -- our caller's mistakes ----------------------------------------------------------------------

def test_push_checks_its_arguments(ring):
    _, dev, drv = ring
    drv.desc(0, BUF, 4, WRITE)
    drv.publish(0)
    c = dev.pop()
    with pytest.raises(LocalProtocolError):
        dev.push(c, 5)  # more than the writable bytes
    with pytest.raises(LocalProtocolError):
        dev.push(0)  # a head needs a length
    with pytest.raises(LocalProtocolError):
        dev.push(1, 0)  # never popped
    with pytest.raises(LocalProtocolError):
        dev.push(-1, 0)
    dev.push(c, 4)


def test_push_many_publishes_the_used_index_once(ring):
    mem, dev, drv = ring
    for i in range(3):
        drv.desc(i, BUF, 4, WRITE)
    drv.publish(0, 1, 2)
    chains = dev.pop_many(3)
    dev.push_many([(chains[2], 1), (chains[0], 2), (chains[1].head, 3)])
    assert drv.used() == [(2, 1), (0, 2), (1, 3)]


# -- setup validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [
    SplitLayout(SIZE, 8, 0x1000, 0x2000),       # desc not 16-aligned
    SplitLayout(SIZE, 0, 0x1001, 0x2000),       # avail not 2-aligned
    SplitLayout(SIZE, 0, 0x1000, 0x2002),       # used not 4-aligned
    SplitLayout(12, 0, 0x1000, 0x2000),         # not a power of 2
    SplitLayout(0, 0, 0x1000, 0x2000),
    SplitLayout(65536, 0, 0x100000, 0x200000),  # > 32768
    SplitLayout(SIZE, MEM - 64, 0x1000, 0x2000),  # desc table past the end of memory
    SplitLayout(SIZE, 0, 0x1000, MEM - 16),     # used ring past the end
])
def test_bad_ring_configuration_is_refused_at_setup(layout):
    mem = GuestMemory.allocate(MEM)
    try:
        with pytest.raises(VirtqueueError):
            SplitDeviceQueue(mem, layout)
        with pytest.raises(VirtqueueError):
            SplitDriverQueue(mem, layout)
    finally:
        mem.close()


def test_32768_entry_queue_is_accepted():
    mem = GuestMemory.allocate(1 << 20)
    try:
        SplitDeviceQueue(mem, SplitLayout.place(0, 32768), event_idx=True)
    finally:
        mem.close()


# -- notification suppression -------------------------------------------------------------------

def test_used_f_no_notify_suppresses_kicks():
    p = make_pair("split", SIZE)
    p.dev.disable_notification()
    p.drv.add([b"x"])
    assert not p.drv.needs_kick()
    assert p.dev.enable_notification()  # the chain is there: keep popping
    p.dev.pop()
    assert not p.dev.enable_notification()
    p.drv.add([b"x"])
    assert p.drv.needs_kick()


def test_event_idx_kick_only_when_avail_idx_crosses_avail_event():
    p = make_pair("split", SIZE, event_idx=True)
    assert not p.dev.enable_notification()  # avail_event = 0
    p.drv.add([b"a"])
    p.drv.add([b"b"])
    assert p.drv.needs_kick()  # 0 -> 2 crosses 0
    p.drv.add([b"c"])
    assert not p.drv.needs_kick()  # 2 -> 3 does not cross 0
    assert len(p.dev.pop_many(8)) == 3
    assert not p.dev.enable_notification()  # avail_event = 3
    p.drv.add([b"d"])
    assert p.drv.needs_kick()


def test_avail_f_no_interrupt_suppresses_calls():
    p = make_pair("split", SIZE)
    p.drv.disable_interrupts()
    p.drv.add([b"x"], [4])
    p.dev.push(p.dev.pop(), 0)
    assert not p.dev.needs_notification()
    assert p.drv.enable_interrupts()  # a completion is there: reap instead of sleeping
    assert len(p.drv.reap()) == 1
    assert not p.drv.enable_interrupts()
    p.drv.add([b"x"], [4])
    p.dev.push(p.dev.pop(), 0)
    assert p.dev.needs_notification()
    assert not p.dev.needs_notification()  # nothing pushed since


def test_event_idx_call_only_when_used_idx_crosses_used_event():
    p = make_pair("split", SIZE, event_idx=True)
    for _ in range(3):
        p.drv.add([b"x"])
    chains = p.dev.pop_many(3)
    p.dev.push(chains[0], 0)
    assert p.dev.needs_notification()  # first signal is always sent
    assert p.drv.enable_interrupts()  # a completion is pending: reap first
    p.drv.reap()
    assert not p.drv.enable_interrupts()  # used_event = 1
    p.dev.push(chains[1], 0)
    assert p.dev.needs_notification()  # 1 -> 2 crosses 1
    p.dev.push(chains[2], 0)
    assert not p.dev.needs_notification()  # 2 -> 3 does not


# -- vhost-user ring base -----------------------------------------------------------------------

def test_vring_base_lets_a_new_device_continue_the_ring():
    p = make_pair("split", 16)
    for i in range(5):
        p.drv.add([bytes([i])], [1], token=i)
    for _ in range(3):
        p.dev.push(p.dev.pop(), 0)
    base = p.dev.vring_base
    assert base == 3
    dev2 = SplitDeviceQueue(p.mem, p.layout, next_avail=base)  # next_used from used->idx
    assert dev2.next_used == 3
    c = dev2.pop()
    assert c.read_all() == b"\x03"
    dev2.push(c, 1)
    assert [x.token for x in p.drv.reap()] == [0, 1, 2, 3]


# -- driver side: hostile device (SECURITY.md B2, intel/MigTD#986) ------------------------------

def write_used(p, entries, idx=None):
    used = p.layout.used
    start = U16.unpack(p.mem.read(used + 2, 2))[0]
    for k, (hid, ln) in enumerate(entries):
        p.mem.write(used + 4 + 8 * ((start + k) % p.layout.size), ELEM.pack(hid, ln))
    p.mem.write(used + 2, U16.pack((start + len(entries)) if idx is None else idx))


def test_driver_refuses_a_forged_used_id():
    p = make_pair("split", SIZE)
    p.drv.add([b"x"], [4])
    write_used(p, [(5, 0)])
    with pytest.raises(VirtqueueBrokenError):
        p.drv.reap()
    assert p.drv.broken
    with pytest.raises(VirtqueueBrokenError):
        p.drv.add([b"y"])


def test_driver_refuses_a_replayed_used_id():
    p = make_pair("split", SIZE)
    h = p.drv.add([b"x"], [4])
    write_used(p, [(h, 0)])
    assert len(p.drv.reap()) == 1
    write_used(p, [(h, 0)])
    with pytest.raises(VirtqueueBrokenError):
        p.drv.reap()


def test_driver_refuses_a_mid_chain_used_id():
    p = make_pair("split", SIZE)
    p.drv.add([b"x", b"y"], [4])
    write_used(p, [(p.drv._pending[0].descs[1], 0)])
    with pytest.raises(VirtqueueBrokenError):
        p.drv.reap()


def test_driver_returns_completions_before_a_forged_one_then_breaks():
    p = make_pair("split", SIZE)
    a = p.drv.add([b"x"], [4], token="a")
    p.drv.add([b"y"], [4], token="b")
    write_used(p, [(a, 2), (7, 0)])
    done = p.drv.reap()
    assert [c.token for c in done] == ["a"]
    with pytest.raises(VirtqueueBrokenError):
        p.drv.reap()
    assert p.drv.outstanding_tokens() == ["b"]


def test_driver_refuses_used_idx_running_ahead_of_outstanding():
    p = make_pair("split", SIZE)
    p.drv.add([b"x"], [4])
    write_used(p, [], idx=2)
    with pytest.raises(VirtqueueBrokenError):
        p.drv.reap()


def test_driver_flags_an_over_reported_used_length():
    p = make_pair("split", SIZE)
    h = p.drv.add([b"x"], [4, 4], token="t")
    write_used(p, [(h, 9)])
    (c,) = p.drv.reap()
    assert c.token == "t" and c.error is not None and c.length == 0 and c.data == b""
    assert p.drv.num_free == SIZE and not p.drv.broken


def test_driver_gathers_exactly_used_length_bytes():
    p = make_pair("split", SIZE)
    p.drv.add([b"q"], [3, 5])
    c = p.dev.pop()
    c.write(b"abcdefgh")
    p.dev.push(c, 6)
    (done,) = p.drv.reap()
    assert done.data == b"abcdef" and done.length == 6


def test_driver_with_caller_buffers_and_no_allocator():
    mem = GuestMemory.allocate(MEM)
    try:
        layout = SplitLayout.place(0, SIZE)
        drv = SplitDriverQueue(mem, layout)
        dev = SplitDeviceQueue(mem, layout)
        mem.write(BUF, b"request")
        drv.add([Buffer(BUF, 7)], [Buffer(BUF + 64, 8)], gather=False)
        with pytest.raises(LocalProtocolError):
            drv.add([b"bytes need an allocator"])
        c = dev.pop()
        assert c.read_all() == b"request"
        c.write(b"reply")
        dev.push(c)
        (done,) = drv.reap()
        assert done.length == 5 and done.data == b"" and mem.read(BUF + 64, 5) == b"reply"
        with pytest.raises(LocalProtocolError):
            drv.add([Buffer(MEM - 2, 4)])
    finally:
        mem.close()


def test_driver_queue_full_publishes_nothing_and_leaks_nothing():
    p = make_pair("split", 4)
    free = p.alloc.bytes_free
    p.drv.add([b"a", b"b"], [2])
    with pytest.raises(LocalProtocolError):
        p.drv.add([b"c"], [1])  # needs 2, 1 free
    assert p.drv.outstanding == 1
    p.dev.push(p.dev.pop(), 0)
    assert p.dev.pop() is None
    p.drv.reap()
    assert p.alloc.bytes_free == free


def test_driver_indirect_uses_one_ring_descriptor():
    p = make_pair("split", 4, indirect=True, use_indirect=True)
    for i in range(4):
        p.drv.add([b"a", b"b", b"c"], [2, 2], token=i)
    assert p.drv.num_free == 0
    chains = p.dev.pop_many(10)
    assert [c.read_all() for c in chains] == [b"abc"] * 4
    assert all(c.writable_len == 4 for c in chains)
