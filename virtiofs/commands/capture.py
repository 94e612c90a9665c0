"""``virtiofs capture MOUNTPOINT --out DIR``: record the host kernel's FUSE traffic.

Mounts a small in-memory tree at MOUNTPOINT through /dev/fuse (root: ``mount(2)`` with
``fd=N``, FACTS.md) and answers every request itself, on the protocol layer alone
(``decode_request`` / ``encode_reply_parts``), so the capture does not depend on any server
code.  Every request the kernel sends is written to ``DIR/capture.fusecap`` exactly as
``read(2)`` returned it, followed by the reply exactly as it was written (format:
``virtiofs.protocol.capturefile``; print it with ``virtiofs decode``).  It runs until the
mount goes away (``umount``), or SIGINT/SIGTERM (then it unmounts lazily itself).

Behaviour chosen so ordinary syscalls reach as many opcodes as possible:
- INIT accepts the kernel's offer of SETXATTR_EXT, SECURITY_CTX, CREATE_SUPP_GROUP (so
  create-type requests carry extensions), POSIX and flock locks, READDIRPLUS_AUTO (the first
  batch of a listing is READDIRPLUS, later ones READDIR), MAX_PAGES, DONT_MASK; no
  ``default_permissions`` (so ACCESS is sent); attributes never cached (GETATTR every time).
- READDIR answers at most three entries per call (so listings take several calls).
- SETLKW is held until the kernel sends an INTERRUPT for it (then EINTR), or 5 s pass.
- COPY_FILE_RANGE_64 succeeds once, then answers ENOSYS (the kernel falls back to
  COPY_FILE_RANGE for good).
- A LOOKUP of ``.capture-retrieve.NAME`` answers ENOENT and then sends
  FUSE_NOTIFY_RETRIEVE for NAME's first page, so the kernel answers with NOTIFY_REPLY.
- A LOOKUP of ``.capture-pause`` answers ENOENT and then stops reading for half a second, so
  forgets queued meanwhile (a cache drop) arrive as one BATCH_FORGET.
"""

from __future__ import annotations

import argparse
import ctypes
import errno as E
import os
import select
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import FuseError, ProtocolError
from ..protocol import (
    OPCODES,
    DirEntry,
    InitFlags,
    NotifyCode,
    Opcode,
    Request,
    decode_request,
    encode_dirents,
    encode_error,
    encode_notify,
    encode_reply_parts,
)
from ..protocol import constants as C
from ..protocol import structs as S
from ..protocol.capturefile import MAGIC, Direction, encode_record

HELP = "Mount a capture filesystem and record the kernel's FUSE requests"

