"""vhost-user messages: request ids, header framing and payload structs, strictly validated.

Shared by both ends of the protocol: the back-end (``backend.py``, the virtiofsd role) decodes
front-end requests and encodes replies; a front-end encodes requests and decodes replies; both
use the back-end channel enums. Nothing here touches a socket (``channel.py`` does).

Wire facts (SPEC.md 3.1-3.5, QEMU ``docs/interop/vhost-user.rst``, rust-vmm/vhost
``vhost_user/message.rs``):

- header ``{u32 request; u32 flags; u32 size}`` in host byte order (little-endian on x86-64);
  flags bits 0-1 = version (must be 1), bit 2 = REPLY, bit 3 = NEED_REPLY, every other bit is
  reserved and refused (rust-vmm ``VhostUserMsgHeader::is_valid``); ``size <= 0x1000``.
- file descriptors ride in ``SCM_RIGHTS`` with the message; each request accepts an exact
  number of them, anything else is refused (rust-vmm ``IncorrectFds``) so an fd can never be
  smuggled in and leak.
- memory-region descriptors are checked for emptiness and u64 overflow of ``gpa``, ``uaddr``
  and ``mmap_offset`` plus size before anyone maps them (rust-vmm ``VhostUserMemoryRegion::
  is_valid``).

Every decoder raises :class:`~virtiofs.errors.VhostUserError` (a ``ProtocolError``) on any
malformed input and nothing else.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from virtiofs.errors import LocalProtocolError, VhostUserError

__all__ = [
    "BACKEND_REQ_FDS",
    "FRONTEND_REQ_FDS",
    "HEADER",
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS_TABLE",
    "MAX_CONFIG_SIZE",
    "MAX_MSG_SIZE",
    "SHMEM_MAP_WRITABLE",
    "VHOST_VRING_F_LOG",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_F_LOG_ALL",
    "VHOST_USER_VERSION",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "VIRTIO_FS_CONFIG_SIZE",
    "VIRTIO_FS_TAG_SIZE",
    "BackendReq",
    "ConfigSpace",
    "FrontendReq",
    "Header",
    "HeaderFlags",
    "LogRegion",
    "MemoryRegionDesc",
    "Message",
    "ProtocolFeature",
    "ShmemMap",
    "VirtioFeature",
    "VringAddr",
    "VringState",
    "decode_config",
    "decode_header",
    "decode_log",
    "decode_memory_table",
    "decode_single_region",
    "decode_u64",
    "decode_virtio_fs_config",
    "decode_vring_addr",
    "decode_vring_fd_index",
    "decode_vring_state",
    "encode_config",
    "encode_header",
    "encode_memory_table",
    "encode_message",
    "encode_single_region",
    "encode_u64",
    "encode_virtio_fs_config",
    "encode_vring_addr",
    "encode_vring_state",
    "features_str",
    "validate_message",
]

# -- framing --------------------------------------------------------------------------------

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
#: rust-vmm ``MAX_MSG_SIZE``: no vhost-user payload is larger (the memory table is 8 + 8 x 32).
MAX_MSG_SIZE = 0x1000
#: rust-vmm ``MAX_ATTACHED_FD_ENTRIES``: the receive buffer has room for this many fds only.
MAX_FDS = 32
VHOST_USER_VERSION = 0x1
#: ``SET_MEM_TABLE`` carries at most 8 regions (``VHOST_MEMORY_BASELINE_NREGIONS``).
MAX_MEM_REGIONS_TABLE = 8

#: SET_VRING_KICK/CALL/ERR u64 payload: bits 0-7 queue index, bit 8 "no fd attached".
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8

#: ``struct virtio_fs_config``: tag[36], le32 num_request_queues (Linux uapi, 40 bytes; the
#: spec's notify_buf_size is only meaningful with VIRTIO_FS_F_NOTIFICATION, which Linux never
#: negotiates - SPEC.md 2.1).
VIRTIO_FS_TAG_SIZE = 36
VIRTIO_FS_CONFIG_SIZE = 40


class HeaderFlags(enum.IntFlag):
    """Header ``flags`` bits (SPEC.md 3.1)."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


