"""The sans-I/O session, driven with bytes only (h11's style): INIT negotiation, dispatch, and
the one-well-formed-reply guarantee whatever the filesystem or the peer does."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofs.errors import FuseError
from virtiofs.protocol import (
    DirEntry,
    InitFlags,
    Opcode,
    decode_dirents,
    decode_notify,
    decode_reply,
    encode_request,
)
from virtiofs.protocol import structs as S
from virtiofs.protocol.constants import (
    KERNEL_MINOR_VERSION,
    GetattrFlags,
    LkFlags,
    NotifyCode,
    RenameFlags,
)
from virtiofs.protocol.extensions import SupplementaryGroups
from virtiofs.protocol.opcodes import OPCODES
from virtiofs.server.filesystem import ConnectionInfo, Context, Filesystem
from virtiofs.server.session import Session

ALL_FLAGS = 0xFFFFFFFF
ATTR = S.Attr(ino=2, mode=0o100644, nlink=1, size=5)
ENTRY = S.EntryOut(nodeid=2, entry_valid=1, attr_valid=1, attr=ATTR)


class Recorder(Filesystem):
    """Answers a few operations and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.forgotten: list[tuple[int, int]] = []
        self.conn: ConnectionInfo | None = None
        self.xattr = b"0123456789"
        self.entries = [DirEntry(10 + i, i + 1, 8, f"name{i:03d}".encode()) for i in range(100)]
        self.destroyed = 0

    def init(self, conn: ConnectionInfo) -> None:
        self.conn = conn

    def destroy(self) -> None:
        self.destroyed += 1

    def forget(self, items: Any) -> None:
        self.forgotten.extend(items)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> S.EntryOut:
        self.calls.append(("lookup", parent, name))
        if name == b"boom":
            raise RuntimeError("handler bug")
        if name == b"bigerrno":
            raise FuseError(1000)
        if name == b"zeroerrno":
            raise FuseError(0)
        if name == b"wrongtype":
            return "not an entry"  # type: ignore[return-value]
        if name == b"missing":
            raise FuseError(errno.ENOENT)
        return ENTRY

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> S.AttrOut:
        self.calls.append(("getattr", ino, fh, ctx.uid, ctx.gid, ctx.pid, ctx.unique))
        return S.AttrOut(1, 0, 0, ATTR)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> S.EntryOut:
        self.calls.append(("mkdir", parent, name, mode, ctx.umask))
        return ENTRY._replace(attr=ATTR._replace(mode=0o40755))

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               open_flags: int) -> tuple[S.EntryOut, S.OpenOut]:
        self.calls.append(("create", name, mode, flags, ctx.umask, ctx.groups))
        return ENTRY, S.OpenOut(fh=7)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        self.calls.append(("rename", parent, name, newparent, newname, flags))

    def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        if offset == 666:
            return b"x" * (size + 1)
        return b"r" * min(size, 10)

    def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview,
              write_flags: int) -> int:
        self.calls.append(("write", bytes(data)))
        return len(data) + (1 if offset == 666 else 0)

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        return self.xattr

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        return [b"user.a", b"user.bb"]

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> Any:
        return iter(self.entries[offset:])

    def readdirplus(self, ctx: Context, ino: int, fh: int, offset: int) -> Any:
        for e in self.entries[offset:]:
            if e.name == b"name050" and ino == 99:
                raise RuntimeError("fails half way")
            yield e._replace(entry=ENTRY._replace(nodeid=e.ino))

    def copy_file_range(self, ctx: Context, ino: int, arg: S.CopyFileRangeIn) -> int:
        self.calls.append(("copy_file_range", arg.len))
        return min(arg.len, 123456)

    def setlk(self, ctx: Context, ino: int, arg: S.LkIn, wait: bool) -> None:
        self.calls.append(("setlk", bool(arg.lk_flags & LkFlags.FLOCK), wait,
                           ctx.interrupted))
        if ctx.interrupted:
            raise FuseError(errno.EINTR)


