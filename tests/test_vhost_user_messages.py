"""vhost-user message framing and payload validation (SPEC.md 3.1-3.5, SECURITY.md B2).

Hostile sizes, flags, region overflows and fd counts must raise VhostUserError (and the channel
must close every fd it received), never anything else.
"""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofs.errors import VhostUserError
from virtiofs.transport.vhost_user.channel import VhostUserChannel
from virtiofs.transport.vhost_user.messages import (
    HEADER,
    MAX_FDS,
    MAX_MSG_SIZE,
    BackendReq,
    FrontendReq,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    ShmemMap,
    decode_config,
    decode_header,
    decode_memory_table,
    decode_single_region,
    decode_u64,
    decode_virtio_fs_config,
    decode_vring_addr,
    decode_vring_fd_index,
    encode_config,
    encode_memory_table,
    encode_message,
    encode_single_region,
    encode_virtio_fs_config,
    validate_message,
)

U64 = struct.Struct("=Q")


def open_fds() -> set[int]:
    """Open fds of this process (without the one listdir itself used)."""
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(n))
        except OSError:
            continue
        out.add(int(n))
    return out


# -- numbering (SPEC.md 3.3-3.5) ------------------------------------------------------------

def test_frontend_request_ids_follow_the_current_numbering() -> None:
    assert FrontendReq.SET_BACKEND_REQ_FD == 21
    assert FrontendReq.GET_CONFIG == 24
    assert FrontendReq.RESET_DEVICE == 34
    assert FrontendReq.GET_MAX_MEM_SLOTS == 36
    assert FrontendReq.ADD_MEM_REG == 37
    assert FrontendReq.REM_MEM_REG == 38
    assert FrontendReq.GET_SHMEM_CONFIG == 44


def test_backend_request_ids_use_shmem_map_not_legacy_fs_map() -> None:
    # FACTS.md: 6-8 are SHARED_OBJECT now; DAX is SHMEM_MAP=9 / SHMEM_UNMAP=10.
    assert BackendReq.SHARED_OBJECT_ADD == 6
    assert BackendReq.SHMEM_MAP == 9
    assert BackendReq.SHMEM_UNMAP == 10


def test_protocol_feature_bits_match_the_capture() -> None:
    # C virtiofsd offers 0x8c2b (vhost-user-capture.txt line 4).
    bits = [ProtocolFeature.MQ, ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK,
            ProtocolFeature.BACKEND_REQ, ProtocolFeature.BACKEND_SEND_FD,
            ProtocolFeature.HOST_NOTIFIER, ProtocolFeature.CONFIGURE_MEM_SLOTS]
    assert sum(1 << b for b in bits) == 0x8C2B


# -- header ---------------------------------------------------------------------------------

def test_header_round_trip() -> None:
    data = encode_message(FrontendReq.GET_FEATURES, b"", need_reply=True)
    hdr = decode_header(data[:12])
    assert (hdr.request, hdr.flags, hdr.size) == (1, 0x9, 0)
    assert hdr.need_reply and not hdr.is_reply


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x11, 0x101, 0x8000_0001])
def test_header_refuses_wrong_version_or_reserved_flags(flags: int) -> None:
    with pytest.raises(VhostUserError):
        decode_header(HEADER.pack(1, flags, 0))


@pytest.mark.parametrize("size", [MAX_MSG_SIZE + 1, 0xFFFF_FFFF])
def test_header_refuses_oversized_payloads(size: int) -> None:
    with pytest.raises(VhostUserError):
        decode_header(HEADER.pack(1, 1, size))


