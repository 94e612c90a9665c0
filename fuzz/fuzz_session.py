"""Fuzz whole-request handling: ``Session(PassthroughFS(scratch_tree))`` served hostile requests.

Input: a flag byte, then records ``u16 length, bytes`` (at most 32), each handed to
``Session.handle`` as one request.  Flag bits: 0 set ``in_header.len`` to the record's length,
1 give every request a fresh non-zero ``unique``, 2 force uid/gid 0, 3 force uid/gid 65534.
Each input gets a fresh session (INIT already done) over a scratch tree that also holds a FIFO,
symlinks pointing outside (relative and absolute) and a directory outside the shared root
holding a secret; the tree is rebuilt every 200 inputs.

Properties (SECURITY.md B6 items 1, 6-9, 12): ``handle`` never raises; a request shorter than
in_header gets no reply; FORGET-class opcodes get none; every other request gets exactly one
reply whose framing is what the kernel accepts (``len`` == bytes, the request's ``unique``,
errno in (-512, 0], no body with an error) and, when the request decodes, which passes
``validate_reply`` (B5); nothing outside the shared root changes (names, modes, owners, sizes,
contents, xattrs of everything beside it).

Two kernel behaviours are modelled so a single-threaded run cannot hang on a legitimate wait:
SETLKW is sent as SETLK (a conflicting lock would wait for an INTERRUPT no one can send), and
file sizes are capped with RLIMIT_FSIZE (16 MiB; writes past it answer EFBIG) so FALLOCATE
cannot fill the disk.  ``VIRTIOFS_FUZZ_SCRATCH`` names a directory to use (``fuzz/run.py``
mounts a small tmpfs there when it runs as root).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import stat
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Target, check, instrumented, main  # noqa: E402

with instrumented():
    from _seeds import init_in, request_args

    from virtiofs.errors import ProtocolError
    from virtiofs.protocol import OPCODES, encode_request
    from virtiofs.protocol.codec import decode_request
    from virtiofs.protocol.constants import Opcode
    from virtiofs.protocol.opcodes import BY_NUMBER
    from virtiofs.protocol.validate import validate_reply
    from virtiofs.server.passthrough import PassthroughFS
    from virtiofs.server.session import Session

IN_HEADER = struct.Struct("<IIQQIIIHH")
MAX_RECORDS = 32
FSIZE_LIMIT = 16 << 20
REBUILD_EVERY = 200
_STATE: dict[str, object] = {"count": 0}


def _build_tree(container: str) -> None:
    root = os.path.join(container, "root")
    outside = os.path.join(container, "outside")
    for path in (root, outside):
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.join(outside, "dir"))
    with open(os.path.join(outside, "secret"), "w") as f:
        f.write("do not touch\n")
    os.chmod(os.path.join(outside, "secret"), 0o644)
    os.makedirs(os.path.join(root, "dir", "sub"))
    with open(os.path.join(root, "file"), "w") as f:
        f.write("hello world\n")
    with open(os.path.join(root, "dir", "inner"), "w") as f:
        f.write("inner\n")
    os.symlink("../outside/secret", os.path.join(root, "rel_out"))
    os.symlink(os.path.join(outside, "secret"), os.path.join(root, "abs_out"))
    os.symlink("..", os.path.join(root, "dotdot"))
    os.symlink("/", os.path.join(root, "slash"))
    os.mkfifo(os.path.join(root, "fifo"))


def _snapshot(container: str) -> str:
    """A digest of everything in ``container`` except the shared root's contents."""
    h = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(container):
        if dirpath == container:
            # The shared root itself counts (its own metadata), its contents do not.
            dirnames[:] = [d for d in dirnames if d != "root"]
            st = os.lstat(os.path.join(container, "root"))
            h.update(repr((stat.S_IFMT(st.st_mode), st.st_ino)).encode())
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            if dirpath == container and name == "root":
                continue
            st = os.lstat(path)
            h.update(repr((path, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                           st.st_mtime_ns, st.st_ino)).encode())
            try:
                h.update(repr(sorted(os.listxattr(path, follow_symlinks=False))).encode())
            except OSError:
                pass
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    h.update(f.read(1 << 16))
    return h.hexdigest()


