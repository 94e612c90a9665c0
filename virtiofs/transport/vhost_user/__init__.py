"""vhost-user: serve a ``Filesystem`` to a QEMU guest (the virtiofsd role), or talk to a back-end.

Serving any filesystem is a few lines::

    import virtiofs
    from virtiofs.server.memfs import MemoryFS

    virtiofs.serve(MemoryFS(), socket_path="/tmp/vhost.sock")   # blocks; Ctrl-C ends it

then ``qemu-system-x86_64 ... -chardev socket,id=c,path=/tmp/vhost.sock
-device vhost-user-fs-pci,chardev=c,tag=myfs`` and ``mount -t virtiofs myfs /mnt`` in the guest.
:class:`VhostUserBackend` is the same thing as an object usable from a thread (``start()``,
``close()``).

Modules: ``messages`` (request ids, framing, payload structs, validation; shared by both ends),
``channel`` (whole messages with fds over a unix socket), ``backend`` (device state machine and
socket server), ``worker`` (the per-queue thread).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .backend import VhostUserBackend, VhostUserFsDevice
from .channel import VhostUserChannel

if TYPE_CHECKING:
    from virtiofs.server.filesystem import Filesystem

__all__ = ["VhostUserBackend", "VhostUserChannel", "VhostUserFsDevice", "make_backend", "serve"]


def make_backend(
    fs: Filesystem,
    socket_path: str | os.PathLike[str],
    *,
    session_options: dict[str, Any] | None = None,
    **options: Any,
) -> VhostUserBackend:
    """A :class:`VhostUserBackend` serving ``fs`` on ``socket_path`` (listening already).

    ``session_options`` go to each connection's ``Session(fs, ...)`` (``max_write``, ...);
    ``options`` to the back-end (``reconnect``, ``thread_pool_size``, ``tag``,
    ``num_request_queues``, ``max_request_queues``, ``features``, ``socket_mode``).
    """
    from virtiofs.server.session import Session

    sopts = dict(session_options or {})

    def session_factory() -> Session:
        return Session(fs, **sopts)

    return VhostUserBackend(session_factory, socket_path, **options)


def serve(
    fs: Filesystem,
    socket_path: str | os.PathLike[str],
    *,
    session_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Serve ``fs`` over vhost-user on ``socket_path`` until the front-end goes away (or, with
    ``reconnect=True``, until interrupted). Blocking; the socket is removed on return.

    Options as for :func:`make_backend`.
    """
    backend = make_backend(fs, socket_path, session_options=session_options, **options)
    try:
        backend.serve_forever()
    finally:
        backend.close()