def init_request(minor: int = KERNEL_MINOR_VERSION, major: int = 7, flags: int = ALL_FLAGS,
                 flags2: int = ALL_FLAGS, unique: int = 2) -> bytes:
    return encode_request(Opcode.INIT, unique, 0,
                          S.InitIn(major, minor, 1 << 17, flags, flags2), minor=minor)


def joined(parts: list[Any] | None) -> bytes:
    assert parts is not None
    return b"".join(bytes(p) for p in parts)


def started(minor: int = KERNEL_MINOR_VERSION, fs: Recorder | None = None) -> Session:
    session = Session(fs or Recorder())
    reply = decode_reply(Opcode.INIT, joined(session.handle(init_request(minor))), minor=minor)
    assert reply.error == 0
    return session


def call(session: Session, opcode: Opcode, arg: Any = None, names: tuple[bytes, ...] = (),
         data: bytes = b"", items: tuple[Any, ...] = (), nodeid: int = 1, unique: int = 4,
         **kw: Any) -> bytes | None:
    request = encode_request(opcode, unique, nodeid, arg, names, data, items,
                             minor=session.minor, flags=session.flags, **kw)
    parts = session.handle(request)
    if parts is None:
        return None
    out = joined(parts)
    header = S.OutHeader(*struct.unpack_from("<IiQ", out))
    assert header.len == len(out) and header.unique == unique
    assert -512 < header.error <= 0
    return out


def error_of(reply: bytes | None) -> int:
    assert reply is not None
    return -struct.unpack_from("<i", reply, 4)[0]


# ------------------------------------------------------------------------------------ INIT


@pytest.mark.parametrize("minor,size", [(45, 64), (36, 64), (22, 24), (12, 24), (5, 24),
                                        (4, 8)])
def test_init_reply_is_sized_for_the_kernels_minor(minor: int, size: int) -> None:
    session = Session(Recorder())
    out = joined(session.handle(init_request(minor)))
    assert len(out) == 16 + size
    reply = decode_reply(Opcode.INIT, out, minor=minor)
    init = reply.value
    assert reply.error == 0 and init.major == 7
    assert session.minor == min(minor, KERNEL_MINOR_VERSION)
    assert session.initialized.is_set()


def test_init_negotiates_flags_limits_and_calls_fs_init() -> None:
    fs = Recorder()
    session = Session(fs, max_write=1 << 20, max_readahead=1 << 16)
    offer = InitFlags.ASYNC_READ | InitFlags.POSIX_LOCKS | InitFlags.MAX_PAGES \
        | InitFlags.INIT_EXT | InitFlags.DO_READDIRPLUS
    out = joined(session.handle(init_request(flags=int(offer) & 0xFFFFFFFF,
                                             flags2=int(offer) >> 32)))
    init = decode_reply(Opcode.INIT, out).value
    want = offer & fs.init_flags
    assert InitFlags(init.flags | init.flags2 << 32) == want
    assert not init.flags & InitFlags.POSIX_LOCKS  # offered, not wanted by the filesystem
    assert init.max_write == 1 << 20 and init.max_pages == 256
    assert init.max_readahead == 1 << 16  # min(ours, the kernel's 128 KiB)
    assert init.time_gran == 1 and init.map_alignment == 0
    assert fs.conn is not None and fs.conn.minor == KERNEL_MINOR_VERSION
    assert fs.conn.kernel_flags == offer


def test_init_flags2_only_with_init_ext() -> None:
    class Wants(Recorder):
        init_flags = InitFlags.SECURITY_CTX | InitFlags.ASYNC_READ

    out = joined(Session(Wants()).handle(init_request(flags=ALL_FLAGS & ~InitFlags.INIT_EXT)))
    init = decode_reply(Opcode.INIT, out).value
    assert init.flags2 == 0 and not init.flags & InitFlags.INIT_EXT
    out = joined(Session(Wants()).handle(init_request()))
    init = decode_reply(Opcode.INIT, out).value
    assert init.flags2 == InitFlags.SECURITY_CTX >> 32 and init.flags & InitFlags.INIT_EXT