_VERSION_MASK = 0x3
_KNOWN_FLAGS = int(_VERSION_MASK | HeaderFlags.REPLY | HeaderFlags.NEED_REPLY)


class FrontendReq(enum.IntEnum):
    """Front-end -> back-end request ids (rust-vmm ``FrontendReq``; SPEC.md 3.3)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendReq(enum.IntEnum):
    """Back-end -> front-end request ids on the ``SET_BACKEND_REQ_FD`` socket (SPEC.md 3.5).

    Ids 6-8 are SHARED_OBJECT messages now: the never-merged FS_MAP/FS_UNMAP (6/7) must not be
    sent (FACTS.md). DAX uses SHMEM_MAP/SHMEM_UNMAP.
    """

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    """``VHOST_USER_PROTOCOL_F_*`` bit numbers (SPEC.md 3.4). Use ``1 << bit`` in a mask.

    SHMEM's number is in flux (QEMU's v11 patch said 20 before GET_VRING_BASE_INFLIGHT took it);
    21 is rust-vmm's. Negotiate it only with a peer known to use the same number.
    """

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    SHMEM = 21


class VirtioFeature(enum.IntEnum):
    """Virtio device-independent feature bit numbers used by vhost-user-fs (SPEC.md 2.2)."""

    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26  # VHOST_F_LOG_ALL: dirty logging for migration
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35


VHOST_USER_F_PROTOCOL_FEATURES = 1 << VirtioFeature.PROTOCOL_FEATURES
VHOST_F_LOG_ALL = 1 << VirtioFeature.LOG_ALL


def features_str(mask: int, names: type[enum.IntEnum] = VirtioFeature) -> str:
    """``0x170000000 [INDIRECT_DESC, EVENT_IDX, ...]`` for logs."""
    known = {int(m): m.name for m in names}
    bits = [known.get(b, f"bit{b}") for b in range(64) if mask >> b & 1]
    return f"{mask:#x} [{', '.join(bits)}]"


# -- fd rules -------------------------------------------------------------------------------

#: How many fds each front-end request carries: an exact count, or a (min, max) range.
#: Requests whose count depends on the payload (SET_MEM_TABLE: one per region; KICK/CALL/ERR:
#: none when the NOFD bit is set) are refined by :func:`validate_message`.
FRONTEND_REQ_FDS: dict[int, tuple[int, int]] = {
    FrontendReq.SET_MEM_TABLE: (1, MAX_MEM_REGIONS_TABLE),
    FrontendReq.SET_LOG_BASE: (1, 1),
    FrontendReq.SET_LOG_FD: (1, 1),
    FrontendReq.SET_VRING_KICK: (0, 1),
    FrontendReq.SET_VRING_CALL: (0, 1),
    FrontendReq.SET_VRING_ERR: (0, 1),
    FrontendReq.SET_BACKEND_REQ_FD: (1, 1),
    FrontendReq.SET_INFLIGHT_FD: (1, 1),
    FrontendReq.GPU_SET_SOCKET: (1, 1),
    FrontendReq.ADD_MEM_REG: (1, 1),
    # QEMU attaches the region's fd to REM_MEM_REG too (libvhost-user accepts at most one).
    FrontendReq.REM_MEM_REG: (0, 1),
    FrontendReq.SET_DEVICE_STATE_FD: (1, 1),
}

#: The same for back-end -> front-end requests.
BACKEND_REQ_FDS: dict[int, tuple[int, int]] = {
    BackendReq.VRING_HOST_NOTIFIER_MSG: (0, 1),
    BackendReq.SHARED_OBJECT_LOOKUP: (0, 1),
    BackendReq.SHMEM_MAP: (1, 1),
}


# -- payload shapes -------------------------------------------------------------------------

_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")
_VRING_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")
_MEM_TABLE_HEAD = struct.Struct("=II")
_SINGLE_REGION = struct.Struct("=QQQQQ")
_LOG = struct.Struct("=QQ")
_CONFIG_HEAD = struct.Struct("=III")
_SHMEM_MAP = struct.Struct("=B7xQQQQ")
_U64_LIMIT = 1 << 64

#: Exact payload sizes of fixed-size requests; requests absent here and from ``_VARIABLE`` have
#: no payload (size must be 0). Requests we never implement are still framed strictly.
_FIXED_SIZE: dict[int, int] = {
    FrontendReq.SET_FEATURES: 8,
    FrontendReq.SET_VRING_NUM: 8,
    FrontendReq.SET_VRING_ADDR: _VRING_ADDR.size,
    FrontendReq.SET_VRING_BASE: 8,
    FrontendReq.GET_VRING_BASE: 8,
    FrontendReq.SET_VRING_KICK: 8,
    FrontendReq.SET_VRING_CALL: 8,
    FrontendReq.SET_VRING_ERR: 8,
    FrontendReq.SET_PROTOCOL_FEATURES: 8,
    FrontendReq.SET_VRING_ENABLE: 8,
    FrontendReq.SEND_RARP: 8,
    FrontendReq.NET_SET_MTU: 8,
    FrontendReq.SET_VRING_ENDIAN: 8,
    FrontendReq.SET_LOG_BASE: _LOG.size,
    FrontendReq.ADD_MEM_REG: _SINGLE_REGION.size,
    FrontendReq.REM_MEM_REG: _SINGLE_REGION.size,
    FrontendReq.VRING_KICK: 8,
    FrontendReq.SET_STATUS: 8,
    FrontendReq.SET_DEVICE_STATE_FD: 8,
}
#: Requests whose payload size is checked by its decoder (memory table, config, ...); the value
#: is the minimum size.
_VARIABLE_SIZE: dict[int, int] = {
    FrontendReq.SET_MEM_TABLE: _MEM_TABLE_HEAD.size,
    FrontendReq.GET_CONFIG: _CONFIG_HEAD.size,
    FrontendReq.SET_CONFIG: _CONFIG_HEAD.size,
    FrontendReq.IOTLB_MSG: 26,
    FrontendReq.GET_INFLIGHT_FD: 20,
    FrontendReq.SET_INFLIGHT_FD: 20,
    FrontendReq.CREATE_CRYPTO_SESSION: 0,
    FrontendReq.CLOSE_CRYPTO_SESSION: 8,
    FrontendReq.GET_SHARED_OBJECT: 16,
}


class Header(NamedTuple):
    """A decoded message header."""

    request: int
    flags: int
    size: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and validate a 12-byte header: version 1, no reserved bit, ``size <= 0x1000``.

    The request id is not checked here (the two channels have different id spaces).
    """
    if len(data) != HEADER_SIZE:
        raise VhostUserError(f"vhost-user header is {len(data)} bytes, not {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(data)
    if flags & _VERSION_MASK != VHOST_USER_VERSION:
        raise VhostUserError(f"vhost-user version {flags & _VERSION_MASK}, not 1", field="flags")
    if flags & ~_KNOWN_FLAGS:
        raise VhostUserError(f"reserved header flag bits set: {flags:#x}", field="flags")
    if size > MAX_MSG_SIZE:
        raise VhostUserError(f"payload size {size} exceeds {MAX_MSG_SIZE}", field="size")
    return Header(request, flags, size)


def encode_header(request: int, size: int, *, reply: bool = False, need_reply: bool = False) -> bytes:
    """Build a header (version 1, plus REPLY/NEED_REPLY as asked)."""
    if not 0 <= size <= MAX_MSG_SIZE:
        raise LocalProtocolError(f"vhost-user payload of {size} bytes")
    flags = VHOST_USER_VERSION
    if reply:
        flags |= HeaderFlags.REPLY
    if need_reply:
        flags |= HeaderFlags.NEED_REPLY
    return HEADER.pack(request, flags, size)


def encode_message(
    request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False
) -> bytes:
    """Header + payload, ready for ``sendmsg``."""
    return encode_header(request, len(payload), reply=reply, need_reply=need_reply) + payload


@dataclass
class Message:
    """One received message: header fields, payload and the fds that came with it.

    The receiver owns ``fds``: whoever consumes the message takes the fds it needs (setting
    the list entries to -1 or clearing the list) and :meth:`close_fds` closes the rest.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    def name(self, enum_cls: type[enum.IntEnum] = FrontendReq) -> str:
        try:
            return enum_cls(self.request).name
        except ValueError:
            return f"request {self.request}"

    def take_fd(self, i: int = 0) -> int:
        """Take ownership of fd ``i`` (the message will not close it)."""
        fd = self.fds[i]
        self.fds[i] = -1
        return fd

    def close_fds(self) -> None:
        """Close every fd not taken."""
        fds, self.fds = self.fds, []
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def validate_message(msg: Message, *, backend_channel: bool = False) -> None:
    """Check a received request's id, payload size and fd count (syntax before semantics).

    ``backend_channel=True`` checks a back-end -> front-end request (the front-end's side of
    ``SET_BACKEND_REQ_FD``). Replies are not validated here: their shape is known only to the
    code that asked. Raises :class:`VhostUserError`; the caller closes ``msg.fds``.
    """
    nfds = len(msg.fds)
    if nfds > MAX_FDS:
        raise VhostUserError(f"{nfds} fds attached, at most {MAX_FDS}")
    if backend_channel:
        try:
            breq = BackendReq(msg.request)
        except ValueError:
            raise VhostUserError(f"unknown back-end request {msg.request}",
                                 field="request") from None
        lo, hi = BACKEND_REQ_FDS.get(breq, (0, 0))
        if breq in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
            if len(msg.payload) != _SHMEM_MAP.size:
                raise VhostUserError(f"{breq.name} payload is {len(msg.payload)} bytes, not 40",
                                     field="size")
        elif breq in (BackendReq.VRING_CALL, BackendReq.VRING_ERR) and len(msg.payload) != 8:
            raise VhostUserError(f"{breq.name} payload is {len(msg.payload)} bytes, not 8",
                                 field="size")
        if not lo <= nfds <= hi:
            raise VhostUserError(f"{breq.name} with {nfds} fds (expected {lo}..{hi})", field="fds")
        return
    try:
        req = FrontendReq(msg.request)
    except ValueError:
        raise VhostUserError(f"unknown front-end request {msg.request}", field="request") from None
    size = len(msg.payload)
    fixed = _FIXED_SIZE.get(req)
    if fixed is not None:
        if size != fixed:
            raise VhostUserError(f"{req.name} payload is {size} bytes, not {fixed}", field="size")
    elif req in _VARIABLE_SIZE:
        if size < _VARIABLE_SIZE[req]:
            raise VhostUserError(f"{req.name} payload is {size} bytes, too short", field="size")
    elif size:
        # Bodiless requests (GET_FEATURES, SET_OWNER, GET_QUEUE_NUM, ...): exactly 0, as
        # rust-vmm's ``check_request_size(hdr, size, 0)`` demands.
        raise VhostUserError(f"{req.name} carries a {size}-byte payload", field="size")
    lo, hi = FRONTEND_REQ_FDS.get(req, (0, 0))
    if req in (FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR):
        (value,) = _U64.unpack(msg.payload)
        lo = hi = 0 if value & VHOST_USER_VRING_NOFD_MASK else 1
    elif req is FrontendReq.SET_MEM_TABLE:
        (nregions, _pad) = _MEM_TABLE_HEAD.unpack_from(msg.payload)
        lo = hi = nregions
    if not lo <= nfds <= hi:
        raise VhostUserError(f"{req.name} with {nfds} fds (expected {lo}..{hi})", field="fds")


# -- payload codecs -------------------------------------------------------------------------

def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise VhostUserError(f"{what} payload is {len(payload)} bytes, not {size}", field="size")


def decode_u64(payload: bytes) -> int:
    """A u64 payload (features, queue numbers, REPLY_ACK status)."""
    _need(payload, 8, "u64")
    value: int = _U64.unpack(payload)[0]
    return value


def encode_u64(value: int) -> bytes:
    if not 0 <= value < _U64_LIMIT:
        raise LocalProtocolError(f"u64 payload {value} out of range")
    return _U64.pack(value)


class VringState(NamedTuple):
    """``struct vhost_vring_state {u32 index; u32 num;}`` (NUM, BASE, ENABLE, GET_VRING_BASE)."""

    index: int  # type: ignore[assignment]  # the C field name, shadowing tuple.index
    num: int


def decode_vring_state(payload: bytes) -> VringState:
    _need(payload, 8, "vring state")
    return VringState(*_VRING_STATE.unpack(payload))


def encode_vring_state(index: int, num: int) -> bytes:
    return _VRING_STATE.pack(index, num)


def decode_vring_fd_index(payload: bytes) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR u64: ``(queue index, fd attached)``.

    Bits 9-63 are reserved and refused (QEMU never sets them).
    """
    value = decode_u64(payload)
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise VhostUserError(f"reserved bits in vring fd payload {value:#x}", field="index")
    return value & VHOST_USER_VRING_IDX_MASK, not value & VHOST_USER_VRING_NOFD_MASK


class VringAddr(NamedTuple):
    """``struct vhost_vring_addr`` (40 B): addresses are front-end virtual addresses.

    For a packed ring ``desc`` is the descriptor ring, ``avail`` the driver event area and
    ``used`` the device event area.
    """

    index: int  # type: ignore[assignment]  # the C field name, shadowing tuple.index
    flags: int
    desc: int
    used: int
    avail: int
    log: int


#: ``VHOST_VRING_F_LOG``: the ring's used area is dirty-logged at ``log``.
VHOST_VRING_F_LOG = 1


def decode_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, _VRING_ADDR.size, "vring address")
    addr = VringAddr(*_VRING_ADDR.unpack(payload))
    if addr.flags & ~VHOST_VRING_F_LOG:
        raise VhostUserError(f"unknown vring address flags {addr.flags:#x}", field="flags")
    return addr