RETRIEVE_PREFIX = b".capture-retrieve."
PAUSE_NAME = b".capture-pause"
PAUSE_SECONDS = 0.5
MAX_WRITE = 128 * 1024
HOLD_SECONDS = 5.0
WANTED = (InitFlags.POSIX_LOCKS | InitFlags.FLOCK_LOCKS | InitFlags.ATOMIC_O_TRUNC
          | InitFlags.BIG_WRITES | InitFlags.DONT_MASK | InitFlags.DO_READDIRPLUS
          | InitFlags.READDIRPLUS_AUTO | InitFlags.MAX_PAGES | InitFlags.SETXATTR_EXT
          | InitFlags.INIT_EXT | InitFlags.SECURITY_CTX | InitFlags.CREATE_SUPP_GROUP
          | InitFlags.HAS_IOCTL_DIR | InitFlags.PARALLEL_DIROPS | InitFlags.EXPORT_SUPPORT)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``virtiofs capture``."""
    parser.add_argument("mountpoint", help="an empty directory to mount on")
    parser.add_argument("--out", required=True, help="directory for capture.fusecap")
    parser.add_argument("--fsname", default="virtiofs-capture", help="mount source name")


@dataclass
class Node:
    """One inode of the in-tool tree."""

    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    nlink: int = 1
    rdev: int = 0
    uid: int = 0
    gid: int = 0
    times: tuple[int, int, int] = (0, 0, 0)


class Tree:
    """The tiny filesystem the capture tool serves: enough for the kernel to send everything."""

    def __init__(self) -> None:
        now = int(time.time())
        self.nodes: dict[int, Node] = {C.ROOT_ID: Node(C.ROOT_ID, stat.S_IFDIR | 0o777,
                                                       nlink=2, times=(now, now, now))}
        self.parents: dict[int, int] = {C.ROOT_ID: C.ROOT_ID}
        self.next_ino = 2
        self.next_fh = 1

    def node(self, ino: int) -> Node:
        found = self.nodes.get(ino)
        if found is None:
            raise FuseError(E.ENOENT)
        return found

    def directory(self, ino: int) -> Node:
        found = self.node(ino)
        if not stat.S_ISDIR(found.mode):
            raise FuseError(E.ENOTDIR)
        return found

    def attr(self, node: Node) -> S.Attr:
        size = len(node.data) if not stat.S_ISLNK(node.mode) else len(node.target)
        a, m, c = node.times
        return S.Attr(node.ino, size, (size + 511) // 512, a, m, c, 0, 0, 0, node.mode,
                      node.nlink, node.uid, node.gid, node.rdev, 4096, 0)

    def entry(self, node: Node) -> S.EntryOut:
        # entry cached 1 s, attributes never: the kernel asks GETATTR each time.
        return S.EntryOut(node.ino, 0, 1, 0, 0, 0, self.attr(node))

    def create(self, parent: int, name: bytes, mode: int, ctx: S.InHeader,
               rdev: int = 0, target: bytes = b"") -> Node:
        directory = self.directory(parent)
        if name in directory.children:
            raise FuseError(E.EEXIST)
        now = int(time.time())
        node = Node(self.next_ino, mode, target=target, rdev=rdev, uid=ctx.uid, gid=ctx.gid,
                    nlink=2 if stat.S_ISDIR(mode) else 1, times=(now, now, now))
        self.next_ino += 1
        self.nodes[node.ino] = node
        if name:
            directory.children[name] = node.ino
            self.parents[node.ino] = parent
        return node

    def lookup(self, parent: int, name: bytes) -> Node:
        directory = self.directory(parent)
        if name == b".":
            return directory
        if name == b"..":
            return self.node(self.parents.get(parent, C.ROOT_ID))
        ino = directory.children.get(name)
        if ino is None:
            raise FuseError(E.ENOENT)
        return self.node(ino)

    def fh(self) -> int:
        self.next_fh += 1
        return self.next_fh


class Responder:
    """Answers each request from the tree; the loop in ``run`` does the I/O."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.minor = C.KERNEL_MINOR_VERSION
        self.flags = 0
        self.held: dict[int, float] = {}
        """SETLKW uniques not answered yet -> deadline."""
        self.copy64_calls = 0
        self.notifications: list[bytes] = []
        self.pause = False

    def handle(self, req: Request) -> Any:
        """The reply result for ``req`` (see ``encode_reply_parts``); raises FuseError."""
        method = getattr(self, "op_" + req.spec.name.lower(), None)
        if method is None:
            raise FuseError(E.ENOSYS)
        return method(req)

    # --- session ---------------------------------------------------------------------------

    def op_init(self, req: Request) -> S.InitOut:
        arg = req.arg
        kernel = arg.flags | (arg.flags2 << 32 if arg.flags & InitFlags.INIT_EXT else 0)
        self.minor = min(arg.minor, C.KERNEL_MINOR_VERSION)
        flags = kernel & int(WANTED)
        self.flags = flags
        return S.InitOut(C.KERNEL_VERSION, C.KERNEL_MINOR_VERSION, arg.max_readahead,
                         flags & 0xFFFFFFFF, 16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0,
                         flags >> 32)

    def op_destroy(self, req: Request) -> None:
        return None

    def op_statfs(self, req: Request) -> S.StatfsOut:
        return S.StatfsOut(S.Kstatfs(1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 4096, 255,
                                     4096))

    def op_access(self, req: Request) -> None:
        self.tree.node(req.nodeid)
        return None

    def op_syncfs(self, req: Request) -> None:
        return None

    # --- names -----------------------------------------------------------------------------

    def op_lookup(self, req: Request) -> S.EntryOut:
        name = req.names[0]
        if name == PAUSE_NAME:
            self.pause = True
            raise FuseError(E.ENOENT)
        if name.startswith(RETRIEVE_PREFIX):
            target = self.tree.lookup(req.nodeid, name[len(RETRIEVE_PREFIX):])
            self.notifications.append(encode_notify(
                NotifyCode.RETRIEVE, S.NotifyRetrieveOut(0x5EED, target.ino, 0, 4096)))
            raise FuseError(E.ENOENT)
        return self.tree.entry(self.tree.lookup(req.nodeid, name))

    def op_forget(self, req: Request) -> None:
        return None

    op_batch_forget = op_forget

    def op_getattr(self, req: Request) -> S.AttrOut:
        return S.AttrOut(0, 0, 0, self.tree.attr(self.tree.node(req.nodeid)))

    def op_setattr(self, req: Request) -> S.AttrOut:
        node = self.tree.node(req.nodeid)
        a = req.arg
        valid = C.SetattrValid(a.valid)
        if valid & C.SetattrValid.MODE:
            node.mode = stat.S_IFMT(node.mode) | (a.mode & 0o7777)
        if valid & C.SetattrValid.UID:
            node.uid = a.uid
        if valid & C.SetattrValid.GID:
            node.gid = a.gid
        if valid & C.SetattrValid.SIZE:
            del node.data[a.size:]
            node.data.extend(bytes(a.size - len(node.data)))
        atime, mtime, ctime = node.times
        now = int(time.time())
        if valid & (C.SetattrValid.ATIME | C.SetattrValid.ATIME_NOW):
            atime = now if valid & C.SetattrValid.ATIME_NOW else a.atime
        if valid & (C.SetattrValid.MTIME | C.SetattrValid.MTIME_NOW):
            mtime = now if valid & C.SetattrValid.MTIME_NOW else a.mtime
        node.times = (atime, mtime, now if valid & C.SetattrValid.CTIME else ctime)
        return S.AttrOut(0, 0, 0, self.tree.attr(node))

    def op_readlink(self, req: Request) -> bytes:
        node = self.tree.node(req.nodeid)
        if not stat.S_ISLNK(node.mode):
            raise FuseError(E.EINVAL)
        return node.target

    def op_symlink(self, req: Request) -> S.EntryOut:
        name, target = req.names
        return self.tree.entry(self.tree.create(req.nodeid, name, stat.S_IFLNK | 0o777,
                                                req.header, target=target))

    def op_mknod(self, req: Request) -> S.EntryOut:
        return self.tree.entry(self.tree.create(req.nodeid, req.names[0], req.arg.mode,
                                                req.header, rdev=req.arg.rdev))

    def op_mkdir(self, req: Request) -> S.EntryOut:
        mode = stat.S_IFDIR | (req.arg.mode & 0o7777)
        node = self.tree.create(req.nodeid, req.names[0], mode, req.header)
        self.tree.directory(req.nodeid).nlink += 1
        return self.tree.entry(node)

    def _unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        directory = self.tree.directory(parent)
        node = self.tree.lookup(parent, name)
        if stat.S_ISDIR(node.mode) != want_dir:
            raise FuseError(E.EISDIR if not want_dir else E.ENOTDIR)
        if want_dir and node.children:
            raise FuseError(E.ENOTEMPTY)
        del directory.children[name]
        node.nlink -= 2 if want_dir else 1

    def op_unlink(self, req: Request) -> None:
        self._unlink(req.nodeid, req.names[0], False)

    def op_rmdir(self, req: Request) -> None:
        self._unlink(req.nodeid, req.names[0], True)

    def _rename(self, req: Request, newdir: int, flags: int) -> None:
        old, new = req.names
        src = self.tree.directory(req.nodeid)
        dst = self.tree.directory(newdir)
        ino = self.tree.lookup(req.nodeid, old).ino
        other = dst.children.get(new)
        if flags & C.RenameFlags.NOREPLACE and other is not None:
            raise FuseError(E.EEXIST)
        if flags & C.RenameFlags.EXCHANGE:
            if other is None:
                raise FuseError(E.ENOENT)
            src.children[old], dst.children[new] = other, ino
            return
        if flags & ~int(C.RenameFlags.NOREPLACE):
            raise FuseError(E.EINVAL)
        del src.children[old]
        dst.children[new] = ino
        self.tree.parents[ino] = newdir

    def op_rename(self, req: Request) -> None:
        self._rename(req, req.arg.newdir, 0)

    def op_rename2(self, req: Request) -> None:
        self._rename(req, req.arg.newdir, req.arg.flags)

    def op_link(self, req: Request) -> S.EntryOut:
        node = self.tree.node(req.arg.oldnodeid)
        directory = self.tree.directory(req.nodeid)
        if req.names[0] in directory.children:
            raise FuseError(E.EEXIST)
        directory.children[req.names[0]] = node.ino
        node.nlink += 1
        return self.tree.entry(node)

    # --- files -----------------------------------------------------------------------------

    def op_open(self, req: Request) -> S.OpenOut:
        node = self.tree.node(req.nodeid)
        if req.arg.flags & os.O_TRUNC:
            node.data.clear()
        return S.OpenOut(self.tree.fh())

    def op_opendir(self, req: Request) -> S.OpenOut:
        self.tree.directory(req.nodeid)
        return S.OpenOut(self.tree.fh())

    def op_create(self, req: Request) -> tuple[S.EntryOut, S.OpenOut]:
        mode = stat.S_IFREG | (req.arg.mode & 0o7777)
        node = self.tree.create(req.nodeid, req.names[0], mode, req.header)
        return self.tree.entry(node), S.OpenOut(self.tree.fh())

    def op_tmpfile(self, req: Request) -> tuple[S.EntryOut, S.OpenOut]:
        mode = stat.S_IFREG | (req.arg.mode & 0o7777)
        node = self.tree.create(req.nodeid, b"", mode, req.header)
        node.nlink = 0
        return self.tree.entry(node), S.OpenOut(self.tree.fh())

    def op_read(self, req: Request) -> bytes:
        node = self.tree.node(req.nodeid)
        return bytes(node.data[req.arg.offset:req.arg.offset + req.arg.size])

    def op_write(self, req: Request) -> S.WriteOut:
        node = self.tree.node(req.nodeid)
        end = req.arg.offset + len(req.data)
        if len(node.data) < end:
            node.data.extend(bytes(end - len(node.data)))
        node.data[req.arg.offset:end] = req.data
        return S.WriteOut(len(req.data))

    def _nothing(self, req: Request) -> None:
        return None

    op_release = op_releasedir = op_flush = op_fsync = op_fsyncdir = op_setlk = _nothing

    def op_getlk(self, req: Request) -> S.LkOut:
        return S.LkOut(req.arg.lk._replace(type=2))  # F_UNLCK: nothing conflicts

    def op_setlkw(self, req: Request) -> None:
        # Held (no reply now): the workload interrupts it with a signal, the kernel sends
        # INTERRUPT, and op_interrupt answers this one with EINTR.
        self.held[req.unique] = time.monotonic() + HOLD_SECONDS
        raise _Deferred()

    def op_interrupt(self, req: Request) -> None:
        raise _Interrupt(req.arg.unique)

    def op_fallocate(self, req: Request) -> None:
        node = self.tree.node(req.nodeid)
        end = req.arg.offset + req.arg.length
        if len(node.data) < end and not req.arg.mode & 1:  # FALLOC_FL_KEEP_SIZE
            node.data.extend(bytes(end - len(node.data)))
        return None

    def op_lseek(self, req: Request) -> S.LseekOut:
        node = self.tree.node(req.nodeid)
        if req.arg.offset >= len(node.data):
            raise FuseError(E.ENXIO)
        # SEEK_DATA (3): data is everywhere; SEEK_HOLE (4): the only hole is at the end.
        return S.LseekOut(req.arg.offset if req.arg.whence == 3 else len(node.data))

    def _copy(self, req: Request) -> int:
        a = req.arg
        src = self.tree.node(req.nodeid)
        dst = self.tree.node(a.nodeid_out)
        chunk = bytes(src.data[a.off_in:a.off_in + a.len])
        end = a.off_out + len(chunk)
        if len(dst.data) < end:
            dst.data.extend(bytes(end - len(dst.data)))
        dst.data[a.off_out:end] = chunk
        return len(chunk)

    def op_copy_file_range_64(self, req: Request) -> S.CopyFileRangeOut:
        self.copy64_calls += 1
        if self.copy64_calls > 1:
            raise FuseError(E.ENOSYS)  # the kernel falls back to COPY_FILE_RANGE for good
        return S.CopyFileRangeOut(self._copy(req))

    def op_copy_file_range(self, req: Request) -> S.WriteOut:
        return S.WriteOut(self._copy(req))

    def op_statx(self, req: Request) -> S.StatxOut:
        attr = self.tree.attr(self.tree.node(req.nodeid))
        sx = S.Statx(mask=0x7FF | 0x800, blksize=4096, nlink=attr.nlink, uid=attr.uid,
                     gid=attr.gid, mode=attr.mode, ino=attr.ino, size=attr.size,
                     blocks=attr.blocks, atime=S.SxTime(attr.atime),
                     btime=S.SxTime(attr.ctime), ctime=S.SxTime(attr.ctime),
                     mtime=S.SxTime(attr.mtime))
        return S.StatxOut(0, 0, 0, bytes(16), sx)

    def op_ioctl(self, req: Request) -> tuple[S.IoctlOut, bytes]:
        return S.IoctlOut(0), bytes(min(req.arg.out_size, 64))

    def op_poll(self, req: Request) -> S.PollOut:
        return S.PollOut(0x1 | 0x4)  # POLLIN | POLLOUT

    def op_bmap(self, req: Request) -> S.BmapOut:
        return S.BmapOut(req.arg.block)

    def op_notify_reply(self, req: Request) -> None:
        return None

    # --- xattrs ----------------------------------------------------------------------------

    def op_setxattr(self, req: Request) -> None:
        self.tree.node(req.nodeid).xattrs[req.names[0]] = bytes(req.data)

    def op_getxattr(self, req: Request) -> Any:
        value = self.tree.node(req.nodeid).xattrs.get(req.names[0])
        if value is None:
            raise FuseError(E.ENODATA)
        if req.arg.size == 0:
            return S.GetxattrOut(len(value))
        if len(value) > req.arg.size:
            raise FuseError(E.ERANGE)
        return value

    def op_listxattr(self, req: Request) -> Any:
        names = b"".join(n + b"\0" for n in self.tree.node(req.nodeid).xattrs)
        if req.arg.size == 0:
            return S.GetxattrOut(len(names))
        if len(names) > req.arg.size:
            raise FuseError(E.ERANGE)
        return names

    def op_removexattr(self, req: Request) -> None:
        if self.tree.node(req.nodeid).xattrs.pop(req.names[0], None) is None:
            raise FuseError(E.ENODATA)

    # --- directories -----------------------------------------------------------------------

    def _listing(self, req: Request, plus: bool) -> bytes:
        directory = self.tree.directory(req.nodeid)
        names = [(b".", directory.ino), (b"..", self.tree.parents.get(directory.ino, 1))]
        names += list(directory.children.items())
        entries = []
        for index in range(req.arg.offset, min(len(names), req.arg.offset + 3)):
            name, ino = names[index]
            node = self.tree.node(ino)
            entry = None
            if plus:
                # "." and ".." carry no entry (nodeid 0: the kernel takes no lookup count).
                entry = self.tree.entry(node) if name not in (b".", b"..") else S.EntryOut()
            entries.append(DirEntry(ino, index + 1, stat.S_IFMT(node.mode) >> 12, name, entry))
        return encode_dirents(entries, limit=req.arg.size, plus=plus)

    def op_readdir(self, req: Request) -> bytes:
        return self._listing(req, False)

    def op_readdirplus(self, req: Request) -> bytes:
        return self._listing(req, True)