def setup() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    base = os.environ.get("VIRTIOFS_FUZZ_SCRATCH") or tempfile.mkdtemp(prefix="vfs-fuzz-")
    container = tempfile.mkdtemp(prefix="session-", dir=base)
    _STATE["container"] = container
    _build_tree(container)
    _STATE["snapshot"] = _snapshot(container)


def teardown() -> None:
    container = _STATE.get("container")
    if isinstance(container, str):
        shutil.rmtree(container, ignore_errors=True)


def _new_session() -> Session:
    container = _STATE["container"]
    assert isinstance(container, str)
    fs = PassthroughFS(os.path.join(container, "root"), max_fds=256)
    session = Session(fs)
    reply = session.handle(encode_request(Opcode.INIT, 1, 0, init_in()))
    assert reply is not None
    return session


def _records(data: bytes) -> list[bytes]:
    out = []
    pos = 1
    while len(data) - pos >= 2 and len(out) < MAX_RECORDS:
        n = struct.unpack_from("<H", data, pos)[0]
        out.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


def _fix(raw: bytes, flags: int, unique: int) -> bytes:
    if len(raw) < IN_HEADER.size:
        return raw
    h = list(IN_HEADER.unpack_from(raw))
    if flags & 1:
        h[0] = len(raw)
    if flags & 2:
        h[2] = unique
    if flags & 4:
        h[4] = h[5] = 0
    elif flags & 8:
        h[4] = h[5] = 65534
    if h[1] == Opcode.SETLKW:
        h[1] = int(Opcode.SETLK)
    return IN_HEADER.pack(*h) + raw[IN_HEADER.size:]


def _check_reply(session: Session, raw: bytes, reply: list | None) -> None:
    if len(raw) < IN_HEADER.size:
        check(reply is None, "a request shorter than in_header was answered")
        return
    length, opcode, unique = struct.unpack_from("<IIQ", raw)
    spec = BY_NUMBER.get(opcode)
    if spec is not None and spec.no_reply:
        check(reply is None, f"{spec.name} was answered")
        return
    check(reply is not None, f"opcode {opcode} got no reply")
    assert reply is not None
    out = b"".join(bytes(p) for p in reply)
    check(len(out) >= 16, "reply shorter than out_header")
    olen, error, ounique = struct.unpack_from("<IiQ", out)
    check(olen == len(out), f"out_header.len {olen} != {len(out)} bytes")
    check(ounique == unique, "reply unique differs from the request's")
    check(-512 < error <= 0, f"errno {error} outside (-512, 0]")
    check(error == 0 or olen == 16, "error reply with a body")
    if error or length != len(raw) or spec is None:
        return
    try:
        request = decode_request(raw, minor=session.minor, flags=int(session.flags))
    except ProtocolError:
        # The session answered a request the protocol layer refuses: it must be an error.
        check(False, f"{spec.name}: success reply to a request decode_request refuses")
        return
    try:
        validate_reply(request, out, minor=session.minor, flags=int(session.flags))
    except ProtocolError as exc:
        check(False, f"{spec.name}: reply the kernel would refuse: {exc}")


def one_input(data: bytes) -> None:
    if not data:
        return
    count = int(_STATE["count"]) + 1  # type: ignore[call-overload]
    _STATE["count"] = count
    container = _STATE["container"]
    assert isinstance(container, str)
    if count % REBUILD_EVERY == 0:
        _build_tree(container)
        _STATE["snapshot"] = _snapshot(container)
    flags = data[0]
    session = _new_session()
    try:
        for k, raw in enumerate(_records(data)):
            raw = _fix(raw, flags, 1000 + 2 * k)
            reply = session.handle(raw)
            _check_reply(session, raw, reply)
            if session.destroyed:
                break
    finally:
        session.close()
        fs = session.fs
        close = getattr(fs, "close", None)
        if callable(close):
            close()
    check(_snapshot(container) == _STATE["snapshot"], "something outside the shared root "
          "changed")


