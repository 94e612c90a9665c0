"""The exceptions of virtiofs, named after who broke the rules (h11's model).

- ``ProtocolError``: the peer (kernel, guest, front-end, back-end) sent something malformed.
  Every decoder in this package raises only this (or a subclass) on any peer input.
- ``LocalProtocolError``: our own caller misused the API (building a message that cannot be
  valid, using a queue that is not set up).
- ``FuseError``: a filesystem result, answered to the peer as ``-errno``.
"""

from __future__ import annotations

import errno as _errno


class VirtiofsError(Exception):
    """Base of every exception raised on purpose by this package."""


class ProtocolError(VirtiofsError):
    """Malformed input from a peer.

    ``what`` says what was wrong, ``opcode``/``field``/``offset`` where, and ``errno`` is the
    error a server should answer with when it can still reply (EIO unless said otherwise).
    """

    def __init__(
        self,
        what: str,
        *,
        opcode: object = None,
        field: str | None = None,
        offset: int | None = None,
        errno: int = _errno.EIO,
    ) -> None:
        self.what = what
        self.opcode = opcode
        self.field = field
        self.offset = offset
        self.errno = errno
        where = []
        if opcode is not None:
            where.append(f"opcode {opcode}")
        if field is not None:
            where.append(f"field {field}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(what + (f" ({', '.join(where)})" if where else ""))


class GuestMemoryError(ProtocolError):
    """A guest address range outside (or wrongly across) the guest memory regions."""


class VirtqueueError(ProtocolError):
    """A malformed descriptor chain or ring state from a hostile or buggy driver/device."""


class VhostUserError(ProtocolError):
    """A malformed or out-of-order vhost-user message."""


class LocalProtocolError(VirtiofsError):
    """Our own caller misused the API."""


class FuseError(VirtiofsError):
    """A filesystem operation failed with ``errno``; the server answers ``-errno``."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        self.errno = errno
        super().__init__(errno, message or _errno.errorcode.get(errno, str(errno)))


class DescriptorChainError(VirtqueueError):
    """One malformed descriptor chain; the queue itself is still usable.

    ``head`` is what identifies the chain to the used ring (split: the head descriptor index;
    packed: the buffer id). The device returns it with ``queue.push(err.head, 0)`` and goes on
    (cloud-hypervisor#8401: a parse error that never returns the head stalls the queue).
    """

    def __init__(self, what: str, *, head: int, field: str | None = None) -> None:
        self.head = head
        super().__init__(f"{what} (chain head {head})", field=field)


class VirtqueueBrokenError(VirtqueueError):
    """Ring-level corruption (or a hostile peer): the queue is disabled until it is set up again.

    QEMU's "virtio: stop virtqueue processing if device is broken": the queue stops, the process
    and the other queues go on.
    """


class DaxMappingError(ProtocolError):
    """A DAX map/unmap request (SETUPMAPPING/REMOVEMAPPING, vhost-user SHMEM_MAP/UNMAP) refused.

    ``errno`` is what the back-end answers the FUSE request with: EINVAL for a range outside
    the window, unaligned, overflowing or overlapping wrongly; EBADF for an fd that cannot be
    mapped; EACCES for a writable mapping of a read-only fd; ENOMEM when out of mappings.
    """


class ReplyError(ProtocolError, OSError):  # type: ignore[misc]
    """A reply from a device or server that breaks the rules (SECURITY.md B5), seen by a client.

    Both a ``ProtocolError`` (the peer is at fault) and an ``OSError`` with ``errno`` (EIO by
    default), because that is what the kernel gives the application for the same reply: code
    using the client's file API catches ``OSError`` as it would around ``os`` calls.
    """

    def __init__(self, what: str, **kwargs: object) -> None:
        ProtocolError.__init__(self, what, **kwargs)  # type: ignore[arg-type]
        # OSError.__init__ (reached through the MRO) resets errno: restore what was asked.
        self.errno = kwargs.get("errno", _errno.EIO)  # type: ignore[assignment]
        self.strerror = str(self.args[0]) if self.args else what
