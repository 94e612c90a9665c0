"""Capture golden vectors from the host kernel (root, /dev/fuse): ``python tests/vectors/make_vectors.py``.

Starts ``virtiofs capture`` on a fresh mountpoint, drives ordinary syscalls at it (stat, open,
read, write, mkdir, rename/renameat2, link, symlink, xattrs, fallocate, lseek, copy_file_range,
flock and fcntl locks, an interrupted F_SETLKW, statfs, fsync/fdatasync, truncate, chmod/chown/
utime, mknod, O_TMPFILE, statx, readdir, access, poll, ioctl, a retrieve notification, cache
drops for FORGET/BATCH_FORGET), unmounts, and writes under ``tests/vectors/``:

- ``capture.fusecap``: the whole exchange (``virtiofs decode tests/vectors/capture.fusecap``);
- ``NNNN-OPCODE-k.json``: up to three vectors per opcode (a success, an error, one with
  extensions), each ``{"opcode", "name", "minor", "flags", "request", "reply"}`` with hex
  bytes as they crossed /dev/fuse and the minor/flags negotiated at that point.

The vectors are data for ``tests/test_protocol_vectors.py``; run this again only to refresh
them (e.g. on a newer kernel) and review the diff.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from virtiofs.errors import ProtocolError  # noqa: E402
from virtiofs.protocol import (  # noqa: E402
    KERNEL_MINOR_VERSION,
    Opcode,
    decode_reply,
    decode_request,
)
from virtiofs.protocol.capturefile import Direction, decode_capture  # noqa: E402

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
STATX_BASIC_STATS, STATX_BTIME = 0x7FF, 0x800
AT_STATX_FORCE_SYNC = 0x2000
FS_IOC_GETFLAGS = 0x80086601
SYS_RENAMEAT2, SYS_STATX, SYS_SYNCFS = 316, 332, 306  # x86-64


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(old: str, new: str, flags: int) -> None:
    _check(libc.syscall(SYS_RENAMEAT2, AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags),
           "renameat2")


def statx_btime(path: str) -> None:
    buf = ctypes.create_string_buffer(256)
    _check(libc.syscall(SYS_STATX, AT_FDCWD, path.encode(), AT_STATX_FORCE_SYNC,
                        STATX_BASIC_STATS | STATX_BTIME, buf), "statx")


def interrupted_setlkw(path: str) -> None:
    """A child blocks in F_SETLKW (the capture tool holds it); a signal makes the kernel send
    INTERRUPT, and the tool answers the SETLKW with EINTR."""
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe work, then _exit
        code = 1
        try:
            class Stop(Exception):
                pass

            def raise_stop(signum: int, frame: object) -> None:
                raise Stop

            signal.signal(signal.SIGUSR1, raise_stop)
            fd = os.open(path, os.O_RDWR)
            lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
            try:
                fcntl.fcntl(fd, fcntl.F_SETLKW, lock)
                code = 3
            except Stop:
                code = 0
        finally:
            os._exit(code)
    time.sleep(0.5)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def workload(mnt: str) -> list[str]:
    """Ordinary syscalls against the mount; returns the steps that failed (for the log)."""
    failed: list[str] = []
    p = lambda *parts: os.path.join(mnt, *parts)  # noqa: E731

    def step(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except OSError as exc:
            failed.append(f"{name}: {exc}")

    step("stat root", lambda: os.stat(mnt))
    step("statfs", lambda: os.statvfs(mnt))
    step("access", lambda: os.access(mnt, os.R_OK | os.X_OK))

    def files() -> None:
        fd = os.open(p("a.txt"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, b"hello fuse\n" * 100)
        os.fsync(fd)
        os.fdatasync(fd)
        os.ftruncate(fd, 900)
        os.close(fd)
        with open(p("a.txt"), "rb") as f:
            f.read()
        fd = os.open(p("a.txt"), os.O_RDWR)
        os.posix_fallocate(fd, 0, 8192)
        os.lseek(fd, 0, os.SEEK_DATA)
        os.lseek(fd, 0, os.SEEK_HOLE)
        os.pwrite(fd, b"x" * 4096, 4096)
        os.close(fd)
    step("files", files)

    def metadata() -> None:
        os.chmod(p("a.txt"), 0o600)
        os.chown(p("a.txt"), 1000, 1000)
        os.utime(p("a.txt"), (1_000_000, 2_000_000))
        os.utime(p("a.txt"))
        os.truncate(p("a.txt"), 8192)
        statx_btime(p("a.txt"))
    step("metadata", metadata)

    def names() -> None:
        os.mkdir(p("d"), 0o755)
        os.mkfifo(p("d", "fifo"), 0o644)
        os.mknod(p("d", "null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.symlink("a.txt", p("link"))
        os.readlink(p("link"))
        os.link(p("a.txt"), p("hard"))
        os.rename(p("hard"), p("d", "hard2"))
        with open(p("b.txt"), "wb") as f:
            f.write(b"bee")
        renameat2(p("b.txt"), p("c.txt"), RENAME_NOREPLACE)
        renameat2(p("c.txt"), p("a.txt"), RENAME_EXCHANGE)
        renameat2(p("a.txt"), p("c.txt"), RENAME_EXCHANGE)
        for i in range(6):
            with open(p("d", f"f{i}"), "wb") as f:
                f.write(bytes([i]) * 10)
        os.listdir(p("d"))
        os.listdir(mnt)
        dfd = os.open(p("d"), os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    step("names", names)

    def xattrs() -> None:
        os.setxattr(p("a.txt"), "user.colour", b"blue")
        os.setxattr(p("a.txt"), "user.shape", b"round", os.XATTR_CREATE)
        os.getxattr(p("a.txt"), "user.colour")
        os.listxattr(p("a.txt"))
        os.removexattr(p("a.txt"), "user.shape")
        try:
            os.getxattr(p("a.txt"), "user.missing")
        except OSError:
            pass
    step("xattrs", xattrs)

    def copies() -> None:
        src = os.open(p("a.txt"), os.O_RDONLY)
        dst = os.open(p("copy.txt"), os.O_CREAT | os.O_WRONLY, 0o644)
        os.copy_file_range(src, dst, 100, 0, 0)     # COPY_FILE_RANGE_64 (answered)
        os.copy_file_range(src, dst, 100, 0, 200)   # _64 gets ENOSYS, COPY_FILE_RANGE follows
        os.close(src)
        os.close(dst)
    step("copy_file_range", copies)

    def locks() -> None:
        fd = os.open(p("a.txt"), os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
        fcntl.fcntl(fd, fcntl.F_GETLK, lock)
        fcntl.fcntl(fd, fcntl.F_SETLK, lock)
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 10, 0))
        os.close(fd)
        interrupted_setlkw(p("a.txt"))
    step("locks", locks)

    def devices() -> None:
        fd = os.open(p("a.txt"), os.O_RDWR)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(0)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytearray(8))
        os.close(fd)
    step("poll+ioctl", devices)

    def tmpfile() -> None:
        fd = os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.write(fd, b"temporary")
        os.close(fd)
    step("O_TMPFILE", tmpfile)

    def retrieve() -> None:
        with open(p("c.txt"), "rb") as f:
            f.read()
            try:
                os.stat(p(".capture-retrieve.c.txt"))
            except FileNotFoundError:
                pass
            time.sleep(0.2)
    step("retrieve", retrieve)

    def syncfs() -> None:
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        _check(libc.syscall(SYS_SYNCFS, fd), "syncfs")
        os.close(fd)
    step("syncfs", syncfs)

    def removals() -> None:
        os.unlink(p("link"))
        os.unlink(p("d", "fifo"))
        for name in os.listdir(p("d")):
            os.unlink(p("d", name))
        os.rmdir(p("d"))
        try:
            os.rmdir(p("nonexistent"))
        except OSError:
            pass
    step("removals", removals)

    def supplementary_group() -> None:
        # FUSE_CREATE_SUPP_GROUP: creating in a directory whose group is one of the caller's
        # supplementary groups (not its fsgid) carries that group as an extension.
        os.mkdir(p("g"), 0o777)
        os.chown(p("g"), 0, 4242)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([4242])
                os.close(os.open(p("g", "new"), os.O_CREAT | os.O_WRONLY, 0o644))
                os.mkdir(p("g", "sub"), 0o755)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status:
            raise OSError(errno.EIO, f"supplementary-group child failed: {status}")
    step("supplementary group", supplementary_group)

    def forgets() -> None:
        # Inodes dropped from the caches are forgotten: one alone arrives as FORGET; several
        # queued while the server does not read (the tool pauses on ".capture-pause") as one
        # BATCH_FORGET.
        for name in ("f1", "f2", "f3", "f4"):
            with open(p(name), "wb") as f:
                f.write(b"x")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        time.sleep(0.2)
        for name in ("f1", "f2", "f3", "f4"):
            os.stat(p(name))
        try:
            os.stat(p(".capture-pause"))
        except FileNotFoundError:
            pass
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        time.sleep(1.0)
        os.stat(mnt)
    step("forgets", forgets)
    return failed


def wait_mounted(mnt: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"capture exited with {proc.returncode}")
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == mnt for line in f):
                return
        time.sleep(0.05)
    raise RuntimeError("mount did not appear")


def capture(workdir: Path) -> tuple[Path, list[str]]:
    mnt = str(workdir / "mnt")
    os.mkdir(mnt)
    out = workdir / "out"
    proc = subprocess.Popen([sys.executable, "-m", "virtiofs", "capture", mnt, "--out",
                             str(out)], cwd=REPO)
    try:
        wait_mounted(mnt, proc)
        failed = workload(mnt)
    finally:
        libc.umount2(mnt.encode(), 2)  # MNT_DETACH: the capture loop sees ENODEV and ends
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return out / "capture.fusecap", failed


def select_vectors(blob: bytes) -> list[dict[str, object]]:
    """Per opcode: the first success, the first error, the first with extensions."""
    minor, flags = 45, 0
    pending: dict[int, tuple[bytes, int, int, int]] = {}
    pending_ext: dict[int, str] = {}
    chosen: dict[tuple[int, str], dict[str, object]] = {}
    order: list[tuple[int, str]] = []

    def keep(opcode: int, kind: str, vector: dict[str, object]) -> None:
        same = any(v["request"] == vector["request"] and v["reply"] == vector["reply"]
                   for (op, _), v in chosen.items() if op == opcode)
        if (opcode, kind) not in chosen and not same:
            chosen[(opcode, kind)] = vector
            order.append((opcode, kind))

    for record in decode_capture(blob):
        if record.direction is Direction.REQUEST:
            req = decode_request(record.data, minor=minor, flags=flags)
            if req.spec.no_reply:
                # INTERRUPT too: the tool answers the interrupted request, not the INTERRUPT.
                keep(req.opcode, "request", _vector(req.opcode, record.data, None, minor,
                                                    flags))
            else:
                pending[req.unique] = (record.data, int(req.opcode), minor, flags)
            kinds = sorted({type(e).__name__ for e in req.ext})
            if kinds:
                ext_kind = "ext-" + "-".join(kinds)
                pending_ext[req.unique] = ext_kind
        elif record.direction in (Direction.REPLY, Direction.REFUSED):
            unique = struct.unpack_from("<Q", record.data, 8)[0]
            error = struct.unpack_from("<i", record.data, 4)[0]
            found = pending.pop(unique, None)
            if found is None:
                continue
            raw, opcode, vminor, vflags = found
            ext_kind = pending_ext.pop(unique, None)
            if ext_kind is not None:
                keep(opcode, ext_kind, _vector(Opcode(opcode), raw, record.data, vminor,
                                               vflags))
            if opcode == Opcode.INIT and not error:
                init_in = decode_request(raw).arg
                out = decode_reply(Opcode.INIT, record.data,
                                   minor=min(init_in.minor, KERNEL_MINOR_VERSION)).value
                minor = min(init_in.minor, out.minor)
                flags = out.flags | (out.flags2 << 32 if out.flags & (1 << 30) else 0)
            keep(opcode, "error" if error else "ok",
                 _vector(Opcode(opcode), raw, record.data, vminor, vflags))
        elif record.direction is Direction.NOTIFY:
            keep(-1, f"notify-{struct.unpack_from('<i', record.data, 4)[0]}",
                 {"opcode": None, "name": "NOTIFY", "minor": minor, "flags": flags,
                  "request": None, "reply": record.data.hex()})
    return [chosen[k] for k in order]


def _vector(opcode: Opcode, request: bytes, reply: bytes | None, minor: int,
            flags: int) -> dict[str, object]:
    return {"opcode": int(opcode), "name": opcode.name, "minor": minor, "flags": flags,
            "request": request.hex(), "reply": reply.hex() if reply is not None else None}


def main() -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="virtiofs-vectors-") as tmp:
        path, failed = capture(Path(tmp))
        blob = path.read_bytes()
    for line in failed:
        print(f"workload step failed: {line}", file=sys.stderr)
    try:
        vectors = select_vectors(blob)
    except ProtocolError as exc:
        print(f"capture does not decode: {exc}", file=sys.stderr)
        return 1
    for old in HERE.glob("*.json"):
        old.unlink()
    (HERE / "capture.fusecap").write_bytes(blob)
    counts: dict[str, int] = {}
    for vector in vectors:
        name = str(vector["name"])
        counts[name] = counts.get(name, 0) + 1
        number = vector["opcode"] if vector["opcode"] is not None else 0
        target = HERE / f"{number:04d}-{name}-{counts[name]}.json"
        target.write_text(json.dumps(vector, indent=1) + "\n")
    opcodes = {v["opcode"] for v in vectors if v["opcode"] is not None}
    print(f"{len(vectors)} vectors, {len(opcodes)} distinct opcodes, "
          f"capture {len(blob)} bytes", file=sys.stderr)
    shutil.rmtree(HERE / "__pycache__", ignore_errors=True)
    return 0 if len(opcodes) >= 35 else 1


if __name__ == "__main__":
    sys.exit(main())
