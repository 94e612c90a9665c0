"""DAX over vhost-user: SHMEM_MAP / SHMEM_UNMAP on the back-end channel, GET_SHMEM_CONFIG.

The back-end has the files, the front-end the window (QEMU's ``cache-size``, our
:class:`~virtiofs.transport.vhost_user.frontend.Frontend`'s ``dax_window``). On
FUSE_SETUPMAPPING the back-end sends ``SHMEM_MAP`` (back-end request 9) with the file's
descriptor in ``SCM_RIGHTS`` and this 40-byte packed payload (SPEC 3.2, 3.5; FACTS.md)::

    struct VhostUserMMap { u8 shmid; u8 padding[7]; u64 fd_offset; u64 shm_offset;
                           u64 len; u64 flags; /* bit 0: VHOST_USER_FLAG_MAP_RW */ }

and on FUSE_REMOVEMAPPING ``SHMEM_UNMAP`` (10, same payload, no descriptor). Both carry
NEED_REPLY: the front-end answers a u64, 0 = done, else the reason (our front-end sends the
errno; anything that is not an errno becomes EIO). ``shmid`` is 0, virtio-fs's cache region
(``VIRTIO_FS_SHMCAP_ID_CACHE``). The never-merged FS_MAP/FS_UNMAP (6/7) are never sent: ids 6-8
are SHARED_OBJECT messages now.

Negotiation: the back-end offers the SHMEM protocol feature (:data:`SHMEM_PROTOCOL_FEATURE`)
and needs BACKEND_REQ (the channel) and REPLY_ACK (the answers) as well; when all three are
acked it puts a :class:`VhostUserDaxMapper` in the session's ``extra["dax"]``, so the
filesystem's ``init`` sees it at FUSE_INIT (QEMU sends SET_PROTOCOL_FEATURES and
SET_BACKEND_REQ_FD long before the rings start). ``GET_SHMEM_CONFIG`` (front-end request 44)
answers ``struct VhostUserShMemConfig { u32 nregions; u32 padding; u64 memory_sizes[256]; }``
with one region, the window size the back-end was configured with (0: the front-end decides).

Use :class:`DaxVhostUserBackend` (or :func:`make_dax_backend`) instead of
``VhostUserBackend`` to serve a filesystem with DAX.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from virtiofs.errors import FuseError, ProtocolError, VhostUserError
from virtiofs.server.dax import DAX_EXTRA_KEY

from .backend import VhostUserBackend, VhostUserFsDevice
from .channel import VhostUserChannel
from .messages import (
    SHMEM_MAP_WRITABLE,
    BackendReq,
    FrontendReq,
    Message,
    ProtocolFeature,
    ShmemMap,
)
from .worker import RequestHandler

if TYPE_CHECKING:
    from virtiofs.server.filesystem import Filesystem

    from .frontend import Frontend

__all__ = [
    "MAX_SHMEM_REGIONS",
    "SHMEM_PROTOCOL_FEATURE",
    "VIRTIO_FS_SHMCAP_ID_CACHE",
    "DaxVhostUserBackend",
    "DaxVhostUserFsDevice",
    "VhostUserDaxMapper",
    "decode_shmem_config",
    "encode_shmem_config",
    "frontend_window_size",
    "make_dax_backend",
]

log = logging.getLogger("virtiofs.vhost_user.dax")

#: VHOST_USER_PROTOCOL_F_SHMEM. The number is in flux (SPEC 3.4): rust-vmm/vhost HEAD says 21;
#: QEMU's v11 SHMEM_MAP series said 20 until GET_VRING_BASE_INFLIGHT took 20 (Jan 2026), and no
#: QEMU release carries it yet. Both of our ends use this one constant; check a foreign peer's
#: build before negotiating it.
SHMEM_PROTOCOL_FEATURE: Final = int(ProtocolFeature.SHMEM)
#: Shared-memory region id of the virtio-fs DAX window (Linux ``virtio_fs.h``).
VIRTIO_FS_SHMCAP_ID_CACHE: Final = 0
#: ``VIRTIO_MAX_SHMEM_REGIONS``: entries of ``VhostUserShMemConfig.memory_sizes``.
MAX_SHMEM_REGIONS: Final = 256
_SHMEM_CONFIG_HEAD: Final = struct.Struct("=II")
_U64: Final = struct.Struct("=Q")
_ERRNO_LIMIT: Final = 4096
_NEEDED: Final = (1 << SHMEM_PROTOCOL_FEATURE | 1 << ProtocolFeature.BACKEND_REQ
                  | 1 << ProtocolFeature.REPLY_ACK)


def encode_shmem_config(sizes: Sequence[int]) -> bytes:
    """A ``VhostUserShMemConfig`` reply: ``nregions`` then all 256 size slots (QEMU's struct is
    the full array; rust-vmm reads ``nregions`` entries of it)."""
    if len(sizes) > MAX_SHMEM_REGIONS or any(not 0 <= s < 1 << 64 for s in sizes):
        raise ValueError(f"bad shared-memory region sizes {sizes!r}")
    padded = list(sizes) + [0] * (MAX_SHMEM_REGIONS - len(sizes))
    return _SHMEM_CONFIG_HEAD.pack(len(sizes), 0) + struct.pack(f"={MAX_SHMEM_REGIONS}Q", *padded)


def decode_shmem_config(payload: bytes) -> list[int]:
    """The region sizes of a GET_SHMEM_CONFIG reply (``nregions`` entries); VhostUserError
    when the payload is shorter than ``nregions`` says or ``nregions`` > 256."""
    if len(payload) < _SHMEM_CONFIG_HEAD.size:
        raise VhostUserError(f"GET_SHMEM_CONFIG reply of {len(payload)} bytes", field="size")
    nregions, _pad = _SHMEM_CONFIG_HEAD.unpack_from(payload)
    if nregions > MAX_SHMEM_REGIONS:
        raise VhostUserError(f"GET_SHMEM_CONFIG: {nregions} regions", field="nregions")
    need = _SHMEM_CONFIG_HEAD.size + 8 * nregions
    if len(payload) < need:
        raise VhostUserError(f"GET_SHMEM_CONFIG reply of {len(payload)} bytes for {nregions} "
                             "regions", field="size")
    return list(struct.unpack_from(f"={nregions}Q", payload, _SHMEM_CONFIG_HEAD.size))


def _status_errno(status: int) -> int:
    """The errno of a non-zero REPLY_ACK status (ours: the errno; -errno as u64 accepted)."""
    if 0 < status < _ERRNO_LIMIT:
        return status
    if (1 << 64) - _ERRNO_LIMIT < status < 1 << 64:
        return (1 << 64) - status
    return errno.EIO


class VhostUserDaxMapper:
    """A :class:`~virtiofs.server.dax.DaxMapper` that asks the front-end over the back-end
    channel.

    ``channel`` is the channel or a callable returning the current one (the device's
    ``backend_channel``, which SET_BACKEND_REQ_FD may replace). A front-end that does not answer
    within ``timeout`` seconds, or answers out of order, leaves the channel's framing in doubt:
    the mapper then refuses everything with EIO rather than risk taking a late reply for the
    answer to a later request.
    """

    def __init__(self, channel: VhostUserChannel | Callable[[], VhostUserChannel | None], *,
                 window_size: int | None = None, shmid: int = VIRTIO_FS_SHMCAP_ID_CACHE,
                 timeout: float = 10.0) -> None:
        if not 0 <= shmid <= 0xFF:
            raise ValueError(f"shmid {shmid} is not a u8")
        self._channel = channel if callable(channel) else (lambda: channel)
        self._window_size = window_size or None
        self.shmid = shmid
        self.timeout = timeout
        self.broken = False
        self.sent: dict[str, int] = {"SHMEM_MAP": 0, "SHMEM_UNMAP": 0}
        """Messages sent, by name (for tests and stats)."""

    @property
    def window_size(self) -> int | None:
        return self._window_size

    def _call(self, req: BackendReq, payload: bytes, fds: Sequence[int] = ()) -> None:
        chan = self._channel()
        if chan is None or chan.closed:
            raise FuseError(errno.EIO, "no vhost-user back-end channel")
        if self.broken:
            raise FuseError(errno.EIO, "vhost-user back-end channel out of step")
        self.sent[req.name] += 1
        try:
            status = chan.call_ack(req, payload, fds=fds, timeout=self.timeout)
        except (TimeoutError, ProtocolError) as e:
            self.broken = True
            log.error("%s: %s; DAX disabled on this connection", req.name, e)
            raise FuseError(errno.EIO, f"{req.name}: {e}") from None
        except OSError as e:
            raise FuseError(errno.EIO, f"{req.name}: {e}") from None
        if status:
            err = _status_errno(status)
            log.debug("%s refused by the front-end: %s", req.name, os.strerror(err))
            raise FuseError(err, f"front-end refused {req.name}")

    def map(self, fd: int, foffset: int, moffset: int, length: int, writable: bool) -> None:
        flags = SHMEM_MAP_WRITABLE if writable else 0
        msg = ShmemMap(self.shmid, foffset, moffset, length, flags)
        self._call(BackendReq.SHMEM_MAP, msg.encode(), (fd,))

    def unmap(self, moffset: int, length: int) -> None:
        msg = ShmemMap(self.shmid, 0, moffset, length, 0)
        self._call(BackendReq.SHMEM_UNMAP, msg.encode())


class DaxVhostUserFsDevice(VhostUserFsDevice):
    """:class:`~.backend.VhostUserFsDevice` with a DAX window: offers SHMEM, answers
    GET_SHMEM_CONFIG, and gives the session a :class:`VhostUserDaxMapper` once SHMEM,
    BACKEND_REQ and REPLY_ACK are negotiated.

    ``dax_window`` is the window size in bytes the back-end expects (reported by
    GET_SHMEM_CONFIG and used to refuse out-of-window requests before asking the front-end);
    0 leaves the size to the front-end, which checks every request itself.
    """

    def __init__(self, session: RequestHandler, *, dax_window: int = 0,
                 dax_timeout: float = 10.0, **options: Any) -> None:
        super().__init__(session, **options)
        if not 0 <= dax_window < 1 << 64:
            raise ValueError(f"dax_window {dax_window} is not a u64")
        self.dax_window = dax_window
        self.dax_timeout = dax_timeout
        self.offered_protocol_features |= 1 << SHMEM_PROTOCOL_FEATURE
        self.dax_mapper: VhostUserDaxMapper | None = None

    @property
    def dax_negotiated(self) -> bool:
        return self.acked_protocol_features & _NEEDED == _NEEDED

    def _set_protocol_features(self, msg: Message) -> None:
        super()._set_protocol_features(msg)
        extra = getattr(self.session, "extra", None)
        if not isinstance(extra, dict):
            log.warning("the session has no 'extra' dict: DAX unavailable")
            return None
        if self.dax_negotiated:
            self.dax_mapper = VhostUserDaxMapper(lambda: self.backend_channel,
                                                 window_size=self.dax_window or None,
                                                 timeout=self.dax_timeout)
            extra[DAX_EXTRA_KEY] = self.dax_mapper
        else:
            self.dax_mapper = None
            extra.pop(DAX_EXTRA_KEY, None)
        return None

    def _get_shmem_config(self, msg: Message) -> bytes:
        if not self.acked_protocol_features >> SHMEM_PROTOCOL_FEATURE & 1:
            raise VhostUserError("GET_SHMEM_CONFIG without the SHMEM protocol feature")
        return encode_shmem_config([self.dax_window])


class DaxVhostUserBackend(VhostUserBackend):
    """:class:`~.backend.VhostUserBackend` whose connections get :class:`DaxVhostUserFsDevice`
    (device options ``dax_window``, ``dax_timeout`` accepted)."""

    device_class = DaxVhostUserFsDevice


def make_dax_backend(fs: Filesystem, socket_path: str | os.PathLike[str], *,
                     dax_window: int = 0, session_options: dict[str, Any] | None = None,
                     **options: Any) -> DaxVhostUserBackend:
    """Like :func:`virtiofs.transport.vhost_user.make_backend`, with DAX (the filesystem must
    implement SETUPMAPPING, e.g. PassthroughFS)."""
    from virtiofs.server.session import Session

    sopts = dict(session_options or {})

    def session_factory() -> Session:
        return Session(fs, **sopts)

    return DaxVhostUserBackend(session_factory, socket_path, dax_window=dax_window, **options)


def frontend_window_size(fe: Frontend) -> int:
    """The DAX window size a front-end should create: its own ``dax_window`` when positive (the
    ``--cache-size`` of QEMU), else what the back-end asks for in GET_SHMEM_CONFIG (when SHMEM
    is negotiated); 0 = no window. Called by the front-end once SHMEM is negotiated."""
    own = fe.dax_window_size
    backend = 0
    if fe.acked_protocol_features >> SHMEM_PROTOCOL_FEATURE & 1:
        sizes = decode_shmem_config(fe._get(FrontendReq.GET_SHMEM_CONFIG))
        backend = sizes[VIRTIO_FS_SHMCAP_ID_CACHE] if sizes else 0
    if own > 0:
        if backend and backend != own:
            log.warning("back-end expects a %#x-byte DAX window, front-end configured %#x: "
                        "using %#x", backend, own, own)
        return own
    return backend
