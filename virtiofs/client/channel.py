"""How a client reaches a FUSE server: send a request, get its reply.

A :class:`Channel` carries whole FUSE messages between the driver side (our client, in the role
of the guest kernel) and a server.  It is synchronous and thread-safe: any number of threads may
have requests in flight at once, each waiting for its own reply, matched by the request's
``unique``.  Implementations:

- :class:`SessionChannel`: straight into an in-process ``Session`` (no queue, no copy of the
  request);
- :class:`~virtiofs.client.queue_channel.QueueChannel`: through a driver virtqueue in shared
  memory plus kick/call eventfds, as a guest does (the loopback transport and the vhost-user
  front-end both use it).

What a channel checks on every reply, whatever the transport (SECURITY.md B5 and the virtio-fs
validation of Linux commit 68b69fa0edb2): at least an ``out_header``, ``out_header.len`` equal to
the bytes received, no more bytes than the request allowed, ``unique`` equal to the request's.
A reply that fails raises :class:`~virtiofs.errors.ReplyError`; errno range and body sizes are
checked by ``decode_reply`` in the client.

Timeouts follow the kernel's request-timeout idea with the INTERRUPT the kernel sends over
/dev/fuse: when a request is not answered in time, the channel sends ``FUSE_INTERRUPT`` (unique
``U | 1``, on the high-priority path) and waits ``interrupt_grace`` seconds more; a reply in that
time (often ``-EINTR``) is returned, otherwise :class:`RequestTimeout` is raised and the
request's buffers are left to the server until it answers (a device may still write them).
"""

from __future__ import annotations

import abc
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import LocalProtocolError, ReplyError
from ..protocol import Opcode, encode_request_parts
from ..protocol.constants import INT_REQ_BIT
from ..protocol.structs import InterruptIn

__all__ = [
    "Buffer",
    "Channel",
    "ReplyBuffer",
    "RequestTimeout",
    "SessionChannel",
    "SessionLike",
    "check_reply_header",
    "request_unique",
]

Buffer = bytes | bytearray | memoryview

OUT_HEADER_SIZE = 16
IN_HEADER_SIZE = 40
_OUT_HEAD = struct.Struct("<IiQ")
_OPCODE_UNIQUE = struct.Struct("<IQ").unpack_from


class RequestTimeout(TimeoutError):
    """A request got no reply in time, even after an INTERRUPT."""

    def __init__(self, unique: int, opcode: int, timeout: float) -> None:
        name = Opcode(opcode).name if opcode in Opcode._value2member_map_ else str(opcode)
        super().__init__(f"{name} (unique {unique}) unanswered after {timeout:g} s")
        self.unique = unique
        self.opcode = opcode


class ReplyBuffer:
    """One reply as received: ``view`` is exactly its ``out_header.len`` bytes.

    For a queue transport the view points into the driver's shared buffer, so data is never
    copied before the client consumes it; :meth:`release` gives the buffer back (a context
    manager does it).  Using ``view`` after ``release`` is a bug.
    """

    __slots__ = ("view", "_release", "interrupted")

    def __init__(self, view: memoryview, release: Callable[[], None] | None = None) -> None:
        self.view = view
        self._release = release
        self.interrupted = False
        """Whether an INTERRUPT was sent before this reply came."""

    def release(self) -> None:
        """Give the buffer back to the transport (idempotent)."""
        rel, self._release = self._release, None
        if rel is not None:
            rel()

    def __enter__(self) -> ReplyBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def request_unique(parts: Sequence[Buffer]) -> tuple[int, int]:
    """``(unique, opcode)`` of an encoded request (the in_header is the first part)."""
    head = parts[0]
    if len(head) < IN_HEADER_SIZE:
        raise LocalProtocolError("the first request part must hold the whole in_header")
    opcode, unique = _OPCODE_UNIQUE(head, 4)
    return unique, opcode


def check_reply_header(view: memoryview, unique: int, capacity: int) -> None:
    """The transport-level reply checks (see the module docstring); raises ``ReplyError``."""
    n = len(view)
    if n < OUT_HEADER_SIZE:
        raise ReplyError(f"reply of {n} bytes is shorter than out_header", field="len")
    if n > capacity:
        raise ReplyError(f"reply of {n} bytes exceeds the {capacity} bytes the request allowed",
                         field="len")
    length, _error, got = _OUT_HEAD.unpack_from(view)
    if length != n:
        raise ReplyError(f"out_header.len {length} but {n} bytes were written", field="len")
    if got != unique:
        raise ReplyError(f"reply unique {got} answers no request in flight (expected {unique})",
                         field="unique")


