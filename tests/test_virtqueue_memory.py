"""GuestMemory and GuestAllocator: bounds, overflow, regions, fds (SECURITY.md B2 "address
outside guest RAM / at its end", B6 item 11)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofs.errors import GuestMemoryError, LocalProtocolError
from virtiofs.virtqueue import GuestAllocator, GuestMemory

PAGE = 4096


@pytest.fixture
def mem():
    m = GuestMemory.allocate(4 * PAGE, gpa=0x10000)
    yield m
    m.close()


@pytest.fixture
def holes():
    """Three regions: [0x1000, 0x3000) [0x3000, 0x4000) adjacent, then a hole, [0x8000, 0x9000)."""
    m = GuestMemory()
    m.allocate_region(0x1000, 0x2000)
    m.allocate_region(0x3000, 0x1000)
    m.allocate_region(0x8000, 0x1000)
    yield m
    m.close()


def test_last_byte_of_region_is_accessible(mem):
    end = 0x10000 + 4 * PAGE
    mem.write(end - 1, b"\x7f")
    assert mem.read(end - 1, 1) == b"\x7f"
    assert len(mem.translate(end - 1, 1)) == 1


def test_one_past_the_end_is_refused(mem):
    end = 0x10000 + 4 * PAGE
    with pytest.raises(GuestMemoryError):
        mem.translate(end - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.translate(end, 1)
    with pytest.raises(GuestMemoryError):
        mem.read(end - 4, 5)


def test_before_the_region_is_refused(mem):
    with pytest.raises(GuestMemoryError):
        mem.translate(0xFFFF, 1)
    with pytest.raises(GuestMemoryError):
        mem.translate(0xFFFF, 2)


def test_zero_length_at_region_end_is_empty_view(mem):
    assert len(mem.translate(0x10000 + 4 * PAGE, 0)) == 0
    assert mem.translate_sg(0xDEAD_0000, 0) == []


@pytest.mark.parametrize("gpa,length", [
    (2**64 - 1, 2), (2**64 - 16, 32), (0x10000, 2**64), (2**64, 1), (-1, 1), (0x10000, -1),
])
def test_u64_overflow_is_refused(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.translate_sg(gpa, length)


def test_translate_refuses_a_range_across_two_regions(holes):
    with pytest.raises(GuestMemoryError):
        holes.translate(0x2FF0, 0x20)


def test_translate_sg_splits_across_adjacent_regions(holes):
    holes.write(0x2FF0, bytes(range(32)))
    views = holes.translate_sg(0x2FF0, 0x20)
    assert [len(v) for v in views] == [0x10, 0x10]
    assert b"".join(views) == bytes(range(32))
    assert holes.read(0x2FF0, 32) == bytes(range(32))


def test_translate_sg_refuses_a_range_into_a_hole(holes):
    with pytest.raises(GuestMemoryError):
        holes.translate_sg(0x3FF0, 0x20)
    with pytest.raises(GuestMemoryError):
        holes.translate_sg(0x4000, 1)
    with pytest.raises(GuestMemoryError):
        holes.write(0x3FFF, b"ab")


def test_region_views_are_the_shared_pages(holes):
    holes.write(0x8000, b"abc")
    assert bytes(holes.translate(0x8000, 3)) == b"abc"
    assert holes.regions[2].view[:3].tobytes() == b"abc"


@settings(max_examples=200, deadline=None)
@given(gpa=st.integers(0, 0xA000), length=st.integers(0, 0x3000))
def test_translate_sg_matches_a_byte_model(gpa, length):
    m = GuestMemory()
    try:
        m.allocate_region(0x1000, 0x2000)
        m.allocate_region(0x3000, 0x1000)
        m.allocate_region(0x8000, 0x1000)
        backed = set(range(0x1000, 0x4000)) | set(range(0x8000, 0x9000))
        inside = all(a in backed for a in range(gpa, gpa + length))
        try:
            views = m.translate_sg(gpa, length)
        except GuestMemoryError:
            assert not inside
        else:
            assert inside
            assert sum(len(v) for v in views) == length
    finally:
        m.close()


def test_overlapping_regions_are_refused(holes):
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 0x2000)
        for gpa in (0x800, 0x2000, 0x3FFF, 0x7001):
            with pytest.raises(GuestMemoryError):
                holes.add_region(gpa, 0x1000, fd)
        holes.add_region(0x4000, 0x1000, fd)  # exactly in the hole: fine
    finally:
        os.close(fd)


def test_region_longer_than_its_file_is_refused():
    """Mapping past the end of a file would SIGBUS on first touch."""
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 0x1000)
        with pytest.raises(GuestMemoryError):
            GuestMemory.from_fd(fd, 0x2000)
        with pytest.raises(GuestMemoryError):
            GuestMemory.from_fd(fd, 0x1000, mmap_offset=0x1000)
    finally:
        os.close(fd)


@pytest.mark.parametrize("gpa,size,off,uaddr", [
    (0, 0, 0, None), (2**64 - 0x1000, 0x2000, 0, None), (0, 0x1000, 2**64 - 1, None),
    (0, 0x1000, 0, 2**64 - 0x800),
])
def test_bad_region_parameters_are_refused(gpa, size, off, uaddr):
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 0x4000)
        with pytest.raises(GuestMemoryError):
            GuestMemory.from_fd(fd, size, gpa=gpa, mmap_offset=off, uaddr=uaddr)
    finally:
        os.close(fd)


def test_from_fd_shares_pages_and_honours_unaligned_mmap_offset():
    src = GuestMemory.allocate(4 * PAGE)
    try:
        src.write(0x1234, b"hello")
        peer = GuestMemory.from_fd(src.fd, 2 * PAGE, gpa=0x100000, mmap_offset=0x1230)
        try:
            assert peer.read(0x100004, 5) == b"hello"
            peer.write(0x100000, b"XY")
            assert src.read(0x1230, 2) == b"XY"
        finally:
            peer.close()
    finally:
        src.close()


def test_from_fd_keeps_its_own_fd():
    fd = os.memfd_create("t")
    os.ftruncate(fd, PAGE)
    m = GuestMemory.from_fd(fd, PAGE)
    os.close(fd)  # the caller's copy
    m.write(0, b"ok")
    assert m.read(0, 2) == b"ok"
    assert os.fstat(m.fd).st_size == PAGE
    own = m.fd
    m.close()
    with pytest.raises(OSError):
        os.fstat(own)


def test_allocated_memfd_cannot_be_shrunk_by_a_peer():
    m = GuestMemory.allocate(PAGE)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(m.fd, 0)
    finally:
        m.close()


def test_uaddr_to_gpa():
    m = GuestMemory()
    try:
        fd = os.memfd_create("t")
        os.ftruncate(fd, 0x3000)
        m.add_region(0x0, 0x1000, fd, 0, uaddr=0x7F00_0000_0000)
        m.add_region(0x100000, 0x2000, fd, 0x1000, uaddr=0x7F00_0010_0000)
        os.close(fd)
        assert m.uaddr_to_gpa(0x7F00_0000_0010) == 0x10
        assert m.uaddr_to_gpa(0x7F00_0010_1FF0, 16) == 0x101FF0
        with pytest.raises(GuestMemoryError):
            m.uaddr_to_gpa(0x7F00_0010_1FF0, 17)
        with pytest.raises(GuestMemoryError):
            m.uaddr_to_gpa(0x7F00_0000_1000)
    finally:
        m.close()


def test_remove_region_while_a_view_is_held(holes):
    v = holes.translate(0x8000, 16)
    holes.remove_region(0x8000, 0x1000)
    with pytest.raises(GuestMemoryError):
        holes.translate(0x8000, 1)
    v[0] = 1  # still valid memory: the mapping lives until the view is dropped
    with pytest.raises(GuestMemoryError):
        holes.remove_region(0x8000)


def test_allocator_alignment_reuse_and_exhaustion(mem):
    a = GuestAllocator(mem, 0x10000, 4 * PAGE)
    x = a.alloc(100, 4096)
    y = a.alloc(3, 16)
    assert x % 4096 == 0 and y % 16 == 0 and y >= x + 100
    with pytest.raises(LocalProtocolError):
        a.alloc(4 * PAGE)
    a.free(x)
    a.free(y)
    assert a.bytes_free == 4 * PAGE
    assert a.alloc(4 * PAGE) == 0x10000
    with pytest.raises(LocalProtocolError):
        a.free(0x10001)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000), st.sampled_from([1, 16, 4096])),
                max_size=40))
def test_allocator_blocks_never_overlap(ops):
    m = GuestMemory.allocate(8 * PAGE)
    try:
        a = GuestAllocator(m, 0, 8 * PAGE)
        live: dict[int, int] = {}
        for free, n, align in ops:
            if free and live:
                addr = sorted(live)[n % len(live)]
                a.free(addr)
                del live[addr]
                continue
            try:
                addr = a.alloc(n, align)
            except LocalProtocolError:
                continue
            assert addr % align == 0 and 0 <= addr and addr + n <= 8 * PAGE
            for b, bn in live.items():
                assert addr + n <= b or b + bn <= addr
            live[addr] = n
        for addr in list(live):
            a.free(addr)
        assert a.bytes_free == 8 * PAGE
    finally:
        m.close()