def test_filesystem_init_may_lower_limits_and_drop_flags() -> None:
    class Modest(Recorder):
        def init(self, conn: ConnectionInfo) -> None:
            conn.max_write = 64 << 10
            conn.flags &= ~InitFlags.ASYNC_READ
            conn.flags |= InitFlags.FILE_OPS  # never offered: must not be sent

    out = joined(Session(Modest()).handle(init_request(flags=ALL_FLAGS & ~InitFlags.FILE_OPS)))
    init = decode_reply(Opcode.INIT, out).value
    assert init.max_write == 64 << 10 and init.max_pages == 16
    assert not init.flags & (InitFlags.ASYNC_READ | InitFlags.FILE_OPS)


def test_init_major_below_7_is_eproto() -> None:
    session = Session(Recorder())
    assert error_of(joined(session.handle(init_request(major=6, minor=9)))) == errno.EPROTO
    assert not session.initialized.is_set()


def test_init_major_above_7_gets_our_version_then_a_new_init() -> None:
    session = Session(Recorder())
    out = joined(session.handle(init_request(major=8, minor=1)))
    init = decode_reply(Opcode.INIT, out).value
    assert (init.major, init.minor) == (7, KERNEL_MINOR_VERSION)
    assert not session.initialized.is_set()
    assert decode_reply(Opcode.INIT, joined(session.handle(init_request()))).error == 0


def test_requests_before_init_are_eio_and_forgets_dropped() -> None:
    session = Session(Recorder())
    assert error_of(call(session, Opcode.GETATTR, S.GetattrIn())) == errno.EIO
    assert call(session, Opcode.FORGET, S.ForgetIn(1), nodeid=5) is None
    assert session.fs.forgotten == []  # type: ignore[attr-defined]


def test_second_init_is_eio() -> None:
    session = started()
    assert error_of(joined(session.handle(init_request(unique=8)))) == errno.EIO


def test_filesystem_refusing_init_fails_the_mount() -> None:
    class Refuses(Recorder):
        def init(self, conn: ConnectionInfo) -> None:
            raise FuseError(errno.EACCES)

    session = Session(Refuses())
    assert error_of(joined(session.handle(init_request()))) == errno.EACCES
    assert not session.initialized.is_set()


def test_destroy_replies_calls_fs_and_ends_the_session() -> None:
    fs = Recorder()
    session = started(fs=fs)
    out = call(session, Opcode.DESTROY)
    assert out is not None and len(out) == 16 and error_of(out) == 0
    assert fs.destroyed == 1
    assert error_of(call(session, Opcode.GETATTR, S.GetattrIn())) == errno.EIO
    session.close()
    assert fs.destroyed == 1
    assert decode_reply(Opcode.INIT, joined(session.handle(init_request()))).error == 0


def test_close_calls_destroy_once() -> None:
    fs = Recorder()
    session = started(fs=fs)
    session.close()
    session.close()
    assert fs.destroyed == 1


# ------------------------------------------------------------------------------- dispatch


def test_getattr_passes_credentials_and_fh() -> None:
    fs = Recorder()
    session = started(fs=fs)
    call(session, Opcode.GETATTR, S.GetattrIn(), nodeid=3, uid=10, gid=20, pid=30, unique=40)
    call(session, Opcode.GETATTR, S.GetattrIn(GetattrFlags.FH, 0, 77), nodeid=3, unique=42)
    assert fs.calls == [("getattr", 3, None, 10, 20, 30, 40), ("getattr", 3, 77, 0, 0, 0, 42)]


@pytest.mark.parametrize("minor,entry,attr", [(45, 128, 104), (8, 120, 96)])
def test_compat_reply_sizes(minor: int, entry: int, attr: int) -> None:
    session = started(minor)
    assert len(call(session, Opcode.LOOKUP, names=(b"x",)) or b"") == 16 + entry
    arg = S.GetattrIn() if minor >= 9 else None
    assert len(call(session, Opcode.GETATTR, arg) or b"") == 16 + attr


def test_forget_and_batch_forget_get_no_reply() -> None:
    fs = Recorder()
    session = started(fs=fs)
    assert call(session, Opcode.FORGET, S.ForgetIn(3), nodeid=9) is None
    items = (S.ForgetOne(10, 1), S.ForgetOne(11, 2))
    assert call(session, Opcode.BATCH_FORGET, S.BatchForgetIn(2), items=items) is None
    assert fs.forgotten == [(9, 3), (10, 1), (11, 2)]