def test_header_of_wrong_length() -> None:
    with pytest.raises(VhostUserError):
        decode_header(b"\x01\x00\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=12))
def test_any_header_bytes_decode_or_raise_vhost_user_error(data: bytes) -> None:
    try:
        hdr = decode_header(data)
    except VhostUserError:
        return
    assert hdr.size <= MAX_MSG_SIZE and hdr.flags & 3 == 1


# -- request shapes -------------------------------------------------------------------------

@pytest.mark.parametrize(("req", "payload"), [
    (FrontendReq.SET_FEATURES, b"\0" * 4),
    (FrontendReq.SET_FEATURES, b"\0" * 16),
    (FrontendReq.GET_FEATURES, b"\0" * 8),
    (FrontendReq.SET_OWNER, b"\0"),
    (FrontendReq.SET_VRING_ADDR, b"\0" * 39),
    (FrontendReq.ADD_MEM_REG, b"\0" * 32),
    (FrontendReq.SET_MEM_TABLE, b"\0" * 4),
    (FrontendReq.GET_CONFIG, b"\0" * 11),
])
def test_wrong_payload_sizes_are_refused(req: FrontendReq, payload: bytes) -> None:
    with pytest.raises(VhostUserError):
        validate_message(Message(req, 1, payload, []))


def test_unknown_request_is_refused() -> None:
    with pytest.raises(VhostUserError):
        validate_message(Message(999, 1, b"", []))
    with pytest.raises(VhostUserError):
        validate_message(Message(0, 1, b"", []))


@pytest.mark.parametrize(("req", "payload", "nfds"), [
    (FrontendReq.GET_FEATURES, b"", 1),                      # fd smuggled on a bodiless request
    (FrontendReq.SET_VRING_KICK, U64.pack(0), 0),            # fd announced, none attached
    (FrontendReq.SET_VRING_KICK, U64.pack(0x100), 1),        # NOFD bit, yet an fd
    (FrontendReq.SET_VRING_CALL, U64.pack(1), 2),
    (FrontendReq.ADD_MEM_REG, b"\0" * 40, 0),
    (FrontendReq.ADD_MEM_REG, b"\0" * 40, 2),
    (FrontendReq.SET_BACKEND_REQ_FD, b"", 0),
    (FrontendReq.SET_MEM_TABLE, struct.pack("=II", 2, 0) + b"\0" * 64, 1),
])
def test_wrong_fd_counts_are_refused(req: FrontendReq, payload: bytes, nfds: int) -> None:
    with pytest.raises(VhostUserError):
        validate_message(Message(req, 1, payload, [100 + i for i in range(nfds)]))


def test_right_fd_counts_pass() -> None:
    validate_message(Message(FrontendReq.SET_VRING_KICK, 1, U64.pack(3), [5]))
    validate_message(Message(FrontendReq.SET_VRING_KICK, 1, U64.pack(0x103), []))
    validate_message(Message(FrontendReq.REM_MEM_REG, 1, b"\0" * 40, []))
    validate_message(Message(FrontendReq.REM_MEM_REG, 1, b"\0" * 40, [5]))


def test_backend_channel_shapes() -> None:
    m = ShmemMap(0, 0, 2 << 20, 2 << 20, 1)
    assert len(m.encode()) == 40 and ShmemMap.decode(m.encode()) == m
    validate_message(Message(BackendReq.SHMEM_MAP, 1, m.encode(), [7]), backend_channel=True)
    with pytest.raises(VhostUserError):
        validate_message(Message(BackendReq.SHMEM_MAP, 1, m.encode(), []), backend_channel=True)
    with pytest.raises(VhostUserError):
        validate_message(Message(BackendReq.SHMEM_UNMAP, 1, m.encode()[:39], []),
                         backend_channel=True)
    with pytest.raises(VhostUserError):
        ShmemMap.decode(ShmemMap(0, 0, 2**64 - 4096, 8192, 0).encode())


# -- payloads -------------------------------------------------------------------------------

def test_vring_fd_index_reserved_bits() -> None:
    assert decode_vring_fd_index(U64.pack(5)) == (5, True)
    assert decode_vring_fd_index(U64.pack(0x105)) == (5, False)
    with pytest.raises(VhostUserError):
        decode_vring_fd_index(U64.pack(0x205))


def test_vring_addr_unknown_flags() -> None:
    with pytest.raises(VhostUserError):
        decode_vring_addr(struct.pack("=IIQQQQ", 0, 2, 0, 0, 0, 0))


def test_memory_table_round_trip_and_limits() -> None:
    regions = [MemoryRegionDesc(0, 0xA0000, 0x7F00_0000_0000, 0),
               MemoryRegionDesc(0xC0000, 0x1000_0000, 0x7F00_1000_0000, 0xC0000)]
    assert decode_memory_table(encode_memory_table(regions)) == regions
    with pytest.raises(VhostUserError):  # 0 regions
        decode_memory_table(struct.pack("=II", 0, 0))
    with pytest.raises(VhostUserError):  # 9 regions
        decode_memory_table(struct.pack("=II", 9, 0) + b"\0" * 32 * 9)
    with pytest.raises(VhostUserError):  # announces 2, carries 1
        decode_memory_table(struct.pack("=II", 2, 0) + b"\0" * 32)


@pytest.mark.parametrize("region", [
    MemoryRegionDesc(0, 0, 0, 0),                               # empty
    MemoryRegionDesc(2**64 - 4096, 8192, 0, 0),                 # gpa + size wraps
    MemoryRegionDesc(0, 8192, 2**64 - 4096, 0),                 # uaddr + size wraps
    MemoryRegionDesc(0, 8192, 0, 2**64 - 4096),                 # mmap_offset + size wraps
])
def test_region_overflows_are_refused(region: MemoryRegionDesc) -> None:
    with pytest.raises(VhostUserError):
        decode_single_region(encode_single_region(region))
    with pytest.raises(VhostUserError):
        decode_memory_table(encode_memory_table([region]))


def test_overlapping_table_regions_are_refused() -> None:
    with pytest.raises(VhostUserError):
        decode_memory_table(encode_memory_table([
            MemoryRegionDesc(0, 0x2000, 0x10000, 0), MemoryRegionDesc(0x1000, 0x2000, 0x20000, 0)]))


def test_config_bounds() -> None:
    assert decode_config(encode_config(0, b"x" * 40)).data == b"x" * 40
    with pytest.raises(VhostUserError):  # size says 40, carries 10
        decode_config(struct.pack("=III", 0, 40, 0) + b"\0" * 10)
    with pytest.raises(VhostUserError):
        decode_config(struct.pack("=III", 250, 10, 0) + b"\0" * 10)


def test_virtio_fs_config_tag_of_36_bytes_is_not_terminated() -> None:
    raw = encode_virtio_fs_config("t" * 36, 2)
    assert len(raw) == 40 and raw[:36] == b"t" * 36
    assert decode_virtio_fs_config(raw) == ("t" * 36, 2)
    assert decode_virtio_fs_config(encode_virtio_fs_config("myfs", 1)) == ("myfs", 1)


def test_u64() -> None:
    assert decode_u64(U64.pack(7)) == 7
    with pytest.raises(VhostUserError):
        decode_u64(b"\0" * 7)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(FrontendReq)), st.binary(max_size=300), st.integers(0, 10))