def _rec(op: Opcode, nodeid: int = 1, fh: int = 1, names: tuple[bytes, ...] | None = None,
         **kw: object) -> bytes:
    arg, default_names, data, items = request_args(op, nodeid, fh)
    if kw and arg is not None:
        arg = arg._replace(**kw)
    raw = encode_request(op, 7, nodeid, arg, names if names is not None else default_names, data,
                         items)
    return struct.pack("<H", len(raw)) + raw


def seeds() -> list[bytes]:
    Op = Opcode
    lookups = [_rec(Op.LOOKUP, names=(n,)) for n in (b"file", b"dir", b"rel_out", b"abs_out",
                                                    b"fifo", b"..", b".", b"", b"a/b",
                                                    b"/etc/passwd", b"x" * 300)]
    io = [_rec(Op.LOOKUP, names=(b"file",)), _rec(Op.OPEN, 2, flags=os.O_RDWR),
          _rec(Op.READ, 2, 1, size=4096), _rec(Op.WRITE, 2, 1), _rec(Op.FSYNC, 2, 1),
          _rec(Op.GETATTR, 2), _rec(Op.SETATTR, 2, valid=8, size=3), _rec(Op.FLUSH, 2, 1),
          _rec(Op.RELEASE, 2, 1), _rec(Op.FORGET, 2)]
    dirs = [_rec(Op.OPENDIR, 1, flags=0), _rec(Op.READDIR, 1, 1, size=4096),
            _rec(Op.READDIRPLUS, 1, 1, size=65536), _rec(Op.RELEASEDIR, 1, 1)]
    make = [_rec(Op.MKDIR, 1, names=(b"newdir",)), _rec(Op.CREATE, 1, names=(b"newfile",),
                                                       flags=os.O_RDWR),
            _rec(Op.SYMLINK, 1, names=(b"newlink", b"../outside/secret")),
            _rec(Op.MKNOD, 1, names=(b"newnod",), mode=stat.S_IFIFO | 0o644),
            _rec(Op.LINK, 2, names=(b"hardlink",), oldnodeid=2),
            _rec(Op.RENAME, 1, names=(b"newfile", b"renamed")),
            _rec(Op.SETXATTR, 1), _rec(Op.GETXATTR, 1, size=64), _rec(Op.LISTXATTR, 1, size=256),
            _rec(Op.REMOVEXATTR, 1), _rec(Op.UNLINK, 1, names=(b"renamed",)),
            _rec(Op.RMDIR, 1, names=(b"newdir",)), _rec(Op.STATFS, 1), _rec(Op.ACCESS, 1, mask=7)]
    escapes = [_rec(op, 1, names=(n,) if OPCODES[op].names == 1 else (n, b"x"))
               for op in (Op.MKDIR, Op.CREATE, Op.SYMLINK, Op.MKNOD, Op.UNLINK, Op.RMDIR, Op.RENAME)
               for n in (b"..", b"../outside/pwned", b"/tmp/pwned", b".")]
    forget = [_rec(Op.BATCH_FORGET, 1), _rec(Op.FORGET, 99, nlookup=(1 << 64) - 1)]
    out = [b"\x03" + b"".join(lookups), b"\x03" + b"".join(io), b"\x03" + b"".join(dirs),
           b"\x03" + b"".join(make), b"\x0b" + b"".join(make), b"\x03" + b"".join(escapes),
           b"\x03" + b"".join(forget), b"\x00" + b"".join(io)]
    return out


TARGET = Target("session", one_input, seeds, allowed=(), setup=setup, teardown=teardown,
                max_len=16384)

if __name__ == "__main__":
    main(TARGET)