def test_unknown_and_unimplemented_opcodes_are_enosys() -> None:
    session = started()
    request = bytearray(encode_request(Opcode.GETATTR, 4, 1, S.GetattrIn()))
    struct.pack_into("<I", request, 4, 99)
    assert error_of(joined(session.handle(request))) == errno.ENOSYS
    assert error_of(call(session, Opcode.STATFS)) == errno.ENOSYS
    assert error_of(call(session, Opcode.CUSE_INIT, S.CuseInitIn(7, 45))) == errno.ENOSYS


@pytest.mark.parametrize("name", [b"boom", b"bigerrno", b"zeroerrno", b"wrongtype"])
def test_a_misbehaving_handler_gets_eio(name: bytes, caplog: pytest.LogCaptureFixture) -> None:
    session = started()
    assert error_of(call(session, Opcode.LOOKUP, names=(name,))) == errno.EIO
    # And the session goes on.
    assert error_of(call(session, Opcode.LOOKUP, names=(b"missing",))) == errno.ENOENT


def test_oversized_read_and_write_results_are_eio() -> None:
    session = started()
    out = call(session, Opcode.READ, S.ReadIn(fh=1, offset=0, size=100))
    assert out is not None and len(out) == 16 + 10
    assert error_of(call(session, Opcode.READ, S.ReadIn(fh=1, offset=666, size=100))) == errno.EIO
    assert error_of(call(session, Opcode.WRITE, S.WriteIn(1, 666, 3), data=b"abc")) == errno.EIO
    out = call(session, Opcode.WRITE, S.WriteIn(1, 0, 3), data=b"abc")
    assert decode_reply(Opcode.WRITE, out or b"").value == S.WriteOut(3)


def test_mkdir_and_create_see_umask_and_groups() -> None:
    fs = Recorder()
    session = started(fs=fs)
    call(session, Opcode.MKDIR, S.MkdirIn(0o755, 0o022), names=(b"d",))
    out = call(session, Opcode.CREATE, S.CreateIn(0o101, 0o644, 0o027), names=(b"f",),
               ext=[SupplementaryGroups((5, 6))])
    assert decode_reply(Opcode.CREATE, out or b"").parts[1] == S.OpenOut(fh=7)
    assert fs.calls == [("mkdir", 1, b"d", 0o755, 0o022), ("create", b"f", 0o644, 0o101, 0o027,
                                                           (5, 6))]


def test_rename_and_rename2_reach_rename() -> None:
    fs = Recorder()
    session = started(fs=fs)
    call(session, Opcode.RENAME, S.RenameIn(5), names=(b"a", b"b"), nodeid=4)
    call(session, Opcode.RENAME2, S.Rename2In(6, RenameFlags.EXCHANGE), names=(b"c", b"d"))
    assert fs.calls == [("rename", 4, b"a", 5, b"b", 0),
                        ("rename", 1, b"c", 6, b"d", RenameFlags.EXCHANGE)]


def test_copy_file_range_reply_structs() -> None:
    fs = Recorder()
    session = started(fs=fs)
    arg = S.CopyFileRangeIn(1, 0, 2, 3, 0, 1 << 40)
    out = call(session, Opcode.COPY_FILE_RANGE, arg)
    assert len(out or b"") == 16 + 8
    assert decode_reply(Opcode.COPY_FILE_RANGE, out or b"").value == S.WriteOut(123456)
    out = call(session, Opcode.COPY_FILE_RANGE_64, arg)
    assert decode_reply(Opcode.COPY_FILE_RANGE_64, out or b"").value == \
        S.CopyFileRangeOut(123456)
    # The u32 opcode never asks for more than its reply can carry.
    assert fs.calls == [("copy_file_range", 0xFFFFF000), ("copy_file_range", 1 << 40)]