def test_validate_and_decode_never_raise_anything_else(req: FrontendReq, payload: bytes,
                                                       nfds: int) -> None:
    msg = Message(req, 1, payload, list(range(100, 100 + nfds)))
    try:
        validate_message(msg)
        if req is FrontendReq.SET_MEM_TABLE:
            decode_memory_table(payload)
        elif req in (FrontendReq.ADD_MEM_REG, FrontendReq.REM_MEM_REG):
            decode_single_region(payload)
        elif req is FrontendReq.SET_VRING_ADDR:
            decode_vring_addr(payload)
        elif req in (FrontendReq.GET_CONFIG, FrontendReq.SET_CONFIG):
            decode_config(payload)
    except VhostUserError:
        pass


# -- channel: fds over SCM_RIGHTS -----------------------------------------------------------

@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ca, cb = VhostUserChannel(a), VhostUserChannel(b, partial_timeout=0.5)
    try:
        yield ca, cb
    finally:
        ca.close()
        cb.close()


def test_channel_carries_fds(pair) -> None:
    a, b = pair
    efd = os.eventfd(0)
    try:
        a.send(FrontendReq.SET_VRING_KICK, U64.pack(0), fds=[efd])
    finally:
        os.close(efd)
    msg = b.recv(timeout=2)
    assert msg is not None and msg.request == FrontendReq.SET_VRING_KICK and len(msg.fds) == 1
    validate_message(msg)
    os.eventfd_write(msg.fds[0], 3)
    assert os.eventfd_read(msg.fds[0]) == 3
    msg.close_fds()


def test_channel_eof_between_messages_is_none(pair) -> None:
    a, b = pair
    a.close()
    assert b.recv(timeout=2) is None


def test_channel_timeout(pair) -> None:
    _, b = pair
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.05)


def test_channel_refuses_more_fds_than_it_has_room_for_and_closes_them(pair) -> None:
    a, b = pair
    fds = [os.eventfd(0) for _ in range(MAX_FDS + 8)]
    before = open_fds()
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        a.sock.sendmsg([encode_message(FrontendReq.GET_FEATURES)], anc)
    finally:
        for fd in fds:
            os.close(fd)
    with pytest.raises(VhostUserError):
        b.recv(timeout=2)
    assert open_fds() == before - set(fds)


def test_channel_stalled_sender_mid_message(pair) -> None:
    a, b = pair
    a.sock.sendall(HEADER.pack(FrontendReq.SET_FEATURES, 1, 8) + b"\0\0")
    with pytest.raises(VhostUserError):
        b.recv(timeout=2)


def test_channel_closes_fds_of_a_bad_header(pair) -> None:
    a, b = pair
    efd = os.eventfd(0)
    before = open_fds()
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [efd]).tobytes())]
        a.sock.sendmsg([HEADER.pack(1, 0x41, 0)], anc)
    finally:
        os.close(efd)
    with pytest.raises(VhostUserError):
        b.recv(timeout=2)
    assert open_fds() == before - {efd}


def test_channel_call_matches_the_reply(pair) -> None:
    a, b = pair
    import threading

    def answer() -> None:
        m = b.recv(timeout=2)
        assert m is not None and m.need_reply
        b.reply_u64(m, 0)

    t = threading.Thread(target=answer)
    t.start()
    assert a.call_ack(BackendReq.SHMEM_UNMAP, ShmemMap(0, 0, 0, 4096, 0).encode()) == 0
    t.join(2)