class Channel(abc.ABC):
    """A synchronous, thread-safe path for FUSE requests to one server.

    Subclasses implement :meth:`_submit`, :meth:`_wait`, :meth:`_collect`, :meth:`_abandon`,
    :meth:`send` and :meth:`close`; :meth:`request` adds the timeout and INTERRUPT logic.
    """

    interrupt_grace: float = 1.0
    """Seconds to wait after an INTERRUPT before giving up on a request."""

    max_request_size: int = 1 << 30
    """Largest request (header included) the transport can carry."""

    max_reply_size: int = 1 << 30
    """Largest reply capacity the transport can offer."""

    dax_window: Any = None
    """The device's DAX window (shared memory region 0) when the transport has one."""

    def request(self, parts: Sequence[Buffer], capacity: int, *,
                timeout: float | None = None) -> ReplyBuffer:
        """Send one request (a gather list, in_header first) and wait for its reply.

        ``capacity`` is the most bytes the reply may take (out_header included): the transport
        offers exactly that much room.  Raises ``ReplyError`` for a reply that breaks the
        rules, ``RequestTimeout`` when none comes in ``timeout`` seconds (after an INTERRUPT),
        and the transport's ``ProtocolError`` when the queue itself is broken.
        """
        unique, opcode = request_unique(parts)
        if capacity < OUT_HEADER_SIZE:
            raise LocalProtocolError(f"reply capacity {capacity} < out_header")
        token = self._submit(parts, capacity, unique)
        return self._finish(token, unique, opcode, timeout)

    def request_many(self, requests: Sequence[tuple[Sequence[Buffer], int]], *,
                     timeout: float | None = None) -> list[ReplyBuffer | Exception]:
        """Several requests in flight at once (as the kernel has them for many processes):
        all are submitted before any is waited for; the results come back in order, each a
        ``ReplyBuffer`` or the exception that request raised."""
        tokens: list[tuple[Any, int, int] | Exception] = []
        for parts, capacity in requests:
            try:
                unique, opcode = request_unique(parts)
                if capacity < OUT_HEADER_SIZE:
                    raise LocalProtocolError(f"reply capacity {capacity} < out_header")
                tokens.append((self._submit(parts, capacity, unique), unique, opcode))
            except Exception as e:  # noqa: BLE001 - returned to the caller in order
                tokens.append(e)
        out: list[ReplyBuffer | Exception] = []
        for t in tokens:
            if isinstance(t, Exception):
                out.append(t)
                continue
            try:
                out.append(self._finish(*t, timeout))
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    def _finish(self, token: Any, unique: int, opcode: int,
                timeout: float | None) -> ReplyBuffer:
        if self._wait(token, timeout):
            return self._collect(token)
        assert timeout is not None
        # FUSE_INT_REQ_BIT: the interrupt's own unique is the request's with bit 0 set, and the
        # kernel never waits for an answer to it over virtio-fs (no writable part).
        self.send(encode_request_parts(Opcode.INTERRUPT, unique | INT_REQ_BIT, 0,
                                       InterruptIn(unique)))
        if self._wait(token, self.interrupt_grace):
            rb = self._collect(token)
            rb.interrupted = True
            return rb
        self._abandon(token)
        raise RequestTimeout(unique, opcode, timeout)

    @abc.abstractmethod
    def send(self, parts: Sequence[Buffer]) -> None:
        """Send a request that gets no reply (FORGET, BATCH_FORGET, INTERRUPT): the
        high-priority path of virtio-fs (queue 0)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the transport; requests in flight fail."""

    def drain(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until the server has taken every no-reply request sent
        so far; True when it has. Transports that deliver synchronously have nothing to do."""
        return True

    @abc.abstractmethod
    def _submit(self, parts: Sequence[Buffer], capacity: int, unique: int) -> Any:
        """Start a request; returns a token for the other hooks."""

    @abc.abstractmethod
    def _wait(self, token: Any, timeout: float | None) -> bool:
        """Wait until the token's reply is in (True) or ``timeout`` passes (False)."""

    @abc.abstractmethod
    def _collect(self, token: Any) -> ReplyBuffer:
        """The checked reply of a completed token (raises what the completion carried)."""

    @abc.abstractmethod
    def _abandon(self, token: Any) -> None:
        """Give up waiting; resources are reclaimed if and when the reply arrives."""

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionLike(Protocol):
    """What :class:`SessionChannel` needs of ``virtiofs.server.session.Session``."""

    def handle(self, request: bytes) -> Sequence[Buffer] | None: ...


class SessionChannel(Channel):
    """A channel straight into an in-process server session: no queue, no thread.

    ``session.handle(request_bytes)`` runs in the calling thread and returns the reply's gather
    list (or None for no-reply requests).  Timeouts cannot apply (the call is synchronous).
    """

    def __init__(self, session: SessionLike) -> None:
        self.session = session
        self._closed = False
        self._lock = threading.Lock()

    def send(self, parts: Sequence[Buffer]) -> None:
        if self._closed:
            raise LocalProtocolError("channel is closed")
        reply = self.session.handle(b"".join(parts))
        if reply is not None:
            unique, opcode = request_unique(parts)
            raise ReplyError(f"a reply to no-reply opcode {opcode} (unique {unique})",
                             field="unique")

    def request(self, parts: Sequence[Buffer], capacity: int, *,
                timeout: float | None = None) -> ReplyBuffer:
        if self._closed:
            raise LocalProtocolError("channel is closed")
        unique, _ = request_unique(parts)
        reply = self.session.handle(b"".join(parts))
        if reply is None:
            raise ReplyError(f"no reply to request {unique}", field="unique")
        data = reply[0] if len(reply) == 1 else b"".join(reply)
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        check_reply_header(view, unique, capacity)
        return ReplyBuffer(view)

    def request_many(self, requests: Sequence[tuple[Sequence[Buffer], int]], *,
                     timeout: float | None = None) -> list[ReplyBuffer | Exception]:
        out: list[ReplyBuffer | Exception] = []
        for parts, capacity in requests:
            try:
                out.append(self.request(parts, capacity, timeout=timeout))
            except Exception as e:  # noqa: BLE001 - returned to the caller in order
                out.append(e)
        return out

    def close(self) -> None:
        self._closed = True

    # The synchronous path above never uses the asynchronous hooks.
    def _submit(self, parts: Sequence[Buffer], capacity: int, unique: int) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _wait(self, token: Any, timeout: float | None) -> bool:  # pragma: no cover
        raise NotImplementedError

    def _collect(self, token: Any) -> ReplyBuffer:  # pragma: no cover
        raise NotImplementedError

    def _abandon(self, token: Any) -> None:  # pragma: no cover
        raise NotImplementedError