def test_xattr_size_queries_and_erange() -> None:
    session = started()
    out = call(session, Opcode.GETXATTR, S.GetxattrIn(0), names=(b"user.x",))
    assert decode_reply(Opcode.GETXATTR, out or b"", xattr_size=0).value == S.GetxattrOut(10)
    assert error_of(call(session, Opcode.GETXATTR, S.GetxattrIn(9), names=(b"user.x",))) \
        == errno.ERANGE
    out = call(session, Opcode.GETXATTR, S.GetxattrIn(10), names=(b"user.x",))
    assert (out or b"")[16:] == b"0123456789"
    out = call(session, Opcode.LISTXATTR, S.GetxattrIn(0))
    assert decode_reply(Opcode.LISTXATTR, out or b"", xattr_size=0).value == S.GetxattrOut(15)
    assert error_of(call(session, Opcode.LISTXATTR, S.GetxattrIn(14))) == errno.ERANGE
    assert (call(session, Opcode.LISTXATTR, S.GetxattrIn(100)) or b"")[16:] == \
        b"user.a\0user.bb\0"


def test_readdir_packs_up_to_the_requested_size() -> None:
    session = started()
    out = call(session, Opcode.READDIR, S.ReadIn(fh=1, offset=0, size=1000))
    body = (out or b"")[16:]
    entries = decode_dirents(body)
    assert len(body) == 1000 // 32 * 32 and len(entries) == 1000 // 32
    assert entries[0].name == b"name000" and entries[-1].offset == len(entries)
    out = call(session, Opcode.READDIR, S.ReadIn(fh=1, offset=len(entries), size=1000))
    assert decode_dirents((out or b"")[16:])[0].name == f"name{len(entries):03d}".encode()


def test_readdirplus_gives_back_the_lookup_of_an_entry_that_did_not_fit() -> None:
    fs = Recorder()
    session = started(fs=fs)
    out = call(session, Opcode.READDIRPLUS, S.ReadIn(fh=1, offset=0, size=1000))
    entries = decode_dirents((out or b"")[16:], plus=True)
    assert len(entries) == 1000 // 160
    assert fs.forgotten == [(10 + len(entries), 1)]


def test_readdirplus_failure_gives_back_every_lookup() -> None:
    fs = Recorder()
    session = started(fs=fs)
    out = call(session, Opcode.READDIRPLUS, S.ReadIn(fh=1, offset=40, size=1 << 16), nodeid=99)
    assert error_of(out) == errno.EIO
    assert sorted(fs.forgotten) == [(10 + i, 1) for i in range(40, 50)]


def test_flock_arrives_through_setlk() -> None:
    fs = Recorder()
    session = started(fs=fs)
    lk = S.LkIn(1, 2, S.FileLock(0, 2**63 - 1, 1, 0), LkFlags.FLOCK)
    call(session, Opcode.SETLK, lk)
    call(session, Opcode.SETLKW, lk._replace(lk_flags=0))
    assert fs.calls == [("setlk", True, False, False), ("setlk", False, True, False)]


def test_an_interrupt_is_visible_to_its_request() -> None:
    fs = Recorder()
    session = started(fs=fs)
    # The INTERRUPT may be read before its request (another reader, or a queued request).
    assert call(session, Opcode.INTERRUPT, S.InterruptIn(100), unique=101) is None
    lk = S.LkIn(1, 2, S.FileLock(0, 10, 1, 0))
    assert error_of(call(session, Opcode.SETLKW, lk, unique=100)) == errno.EINTR
    # Served: the mark is gone, the next request with another unique is not interrupted.
    assert call(session, Opcode.SETLKW, lk, unique=102) is not None
    assert fs.calls[-1] == ("setlk", False, True, False)
    assert not session.is_interrupted(100)


def test_notifications_and_retrieve() -> None:
    session = started()
    note = decode_notify(session.notify_inval_entry(1, b"name"))
    assert note.code == NotifyCode.INVAL_ENTRY and note.name == b"name"
    assert decode_notify(session.notify_delete(1, 5, b"x")).arg.child == 5
    assert decode_notify(session.notify_store(5, 0, b"data")).data == b"data"
    assert decode_notify(session.notify_inval_inode(5, -1)).arg.off == -1
    got: list[tuple[int, bytes]] = []
    message, notify_unique = session.notify_retrieve(5, 0, 100, lambda o, d: got.append((o, d)))
    assert decode_notify(message).arg.notify_unique == notify_unique
    reply = call(session, Opcode.NOTIFY_REPLY, S.NotifyRetrieveIn(0, 0, 4), data=b"abcd",
                 unique=notify_unique, nodeid=5)
    assert reply is None and got == [(0, b"abcd")]


