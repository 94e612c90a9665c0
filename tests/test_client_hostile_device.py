"""The driver side facing a hostile device (SECURITY.md B2 "driver side", B5, B6 item 12).

A scripted device serves the loopback queues in a thread: it answers through a real
``Session(MemoryFS())`` and then tampers with one reply — forged or replayed used ids, an
over-reported used length, a wrong unique, a lying ``out_header.len``, errno out of range, a
body on an error, attributes the kernel refuses, silence.  The client must raise a typed error
(``ReplyError`` — a ``ProtocolError`` and an ``OSError(EIO)`` — or ``VirtqueueBrokenError``)
and never crash, hang, or read outside the buffers it lent.
"""

from __future__ import annotations

import errno
import select
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from virtiofs.client import Client, RequestTimeout
from virtiofs.client.queue_channel import QueueChannel
from virtiofs.errors import ProtocolError, ReplyError, VirtqueueBrokenError
from virtiofs.protocol import Opcode
from virtiofs.server.memfs import MemoryFS
from virtiofs.server.session import Session
from virtiofs.transport.loopback import LoopbackDriver
from virtiofs.virtqueue import GuestMemory, SplitDeviceQueue, SplitLayout
from virtiofs.virtqueue.chain import DescriptorChain

OUT = struct.Struct("<IiQ")
ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")

# tamper(opcode, chain, reply_bytes) -> None (default handling) or an action dict
Tamper = Callable[[int, DescriptorChain, bytes], dict[str, Any] | None]


class ScriptedDevice:
    """Serve a LoopbackDriver's queues with a real session, tampering where told."""

    def __init__(self, driver: LoopbackDriver) -> None:
        self.driver = driver
        self.mem = GuestMemory.from_fd(driver.mem.fd, driver.mem.size)
        self.session = Session(MemoryFS())
        self.queues = [SplitDeviceQueue(self.mem, SplitLayout(*q.layout),
                                        event_idx=driver.event_idx) for q in driver.queues]
        self.tamper: Tamper = lambda op, chain, reply: None
        self.hiprio_seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.mem.close()

    def _raw_push(self, qi: int, head: int, length: int) -> None:
        """Write a used element without the queue's checks (what a hostile device can do)."""
        q = self.queues[qi]
        lay = q.layout
        nu = q.next_used
        self.mem.write(lay.used + 4 + 8 * (nu % lay.size), ELEM.pack(head, length))
        nu = (nu + 1) & 0xFFFF
        self.mem.write(lay.used + 2, U16.pack(nu))
        q.next_used = nu

    def _run(self) -> None:
        kicks = [q.kick.fileno() for q in self.driver.queues]
        while not self._stop.is_set():
            select.select(kicks, [], [], 0.05)
            for qi, fd in enumerate(kicks):
                try:
                    __import__("os").eventfd_read(fd)
                except BlockingIOError:
                    pass
                while True:
                    chain = self.queues[qi].pop()
                    if chain is None:
                        break
                    self._serve(qi, chain)

    def _serve(self, qi: int, chain: DescriptorChain) -> None:
        request = chain.read_fuse_request()
        opcode = struct.unpack_from("<I", request, 4)[0]
        if qi == 0:
            self.hiprio_seen.append(opcode)
        reply = self.session.handle(request)
        data = b"".join(reply) if reply is not None else b""
        action = self.tamper(opcode, chain, data) if qi else None
        if action is None:
            chain.write(data)
            self.queues[qi].push(chain, len(data))
        elif action.get("silence"):
            return
        else:
            body = action.get("reply", data)
            if body:
                chain.write(body[:chain.writable_len])
            self._raw_push(qi, action.get("id", chain.head), action.get("len", len(body)))
            for extra_id, extra_len in action.get("extra", ()):
                self._raw_push(qi, extra_id, extra_len)
        self.driver.queues[qi].call.write(1)


@pytest.fixture
def rig() -> Iterator[tuple[Client, ScriptedDevice]]:
    driver = LoopbackDriver.create(memory_size=8 << 20, queue_size=64)
    dev = ScriptedDevice(driver)
    try:
        client = Client(QueueChannel.for_driver(driver), cache="none", timeout=10.0)
        yield client, dev
    finally:
        dev.close()
        driver.close()


def _once(op: Opcode, make: Callable[[DescriptorChain, bytes], dict[str, Any]]) -> Tamper:
    done = []

    def tamper(opcode: int, chain: DescriptorChain, reply: bytes) -> dict[str, Any] | None:
        if opcode == op and not done:
            done.append(1)
            return make(chain, reply)
        return None
    return tamper


def _set_header(reply: bytes, *, length: int | None = None, error: int | None = None,
                unique: int | None = None) -> bytes:
    ln, err, uq = OUT.unpack_from(reply)
    return OUT.pack(ln if length is None else length, err if error is None else error,
                    uq if unique is None else unique) + reply[16:]


