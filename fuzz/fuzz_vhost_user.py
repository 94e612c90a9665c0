"""Fuzz vhost-user message parsing and the back-end's state machine, with hostile sizes and fd
counts (SECURITY.md B2 "vhost-user message abuse", B6 item 11).

Input: a mode byte, then messages, each ``fdspec(1) header(12) payload(header.size, clamped)``.
``fdspec``: bits 0-5 how many fds ride along (0..63, MAX_FDS is 32), bits 6-7 their kind
(``/dev/null``, an eventfd, a 64 KiB memfd, a unix socket).

- mode bit 0 clear: each message goes straight to ``VhostUserFsDevice.handle`` (after
  ``decode_header``) on a fresh device served by ``Session(MemoryFS())``.
- mode bit 0 set: the whole byte stream, with the fds attached to the first chunk, goes through
  a socketpair into ``VhostUserChannel.recv`` (so the real ``SCM_RIGHTS`` path, truncated
  ancillary data included), then to the device; bit 1 sends it one byte at a time.

Properties: only the ``ProtocolError`` family (``VhostUserError``, ``GuestMemoryError``,
``VirtqueueError``); after ``device.close()`` this process holds exactly the fds it held
before the input (nothing received is leaked, nothing smuggled in is kept); rings that a
message sequence manages to start are stopped by ``close``.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Target, check, instrumented, main  # noqa: E402

with instrumented():
    from virtiofs.errors import ProtocolError
    from virtiofs.server.memfs import MemoryFS
    from virtiofs.server.session import Session
    from virtiofs.transport.vhost_user.backend import VhostUserFsDevice
    from virtiofs.transport.vhost_user.channel import VhostUserChannel
    from virtiofs.transport.vhost_user.messages import (
        HEADER,
        FrontendReq,
        MemoryRegionDesc,
        Message,
        VringAddr,
        decode_header,
        encode_memory_table,
        encode_u64,
        encode_vring_addr,
        encode_vring_state,
    )

MAX_MESSAGES = 48


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _make_fds(spec: int) -> list[int]:
    count = spec & 0x3F
    kind = spec >> 6
    fds: list[int] = []
    for _ in range(count):
        if kind == 0:
            fds.append(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        elif kind == 1:
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        elif kind == 2:
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, 0x10000)
            fds.append(fd)
        else:
            a, b = socket.socketpair()
            fds.append(a.detach())
            b.close()
    return fds


def _split(data: bytes) -> list[tuple[int, bytes]]:
    """(fdspec, raw message bytes) pairs; the payload length comes from the header."""
    out = []
    pos = 0
    while len(data) - pos >= 1 + HEADER.size and len(out) < MAX_MESSAGES:
        spec = data[pos]
        head = data[pos + 1:pos + 1 + HEADER.size]
        size = struct.unpack_from("=I", head, 8)[0]
        start = pos + 1 + HEADER.size
        body = data[start:start + min(size, 0x2000)]
        out.append((spec, head + body))
        pos = start + len(body)
    return out


def _direct(msgs: list[tuple[int, bytes]], dev: VhostUserFsDevice) -> None:
    for spec, raw in msgs:
        fds = _make_fds(spec)
        try:
            hdr = decode_header(raw[:HEADER.size])
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        msg = Message(hdr.request, hdr.flags, raw[HEADER.size:HEADER.size + hdr.size], fds)
        try:
            dev.handle(msg)
        except ProtocolError:
            continue  # a refused request; the device must go on (or the caller hangs up)


def _stream(msgs: list[tuple[int, bytes]], dev: VhostUserFsDevice, bytewise: bool) -> None:
    a, b = socket.socketpair()
    chan = VhostUserChannel(b, partial_timeout=0.05)
    try:
        fds = _make_fds(msgs[0][0]) if msgs else []
        stream = b"".join(raw for _, raw in msgs)
        a.setblocking(False)
        try:
            if fds:
                first = stream[:1] or b"\0"
                a.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", fds))])
                stream = stream[len(first):]
            if bytewise:
                for i in range(min(len(stream), 512)):
                    a.send(stream[i:i + 1])
            else:
                a.sendall(stream[:200_000])
        except (BlockingIOError, OSError):
            pass
        finally:
            for fd in fds:
                os.close(fd)  # the kernel holds its own references while in flight
        a.shutdown(socket.SHUT_WR)
        for _ in range(MAX_MESSAGES + 1):
            msg = chan.recv(timeout=0)
            if msg is None:
                break
            try:
                dev.handle(msg)
            except ProtocolError:
                continue
    except TimeoutError:
        pass
    finally:
        chan.close()
        a.close()


def one_input(data: bytes) -> None:
    if not data:
        return
    before = _open_fds()
    dev = VhostUserFsDevice(Session(MemoryFS()), tag="fuzz", num_request_queues=1,
                            max_request_queues=2)
    try:
        msgs = _split(data[1:])
        if data[0] & 1:
            _stream(msgs, dev, bool(data[0] & 2))
        else:
            _direct(msgs, dev)
    finally:
        dev.close()
        after = _open_fds()
        check(after == before, f"fd leak: {before} fds before the input, {after} after")


def _msg(req: FrontendReq, payload: bytes = b"", nfds: int = 0, kind: int = 0,
         need_reply: bool = False) -> bytes:
    flags = 1 | (8 if need_reply else 0)
    return bytes([nfds | kind << 6]) + HEADER.pack(int(req), flags, len(payload)) + payload


def seeds() -> list[bytes]:
    """QEMU 7.2's handshake (vhost-user-capture.txt) with a memfd table and eventfd rings."""
    R = FrontendReq
    table = encode_memory_table([MemoryRegionDesc(0, 0x10000, 0x7F0000000000, 0)])
    setup = [
        _msg(R.GET_FEATURES), _msg(R.GET_PROTOCOL_FEATURES),
        _msg(R.SET_PROTOCOL_FEATURES, encode_u64(0x2009)), _msg(R.GET_QUEUE_NUM),
        _msg(R.SET_OWNER), _msg(R.SET_FEATURES, encode_u64(1 << 32 | 1 << 30)),
        _msg(R.SET_MEM_TABLE, table, 1, 2),
    ]
    ring = []
    for idx in (0, 1):
        ring += [
            _msg(R.SET_VRING_NUM, encode_vring_state(idx, 8)),
            _msg(R.SET_VRING_ADDR, encode_vring_addr(VringAddr(
                idx, 0, 0x7F0000000000 + 0x1000 * idx * 4, 0x7F0000000000 + 0x1000 * idx * 4
                + 0x1000, 0x7F0000000000 + 0x1000 * idx * 4 + 0x2000, 0))),
            _msg(R.SET_VRING_BASE, encode_vring_state(idx, 0)),
            _msg(R.SET_VRING_CALL, encode_u64(idx), 1, 1),
            _msg(R.SET_VRING_KICK, encode_u64(idx), 1, 1),
            _msg(R.SET_VRING_ENABLE, encode_vring_state(idx, 1)),
        ]
    tail = [_msg(R.GET_VRING_BASE, encode_vring_state(1, 0)), _msg(R.GET_CONFIG, bytes(12 + 40)),
            _msg(R.RESET_DEVICE)]
    whole = b"".join(setup + ring + tail)
    return [b"\0" + whole, b"\1" + whole, b"\0" + b"".join(setup),
            b"\1" + _msg(R.GET_FEATURES, nfds=40), b"\0" + _msg(R.SET_MEM_TABLE, table, 3, 2),
            b"\3" + b"".join(setup[:3])]


TARGET = Target("vhost_user", one_input, seeds, allowed=(ProtocolError,), max_len=8192)

if __name__ == "__main__":
    main(TARGET)