def test_notifications_need_a_kernel_that_knows_them() -> None:
    session = started(minor=14)
    with pytest.raises(FuseError) as info:
        session.notify_store(1, 0, b"")
    assert info.value.errno == errno.ENOSYS


# -------------------------------------------------------------------------- malformed input


def test_short_request_is_dropped() -> None:
    session = started()
    assert session.handle(b"\x10\0\0\0" * 5) is None


@pytest.mark.parametrize("mangle,err", [
    ("len_too_big", errno.EIO),
    ("len_too_small", errno.EIO),
    ("truncated_body", errno.EINVAL),
])
def test_malformed_requests_get_one_error_reply(mangle: str, err: int) -> None:
    session = started()
    request = bytearray(encode_request(Opcode.GETATTR, 1234, 1, S.GetattrIn()))
    if mangle == "len_too_big":
        struct.pack_into("<I", request, 0, len(request) + 1)
    elif mangle == "len_too_small":
        struct.pack_into("<I", request, 0, 12)
    else:
        del request[-4:]
        struct.pack_into("<I", request, 0, len(request))
    out = joined(session.handle(request))
    assert len(out) == 16 and struct.unpack("<IiQ", out) == (16, -err, 1234)


def test_name_without_nul_and_size_mismatch_are_einval() -> None:
    session = started()
    request = bytearray(encode_request(Opcode.LOOKUP, 6, 1, None, [b"abc"]))
    request[-1:] = b"d"
    assert error_of(joined(session.handle(request))) == errno.EINVAL
    request = bytearray(encode_request(Opcode.WRITE, 6, 1, S.WriteIn(1, 0, 3), (), b"abc"))
    struct.pack_into("<I", request, 40 + 16, 4)
    assert error_of(joined(session.handle(request))) == errno.EINVAL


def test_malformed_no_reply_requests_are_dropped() -> None:
    fs = Recorder()
    session = started(fs=fs)
    request = bytearray(encode_request(Opcode.BATCH_FORGET, 6, 0, S.BatchForgetIn(1), (), b"",
                                       [S.ForgetOne(3, 1)]))
    struct.pack_into("<I", request, 40, 2)
    assert session.handle(request) is None
    assert fs.forgotten == []


OPCODE_NUMBERS = st.sampled_from([int(op) for op in OPCODES] + [0, 7, 19, 54, 9999])


@settings(max_examples=300, deadline=None)
@given(opcode=OPCODE_NUMBERS, body=st.binary(max_size=300), unique=st.integers(2, 2**64 - 1),
       extlen=st.sampled_from([0, 0, 0, 1, 2]), cut=st.integers(-8, 8))
def test_any_request_gets_at_most_one_well_formed_reply(opcode: int, body: bytes, unique: int,
                                                        extlen: int, cut: int) -> None:
    session = started(fs=Recorder())
    length = 40 + len(body) + cut
    request = struct.pack("<IIQQIIIHH", max(0, length), opcode, unique, 1, 0, 0, 0, extlen, 0) \
        + body
    parts = session.handle(request)
    spec = OPCODES.get(opcode)  # type: ignore[call-overload]
    if parts is None:
        assert spec is not None and (spec.no_reply or opcode == Opcode.INTERRUPT)
        return
    out = joined(parts)
    size, err, got_unique = struct.unpack_from("<IiQ", out)
    assert size == len(out) and got_unique == unique and -512 < err <= 0
    if err:
        assert size == 16


def test_an_internal_error_still_gets_one_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    session = started()

    def broken(view: Any) -> Any:
        raise NameError("a bug below the session")
    monkeypatch.setattr(session, "_decode", broken)
    assert error_of(call(session, Opcode.GETATTR, S.GetattrIn(), unique=90)) == errno.EIO
    assert call(session, Opcode.FORGET, S.ForgetIn(1)) is None
