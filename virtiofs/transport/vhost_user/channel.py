"""A vhost-user channel: whole messages with their fds over a unix stream socket.

Used for both directions of both channels: the front-end socket the back-end accepts and the
back-end request socket (``SET_BACKEND_REQ_FD``), on either side.

Receiving is bounded: the ancillary buffer has room for :data:`~.messages.MAX_FDS` descriptors
only (a peer that sends more gets ``MSG_CTRUNC``: every fd that did arrive is closed and the
message refused), payloads are at most ``MAX_MSG_SIZE``, and once a header has started arriving
the rest of the message must follow within ``partial_timeout`` seconds — a stalled front-end
cannot hold the back-end mid-message forever. fds are received ``MSG_CMSG_CLOEXEC`` so they never
leak into a child process, and any fd of a message that fails validation is closed here.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import threading
from collections.abc import Sequence

from virtiofs.errors import VhostUserError

from .messages import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_MSG_SIZE,
    Message,
    decode_header,
    decode_u64,
    encode_message,
    encode_u64,
)

__all__ = ["VhostUserChannel"]

_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
_RECV_FLAGS = socket.MSG_CMSG_CLOEXEC


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserChannel:
    """One end of a vhost-user connection.

    ``recv()`` returns a :class:`~.messages.Message` (the caller owns its fds) or ``None`` when
    the peer closed the connection between messages. ``send()`` writes one message with optional
    fds. :meth:`call` sends a request and waits for its reply under a lock, so several threads
    may issue back-end requests (DAX map/unmap from request workers) on one channel.
    :meth:`shutdown` may be called from any thread to wake a blocked ``recv``.
    """

    def __init__(self, sock: socket.socket, *, partial_timeout: float = 5.0) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("vhost-user needs a unix stream socket")
        sock.setblocking(True)
        self.sock = sock
        self.partial_timeout = partial_timeout
        self._send_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_fd(cls, fd: int, **kwargs: float) -> VhostUserChannel:
        """Wrap (and own) a socket fd received over ``SCM_RIGHTS``.

        Refuses (and closes) anything that is not a unix stream socket.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            _close_all([fd])
            raise VhostUserError(f"back-end request fd is not a socket: {e}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise VhostUserError("back-end request fd is not a unix stream socket")
        return cls(sock, **kwargs)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- receiving ------------------------------------------------------------------------

    def _wait_readable(self, timeout: float | None) -> bool:
        if timeout is None:
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def _recv_exact(self, n: int, fds: list[int], first_timeout: float | None) -> bytes | None:
        """Read exactly ``n`` bytes, collecting fds; ``None`` on EOF before the first byte."""
        chunks: list[bytes] = []
        got = 0
        timeout = first_timeout
        first = True
        while got < n:
            if not self._wait_readable(timeout):
                if first:
                    raise TimeoutError("no vhost-user message")
                raise VhostUserError(f"peer stalled mid-message ({got} of {n} bytes)")
            try:
                data, anc, flags, _ = self.sock.recvmsg(n - got, _ANCILLARY, _RECV_FLAGS)
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
                    data, anc, flags = b"", [], 0
                else:
                    raise
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % _FD_SIZE
                    fds.extend(array.array("i", cdata[:usable]))
            if flags & socket.MSG_CTRUNC:
                raise VhostUserError(f"more than {MAX_FDS} fds attached (ancillary truncated)",
                                     field="fds")
            if not data:
                if got == 0 and not chunks:
                    return None
                raise VhostUserError(f"connection closed mid-message ({got} of {n} bytes)")
            chunks.append(data)
            got += len(data)
            timeout = self.partial_timeout
            first = False
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def recv(self, timeout: float | None = None) -> Message | None:
        """Receive one message; ``None`` if the peer closed the connection cleanly.

        ``timeout`` bounds the wait for the first byte (``TimeoutError``); ``None`` waits
        forever. Raises :class:`VhostUserError` on a malformed header, too many fds, or a peer
        that stops mid-message; every fd received is closed on error.
        """
        fds: list[int] = []
        try:
            head = self._recv_exact(HEADER_SIZE, fds, timeout)
            if head is None:
                if fds:
                    raise VhostUserError("fds without a message")
                return None
            hdr = decode_header(head)
            payload = b""
            if hdr.size:
                body = self._recv_exact(hdr.size, fds, self.partial_timeout)
                if body is None:
                    raise VhostUserError("connection closed before the payload")
                payload = body
            if len(fds) > MAX_FDS:
                raise VhostUserError(f"{len(fds)} fds attached, at most {MAX_FDS}", field="fds")
            return Message(hdr.request, hdr.flags, payload, fds)
        except BaseException:
            _close_all(fds)
            raise

    # -- sending --------------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        *,
        reply: bool = False,
        need_reply: bool = False,
        fds: Sequence[int] = (),
    ) -> None:
        """Send one message (fds ride with its first byte). Thread-safe."""
        if len(payload) > MAX_MSG_SIZE:
            raise ValueError(f"payload of {len(payload)} bytes")
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} fds, at most {MAX_FDS}")
        data = memoryview(encode_message(request, payload, reply=reply, need_reply=need_reply))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        with self._send_lock:
            sent = self.sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            while sent < len(data):
                data = data[sent:]
                sent = self.sock.sendmsg([data], [], socket.MSG_NOSIGNAL)

    def reply(self, msg: Message, payload: bytes, fds: Sequence[int] = ()) -> None:
        """Answer ``msg`` (REPLY flag set, same request id)."""
        self.send(msg.request, payload, reply=True, fds=fds)

    def reply_u64(self, msg: Message, value: int) -> None:
        self.reply(msg, encode_u64(value))

    def recv_reply(self, request: int, timeout: float) -> Message:
        """Wait up to ``timeout`` s for the reply to ``request``; it must carry the REPLY flag and
        the same id (vhost-user has no request tags: replies come in order)."""
        msg = self.recv(timeout)
        if msg is None:
            raise VhostUserError(f"connection closed while waiting for the reply to {request}")
        if not msg.is_reply or msg.request != request:
            msg.close_fds()
            raise VhostUserError(
                f"expected the reply to request {request}, got request {msg.request} "
                f"flags {msg.flags:#x}")
        return msg

    def call(
        self,
        request: int,
        payload: bytes = b"",
        *,
        fds: Sequence[int] = (),
        need_reply: bool = True,
        timeout: float = 10.0,
    ) -> Message | None:
        """Send a request and, when ``need_reply``, wait for and return its reply.

        Serialised by a lock so that concurrent callers never read each other's replies.
        """
        with self._call_lock:
            self.send(request, payload, need_reply=need_reply, fds=fds)
            if not need_reply:
                return None
            return self.recv_reply(request, timeout)

    def call_ack(
        self, request: int, payload: bytes = b"", *, fds: Sequence[int] = (), timeout: float = 10.0
    ) -> int:
        """Send with NEED_REPLY and return the peer's u64 status (0 = success, REPLY_ACK)."""
        msg = self.call(request, payload, fds=fds, need_reply=True, timeout=timeout)
        assert msg is not None
        try:
            return decode_u64(msg.payload)
        finally:
            msg.close_fds()

    # -- lifetime -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Wake any thread blocked in ``recv`` (it sees EOF). Safe from any thread, idempotent."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket (idempotent). Call from the thread that owns the channel."""
        if not self._closed:
            self._closed = True
            self.shutdown()
            self.sock.close()

    def __enter__(self) -> VhostUserChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
