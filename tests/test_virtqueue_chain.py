"""DescriptorChain: byte streams over scattered buffers, FUSE requests split as Linux splits them,
zero-copy I/O straight into guest memory."""

from __future__ import annotations

import os
import struct
import tempfile

import pytest
from _virtqueue_util import make_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofs.errors import ProtocolError
from virtiofs.virtqueue import FUSE_IN_HEADER_SIZE, DescriptorChain

IN_HEADER = struct.Struct("<IIQQIIIHH")


def chain_of(readable: list[bytes], writable: list[int]) -> DescriptorChain:
    r = [memoryview(bytearray(b)) for b in readable]
    w = [memoryview(bytearray(n)) for n in writable]
    return DescriptorChain(0, r, w, sum(map(len, readable)), sum(writable), len(r) + len(w))


def fuse_request(opcode: int, body: bytes, unique: int = 7) -> bytes:
    return IN_HEADER.pack(40 + len(body), opcode, unique, 1, 0, 0, 0, 0, 0) + body


def test_in_header_size_is_40():
    assert FUSE_IN_HEADER_SIZE == 40


def test_fuse_request_split_as_linux_sends_a_write():
    """virtio_fs_enqueue_req: in_header, one argbuf with the in-args, then page buffers."""
    data = bytes(range(256)) * 32  # 8 KiB of WRITE data over two pages
    write_in = struct.pack("<QQIIQII", 1, 0, len(data), 0, 0, 0, 0)  # fuse_write_in, 40 B
    req = fuse_request(16, write_in + data)
    p = make_pair("split", 16)
    p.drv.add([req[:40], req[40:80], req[80:4176], req[4176:]], [16])
    c = p.dev.pop()
    assert len(c.readable) == 4
    assert c.read_fuse_request() == req
    c.read_pos = 40
    assert c.read(40) == write_in
    views = c.read_views(len(data))  # the page data, zero copy
    assert [len(v) for v in views] == [4096, 4096] and b"".join(views) == data
    assert c.readable_remaining == 0


def test_fuse_request_header_itself_split_across_buffers():
    req = fuse_request(3, b"\x00" * 16)
    c = chain_of([req[:3], req[3:41], req[41:]], [16])
    assert c.read_fuse_request() == req


@pytest.mark.parametrize("length", [0, 39, 57, 2**32 - 1])
def test_fuse_request_with_a_bad_len_is_refused(length):
    req = bytearray(fuse_request(3, b"\x00" * 16))
    struct.pack_into("<I", req, 0, length)
    c = chain_of([bytes(req)], [16])
    with pytest.raises(ProtocolError) as ei:
        c.read_fuse_request()
    assert ei.value.field == "len" and c.read_pos == 0


def test_fuse_request_shorter_than_a_header_is_refused():
    with pytest.raises(ProtocolError):
        chain_of([b"\x28\x00\x00\x00" + b"\x00" * 30], []).read_fuse_request()


def test_fuse_request_len_is_read_once_from_the_copy():
    """A guest rewriting in_header.len after the check cannot make us read more."""
    req = fuse_request(3, b"x" * 16)
    c = chain_of([req, b"TRAILING"], [])
    out = c.read_fuse_request()
    struct.pack_into("<I", c.readable[0], 0, 64)
    assert out == req and c.read_pos == len(req)


def test_write_scatters_over_writable_buffers():
    c = chain_of([], [16, 3, 100])
    assert c.write(b"H" * 16) == 16
    assert c.writev([b"ab", b"cdef"]) == 6
    assert c.written == 22
    assert bytes(c.writable[0]) == b"H" * 16
    assert bytes(c.writable[1]) == b"abc"
    assert bytes(c.writable[2][:3]) == b"def"


def test_write_stops_at_the_end_of_the_writable_part():
    c = chain_of([], [4, 4])
    assert c.write(b"0123456789") == 8
    assert c.write(b"x") == 0
    assert c.written == 8


def test_writev_stops_at_the_first_partial_buffer():
    c = chain_of([], [5])
    assert c.writev([b"abc", b"defg", b"hi"]) == 5
    assert bytes(c.writable[0]) == b"abcde"


def test_write_at_does_not_move_the_cursor():
    c = chain_of([], [16, 16])
    c.write_pos = 16
    c.write(b"body")
    c.write_at(0, b"header")
    assert c.write_pos == 20 and c.written == 20
    assert bytes(c.writable[0][:6]) == b"header"


def test_preadv_straight_into_guest_memory():
    """Zero copy: os.preadv fills the writable descriptors of a chain in guest memory."""
    payload = os.urandom(10000)
    with tempfile.TemporaryFile() as f:
        f.write(payload)
        f.flush()
        p = make_pair("split", 16)
        p.drv.add([b"request"], [16, 4096, 4096, 4096])
        c = p.dev.pop()
        views = c.writable_views(offset=16, length=len(payload))
        assert [len(v) for v in views] == [4096, 4096, 10000 - 8192]
        n = os.preadv(f.fileno(), views, 0)
        assert n == len(payload)
        c.write_at(0, b"H" * 16)
        p.dev.push(c, 16 + n)
        (done,) = p.drv.reap()
        assert done.data == b"H" * 16 + payload


def test_writable_views_are_clipped_and_checked():
    c = chain_of([], [8, 8])
    assert sum(len(v) for v in c.writable_views()) == 16
    assert sum(len(v) for v in c.writable_views(100, 10)) == 6
    assert c.writable_views(offset=16) == []
    with pytest.raises(ValueError):
        c.writable_views(offset=17)
    with pytest.raises(ValueError):
        c.mark_written(17)
    c.mark_written(9)
    assert c.written == 9


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=20), max_size=6),
    reads=st.lists(st.integers(-1, 30), max_size=8),
)
def test_reads_concatenate_to_the_readable_stream(parts, reads):
    c = chain_of(parts, [])
    whole = b"".join(parts)
    got = b""
    for n in reads:
        got += c.read(n)
    got += c.read()
    assert got == whole
    assert c.read_all() == whole


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20), max_size=6),
    writes=st.lists(st.binary(max_size=30), max_size=6),
)
def test_writes_fill_the_writable_stream_in_order(sizes, writes):
    c = chain_of([], sizes)
    total = sum(sizes)
    stream = b"".join(writes)
    n = c.writev(writes)
    expect = b""
    for w in writes:  # writev stops after the first buffer that did not fit entirely
        room = total - len(expect)
        expect += w[:room]
        if len(w) > room:
            break
    assert n == len(expect) <= total
    assert b"".join(bytes(v) for v in c.writable)[:n] == expect
    assert stream.startswith(expect)