class _Deferred(Exception):
    """The request is answered later (a held SETLKW)."""


class _Interrupt(Exception):
    def __init__(self, target: int) -> None:
        self.target = target


# ------------------------------------------------------------------------------ the I/O loop

_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                          ctypes.c_char_p]
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return lib


def mount_devfuse(mountpoint: str, fsname: str) -> int:
    """Open /dev/fuse and mount it on ``mountpoint``; returns the fd (root needed)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if _libc().mount(fsname.encode(), mountpoint.encode(), b"fuse.capture",
                     _MS_NOSUID | _MS_NODEV, data) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount {mountpoint}: {os.strerror(err)}")
    return fd


def unmount(mountpoint: str) -> None:
    """Lazy unmount (MNT_DETACH); errors are ignored: the mount may already be gone."""
    _libc().umount2(mountpoint.encode(), _MNT_DETACH)


class Capture:
    """The /dev/fuse loop: read a request, record it, answer it, record the answer."""

    def __init__(self, fd: int, out: Any) -> None:
        self.fd = fd
        self.out = out
        self.responder = Responder(Tree())
        self.buffer = bytearray(max(C.MIN_READ_BUFFER, MAX_WRITE + 4096))
        self.stop = False

    def record(self, direction: Direction, data: bytes) -> None:
        self.out.write(encode_record(direction, data))

    def send(self, data: bytes, direction: Direction = Direction.REPLY) -> None:
        try:
            os.write(self.fd, data)
        except OSError as exc:
            # ENOENT: the kernel no longer waits for it (interrupted); record the refusal.
            print(f"capture: reply refused: {exc}", file=sys.stderr)
            direction = Direction.REFUSED
        self.record(direction, data)

    def answer(self, unique: int, errno: int) -> None:
        self.send(encode_error(unique, errno))

    def run(self) -> int:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        view = memoryview(self.buffer)
        while not self.stop:
            self.expire_held()
            if not poller.poll(200):
                continue
            try:
                n = os.readv(self.fd, [self.buffer])
            except OSError as exc:
                if exc.errno == E.ENODEV:  # unmounted: the connection is gone
                    return 0
                if exc.errno in (E.EINTR, E.EAGAIN, E.ENOENT):
                    continue
                raise
            raw = bytes(view[:n])
            self.record(Direction.REQUEST, raw)
            self.dispatch(raw)
            for note in self.responder.notifications:
                self.send(note, Direction.NOTIFY)
            self.responder.notifications.clear()
            self.out.flush()
            if self.responder.pause:
                self.responder.pause = False
                time.sleep(PAUSE_SECONDS)
        return 0

    def dispatch(self, raw: bytes) -> None:
        r = self.responder
        try:
            req = decode_request(raw, minor=r.minor, flags=r.flags)
        except ProtocolError as exc:
            if len(raw) >= 16:
                self.answer(int.from_bytes(raw[8:16], "little"), exc.errno)
            return
        try:
            result = r.handle(req)
        except FuseError as exc:
            if not req.spec.no_reply:
                self.answer(req.unique, exc.errno)
            return
        except _Deferred:
            return
        except _Interrupt as intr:
            if r.held.pop(intr.target, None) is not None:
                self.answer(intr.target, E.EINTR)
            return
        if req.spec.no_reply:
            return
        minor = r.minor if req.spec.opcode is not Opcode.INIT else min(req.arg.minor, C.KERNEL_MINOR_VERSION)
        self.send(b"".join(encode_reply_parts(req.spec, req.unique, result, minor)))

    def expire_held(self) -> None:
        now = time.monotonic()
        for unique, deadline in list(self.responder.held.items()):
            if now >= deadline:
                del self.responder.held[unique]
                # Never interrupted: grant the lock rather than leave the caller blocked.
                self.send(b"".join(encode_reply_parts(OPCODES[Opcode.SETLKW], unique, None)))


def run(args: argparse.Namespace) -> int:
    """Mount, serve and record until unmounted or signalled."""
    if os.geteuid() != 0:
        print("virtiofs capture: mounting through /dev/fuse needs root", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mountpoint = os.path.abspath(args.mountpoint)
    fd = mount_devfuse(mountpoint, args.fsname)
    path = out_dir / "capture.fusecap"
    with open(path, "wb") as out:
        out.write(MAGIC)
        capture = Capture(fd, out)

        def stop(signum: int, frame: FrameType | None) -> None:
            capture.stop = True

        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        print(f"capture: serving {mountpoint}, recording to {path}", file=sys.stderr,
              flush=True)
        try:
            return capture.run()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            unmount(mountpoint)
            os.close(fd)