def encode_vring_addr(addr: VringAddr) -> bytes:
    return _VRING_ADDR.pack(*addr)


class MemoryRegionDesc(NamedTuple):
    """One ``VhostUserMemoryRegion``: where the fd's pages sit in guest and front-end space."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def validate(self) -> None:
        """Non-empty, and ``gpa``/``uaddr``/``mmap_offset`` + size do not overflow u64."""
        size = self.memory_size
        if size == 0:
            raise VhostUserError("memory region of size 0", field="memory_size")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(self, name) + size > _U64_LIMIT:
                raise VhostUserError(f"memory region {name} + size overflows u64", field=name)


def decode_memory_table(payload: bytes) -> list[MemoryRegionDesc]:
    """``SET_MEM_TABLE``: ``{u32 nregions; u32 padding; region[nregions]}``, 1..8 regions.

    The payload must be exactly as long as the regions it announces (QEMU sends
    ``8 + 32 * nregions``; a longer fixed array of 8 is also accepted, rust-vmm style).
    Regions must not overlap in guest-physical space.
    """
    if len(payload) < _MEM_TABLE_HEAD.size:
        raise VhostUserError("memory table shorter than its header", field="size")
    nregions, _pad = _MEM_TABLE_HEAD.unpack_from(payload)
    if not 1 <= nregions <= MAX_MEM_REGIONS_TABLE:
        raise VhostUserError(f"memory table with {nregions} regions", field="nregions")
    need = _MEM_TABLE_HEAD.size + nregions * _REGION.size
    full = _MEM_TABLE_HEAD.size + MAX_MEM_REGIONS_TABLE * _REGION.size
    if len(payload) not in (need, full):
        raise VhostUserError(f"memory table of {nregions} regions in {len(payload)} bytes",
                             field="size")
    regions = [
        MemoryRegionDesc(*_REGION.unpack_from(payload, _MEM_TABLE_HEAD.size + i * _REGION.size))
        for i in range(nregions)
    ]
    for r in regions:
        r.validate()
    spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in regions)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise VhostUserError("memory table regions overlap", field="guest_phys_addr")
    return regions


def encode_memory_table(regions: Sequence[MemoryRegionDesc]) -> bytes:
    if not 1 <= len(regions) <= MAX_MEM_REGIONS_TABLE:
        raise LocalProtocolError(f"memory table with {len(regions)} regions")
    return _MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(_REGION.pack(*r) for r in regions)


def decode_single_region(payload: bytes) -> MemoryRegionDesc:
    """``ADD_MEM_REG``/``REM_MEM_REG``: ``{u64 padding; region}`` (40 B)."""
    _need(payload, _SINGLE_REGION.size, "single memory region")
    _pad, *fields = _SINGLE_REGION.unpack(payload)
    region = MemoryRegionDesc(*fields)
    region.validate()
    return region


def encode_single_region(region: MemoryRegionDesc) -> bytes:
    return _SINGLE_REGION.pack(0, *region)


class LogRegion(NamedTuple):
    """``SET_LOG_BASE``: ``{u64 mmap_size; u64 mmap_offset}`` + fd."""

    mmap_size: int
    mmap_offset: int


def decode_log(payload: bytes) -> LogRegion:
    _need(payload, _LOG.size, "log")
    return LogRegion(*_LOG.unpack(payload))


class ConfigSpace(NamedTuple):
    """``GET_CONFIG``/``SET_CONFIG``: ``{u32 offset; u32 size; u32 flags; u8 payload[size]}``."""

    offset: int
    size: int
    flags: int
    data: bytes


#: QEMU's ``VHOST_USER_MAX_CONFIG_SIZE``.
MAX_CONFIG_SIZE = 256


def decode_config(payload: bytes) -> ConfigSpace:
    """Config message; ``size`` must match the bytes that follow and be <= 256."""
    if len(payload) < _CONFIG_HEAD.size:
        raise VhostUserError("config payload shorter than its header", field="size")
    offset, size, flags = _CONFIG_HEAD.unpack_from(payload)
    data = payload[_CONFIG_HEAD.size:]
    if size > MAX_CONFIG_SIZE or len(data) != size:
        raise VhostUserError(f"config of {size} bytes with {len(data)} bytes attached",
                             field="size")
    if offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise VhostUserError(f"config range {offset}+{size} out of bounds", field="offset")
    return ConfigSpace(offset, size, flags, bytes(data))


def encode_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return _CONFIG_HEAD.pack(offset, len(data), flags) + data


def encode_virtio_fs_config(tag: str, num_request_queues: int) -> bytes:
    """``struct virtio_fs_config`` (40 B): UTF-8 tag NUL-padded to 36 bytes (not terminated when
    36 long), le32 num_request_queues."""
    raw = tag.encode()
    if not 1 <= len(raw) <= VIRTIO_FS_TAG_SIZE or b"\0" in raw:
        raise LocalProtocolError(f"virtio-fs tag {tag!r} must be 1..36 bytes without NUL")
    if num_request_queues < 1:
        raise LocalProtocolError("num_request_queues must be >= 1")
    return raw.ljust(VIRTIO_FS_TAG_SIZE, b"\0") + struct.pack("<I", num_request_queues)


def decode_virtio_fs_config(data: bytes) -> tuple[str, int]:
    """Inverse of :func:`encode_virtio_fs_config`: ``(tag, num_request_queues)``."""
    if len(data) < VIRTIO_FS_CONFIG_SIZE:
        raise VhostUserError(f"virtio_fs_config of {len(data)} bytes", field="size")
    tag = data[:VIRTIO_FS_TAG_SIZE].split(b"\0", 1)[0]
    try:
        text = tag.decode()
    except UnicodeDecodeError:
        raise VhostUserError("virtio-fs tag is not UTF-8", field="tag") from None
    (nq,) = struct.unpack_from("<I", data, VIRTIO_FS_TAG_SIZE)
    return text, nq


class ShmemMap(NamedTuple):
    """``SHMEM_MAP``/``SHMEM_UNMAP`` payload (40 B, packed): map ``len`` bytes of the attached
    fd at ``fd_offset`` into shared-memory region ``shmid`` at ``shm_offset``; ``flags`` bit 0 =
    writable."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int

    def encode(self) -> bytes:
        return _SHMEM_MAP.pack(*self)

    @classmethod
    def decode(cls, payload: bytes) -> ShmemMap:
        _need(payload, _SHMEM_MAP.size, "SHMEM_MAP")
        m = cls(*_SHMEM_MAP.unpack(payload))
        if m.shm_offset + m.len > _U64_LIMIT or m.fd_offset + m.len > _U64_LIMIT:
            raise VhostUserError("SHMEM_MAP range overflows u64", field="len")
        return m


#: ``ShmemMap.flags`` bit 0.
SHMEM_MAP_WRITABLE = 1