def test_forged_used_id_breaks_the_queue(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    c.mkdir("/d")
    dev.tamper = _once(Opcode.GETATTR, lambda ch, r: {"id": (ch.head + 17) % 64})
    with pytest.raises(VirtqueueBrokenError):
        c.stat("/d")
    with pytest.raises(VirtqueueBrokenError):  # and stays broken, no hang
        c.stat("/")


def test_replayed_used_id_breaks_the_queue(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    c.mkdir("/d")
    dev.tamper = _once(Opcode.GETATTR, lambda ch, r: {"extra": [(ch.head, len(r))]})
    # The used index runs ahead of what is outstanding: seen at once or at the next reap.
    with pytest.raises(VirtqueueBrokenError):
        c.stat("/d")
        c.stat("/")


def test_over_reported_used_len(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    dev.tamper = _once(Opcode.GETATTR, lambda ch, r: {"len": ch.writable_len + 4096})
    with pytest.raises(ReplyError) as e:
        c.stat("/")
    assert e.value.errno == errno.EIO and isinstance(e.value, OSError)
    assert c.stat("/").st_ino == 1  # the queue itself is still usable


def test_wrong_unique(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    dev.tamper = _once(Opcode.GETATTR, lambda ch, r: {"reply": _set_header(r, unique=12345)})
    with pytest.raises(ReplyError, match="unique"):
        c.stat("/")
    assert c.stat("/").st_ino == 1


def test_out_header_len_differs_from_used_len(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    dev.tamper = _once(Opcode.GETATTR,
                       lambda ch, r: {"reply": _set_header(r, length=len(r) - 8)})
    with pytest.raises(ReplyError, match="len"):
        c.stat("/")


def test_used_len_shorter_than_out_header(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    dev.tamper = _once(Opcode.GETATTR, lambda ch, r: {"len": 7})
    with pytest.raises(ReplyError):
        c.stat("/")


@pytest.mark.parametrize("err", [5, -512, -100000, 1 << 30])
def test_errno_out_of_range(rig: tuple[Client, ScriptedDevice], err: int) -> None:
    c, dev = rig
    dev.tamper = _once(Opcode.GETATTR,
                       lambda ch, r: {"reply": OUT.pack(16, err, OUT.unpack_from(r)[2])})
    with pytest.raises(ReplyError):
        c.stat("/")


def test_error_with_a_body(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    dev.tamper = _once(Opcode.GETATTR,
                       lambda ch, r: {"reply": _set_header(r, error=-errno.EACCES)})
    with pytest.raises(ReplyError, match="body"):
        c.stat("/")


def test_reply_longer_than_the_opcode_allows(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    c.mkdir("/d")
    # RMDIR replies are header-only; the chain has no room for more, so claim more.
    dev.tamper = _once(Opcode.RMDIR, lambda ch, r: {"len": 24, "reply": _set_header(
        r + bytes(8), length=24)})
    with pytest.raises(ReplyError):
        c.rmdir("/d")


def test_lookup_with_invalid_file_type(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    c.mkdir("/d")

    def bad_mode(ch: DescriptorChain, r: bytes) -> dict[str, Any]:
        body = bytearray(r)
        # fuse_entry_out.attr.mode at 16 (out_header) + 40 (entry fields) + 60.
        struct.pack_into("<I", body, 16 + 40 + 60, 0o170000)
        return {"reply": bytes(body)}
    dev.tamper = _once(Opcode.LOOKUP, bad_mode)
    with pytest.raises(ReplyError, match="invalid attributes"):
        c.stat("/d")


def test_mkdir_answered_with_a_regular_file(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig

    def as_file(ch: DescriptorChain, r: bytes) -> dict[str, Any]:
        body = bytearray(r)
        struct.pack_into("<I", body, 16 + 40 + 60, 0o100644)
        return {"reply": bytes(body)}
    dev.tamper = _once(Opcode.MKDIR, as_file)
    with pytest.raises(ReplyError, match="asked for"):
        c.mkdir("/d")


def test_readdir_name_with_slash(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    c.mknod("/ab")

    def slash(ch: DescriptorChain, r: bytes) -> dict[str, Any]:
        return {"reply": r.replace(b"ab", b"a/")}
    dev.tamper = _once(Opcode.READDIRPLUS, slash)
    with pytest.raises(ReplyError):
        c.listdir("/")


def test_write_size_larger_than_sent(rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig

    def more(ch: DescriptorChain, r: bytes) -> dict[str, Any]:
        body = bytearray(r)
        struct.pack_into("<I", body, 16, 1 << 20)
        return {"reply": bytes(body)}
    dev.tamper = _once(Opcode.WRITE, more)
    with c.open("/f", "w") as f, pytest.raises(ReplyError, match="WRITE"):
        f.write(b"abc")


def test_silent_device_gets_an_interrupt_then_a_timeout(
        rig: tuple[Client, ScriptedDevice]) -> None:
    c, dev = rig
    c.timeout = 0.2
    c.channel.interrupt_grace = 0.2
    dev.tamper = _once(Opcode.GETATTR, lambda ch, r: {"silence": True})
    with pytest.raises(RequestTimeout):
        c.stat("/")
    assert Opcode.INTERRUPT in dev.hiprio_seen  # sent on the hiprio queue
    c.timeout = 10.0
    assert c.stat("/").st_ino == 1  # the abandoned request does not block the others


def test_all_errors_are_protocol_errors() -> None:
    assert issubclass(ReplyError, ProtocolError) and issubclass(ReplyError, OSError)
    assert issubclass(VirtqueueBrokenError, ProtocolError)
