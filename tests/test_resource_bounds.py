"""Resource bounds and faults against real peers (issue #6; SECURITY.md B6 items 7, 8, 10, 15).

- Sizes a hostile peer chooses never become allocations: a 4 GiB READ of a 1 GiB file, a
  4 GiB READDIR, a WRITE whose ``size`` claims 1 GiB, a vhost-user chain whose descriptors add
  up to 1 GiB (all pointing at the same 64 KiB of guest memory) — answered with an errno,
  memory measured (tracemalloc in-process, VmRSS of server processes).
- A flood of requests from several processes on a /dev/fuse mount keeps the server's RSS
  bounded and a probe client served.
- Blocked lock waiters (SETLKW) beyond the worker pool do not stop the mount.
- A client SIGKILLed in the middle of a stream of write+fsync: every record acknowledged after
  fsync is on the host file, and whatever else is there is a correct prefix of what was written.
- A vhost-user front-end killed with requests in flight: the back-end (a ``virtiofs serve``
  process) survives, releases every fd, and serves the next front-end; a guest that stops
  reaping its used ring stalls only its own queue.
- Replies carry no stale bytes of earlier, larger replies.

Every wait is bounded; processes are killed by PID and mounts detached in ``finally``.
"""

from __future__ import annotations

import errno
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtiofs.protocol import encode_request
from virtiofs.protocol import structs as S
from virtiofs.protocol.constants import KERNEL_MINOR_VERSION, Opcode
from virtiofs.protocol.dirents import decode_dirents, dirent_size
from virtiofs.protocol.schema import codec
from virtiofs.server.memfs import MemoryFS
from virtiofs.server.passthrough import PassthroughFS
from virtiofs.server.session import Session

ROOT = Path(__file__).resolve().parent.parent
OUT = struct.Struct("<IiQ")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                               reason="needs root and /dev/fuse")


def zero(cls: type[Any], **fields: Any) -> Any:
    c = codec(cls)
    return c.unpack(bytes(c.size))._replace(**fields)


def init(session: Session) -> None:
    arg = zero(S.InitIn, major=7, minor=KERNEL_MINOR_VERSION, max_readahead=1 << 17,
               flags=0xFFFFFFFF, flags2=0xFFFFFFFF)
    reply = session.handle(encode_request(Opcode.INIT, 1, 0, arg))
    assert reply is not None and OUT.unpack_from(b"".join(bytes(p) for p in reply))[1] == 0


def call(session: Session, raw: bytes) -> tuple[int, bytes]:
    """(errno or 0, body) of the one reply to ``raw``."""
    parts = session.handle(raw)
    assert parts is not None
    out = b"".join(bytes(p) for p in parts)
    length, err, _ = OUT.unpack_from(out)
    assert length == len(out)
    return -err, out[16:]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result and the peak of Python allocations while it ran (tracemalloc sees
    every PyMem/PyObject allocation, including the buffer ``os.pread`` allocates up front)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Session]]:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    with open(src / "big", "wb") as f:
        f.truncate(1 << 30)  # sparse: reading it yields zeros without using disk
    for i in range(3000):
        (src / "dir" / f"entry-{i:05d}-{'x' * 40}").touch()
    (src / "small").write_bytes(b"tiny")
    fs = PassthroughFS(src, passthrough=False)
    session = Session(fs)
    init(session)
    try:
        yield src, session
    finally:
        session.close()
        fs.close()


def lookup(session: Session, name: bytes, parent: int = 1) -> int:
    err, body = call(session, encode_request(Opcode.LOOKUP, 10, parent, None, (name,)))
    assert err == 0
    return int(codec(S.EntryOut).unpack(body).nodeid)


def open_fh(session: Session, nodeid: int, op: Opcode = Opcode.OPEN, flags: int = 0) -> int:
    err, body = call(session, encode_request(op, 11, nodeid, zero(S.OpenIn, flags=flags)))
    assert err == 0
    return int(codec(S.OpenOut).unpack(body).fh)


# -- sizes chosen by the peer ---------------------------------------------------------------

def test_huge_read_size_is_refused_without_allocating_it(tree: tuple[Path, Session]) -> None:
    _, session = tree
    node = lookup(session, b"big")
    fh = open_fh(session, node)
    raw = encode_request(Opcode.READ, 12, node, zero(S.ReadIn, fh=fh, size=0xFFFFF000))
    (err, body), peak = peak_bytes(lambda: call(session, raw))
    assert err == errno.EINVAL and body == b""
    assert peak < 8 << 20, f"{peak} bytes allocated for a refused READ"
    # The largest READ the kernel can send (max_pages pages) is served.
    cap = session.conn.max_pages * 4096 if session.conn else 1 << 20
    raw = encode_request(Opcode.READ, 13, node, zero(S.ReadIn, fh=fh, size=cap))
    err, body = call(session, raw)
    assert err == 0 and len(body) == cap


@pytest.mark.parametrize("op", [Opcode.READDIR, Opcode.READDIRPLUS])
def test_huge_readdir_size_is_refused_and_the_largest_real_one_is_bounded(
        tree: tuple[Path, Session], op: Opcode) -> None:
    _, session = tree
    node = lookup(session, b"dir")
    fh = open_fh(session, node, Opcode.OPENDIR)
    raw = encode_request(op, 14, node, zero(S.ReadIn, fh=fh, size=0xFFFFFFFF))
    (err, body), peak = peak_bytes(lambda: call(session, raw))
    assert err == errno.EINVAL and peak < 8 << 20
    raw = encode_request(op, 15, node, zero(S.ReadIn, fh=fh, size=1 << 20))
    err, body = call(session, raw)
    assert err == 0 and 0 < len(body) <= 1 << 20
    entries = decode_dirents(body, op is Opcode.READDIRPLUS)
    assert len(entries) >= 100


def test_write_claiming_1_gib_is_refused_before_allocation(tree: tuple[Path, Session]) -> None:
    src, session = tree
    node = lookup(session, b"small")
    fh = open_fh(session, node, flags=os.O_RDWR)
    good = encode_request(Opcode.WRITE, 16, node, zero(S.WriteIn, fh=fh, size=5), (), b"HELLO")
    # write_in.size says 1 GiB, 5 bytes follow (in_header.len is honest).
    claim = bytearray(good)
    struct.pack_into("<I", claim, 40 + 16, 1 << 30)
    (err, _), peak = peak_bytes(lambda: call(session, bytes(claim)))
    assert err == errno.EINVAL and peak < 1 << 20
    # in_header.len says 1 GiB too: the header no longer fits what was received.
    struct.pack_into("<I", claim, 0, (1 << 30) + 80)
    (err, _), peak = peak_bytes(lambda: call(session, bytes(claim)))
    assert err in (errno.EIO, errno.EINVAL) and peak < 1 << 20
    assert (src / "small").read_bytes() == b"tiny"
    assert call(session, good) == (0, codec(S.WriteOut).pack(zero(S.WriteOut, size=5)))


def test_no_stale_bytes_in_replies_after_larger_ones(tree: tuple[Path, Session]) -> None:
    """SECURITY.md B1 #10: a reply never carries bytes of an earlier one (padding zero, length
    exact), whatever was answered before."""
    src, session = tree
    (src / "dir2").mkdir()
    (src / "dir2" / "a").touch()
    big = lookup(session, b"dir")
    small = lookup(session, b"dir2")
    for node, size in ((big, 1 << 17), (small, 1 << 17), (big, 4096), (small, 4096)):
        fh = open_fh(session, node, Opcode.OPENDIR)
        err, body = call(session, encode_request(Opcode.READDIR, 17, node,
                                                 zero(S.ReadIn, fh=fh, size=size)))
        assert err == 0
        pos = 0
        for e in decode_dirents(body, strict=True):
            end = pos + dirent_size(len(e.name))
            pad = body[pos + 24 + len(e.name):end]
            assert pad == bytes(len(pad)), "dirent padding is not zero"
            pos = end
        assert pos == len(body)
    node = lookup(session, b"small")
    fh = open_fh(session, node)
    err, body = call(session, encode_request(Opcode.READ, 18, node,
                                             zero(S.ReadIn, fh=fh, size=1 << 16)))
    assert (err, body) == (0, b"tiny")


# -- a /dev/fuse server under load ----------------------------------------------------------

def _server(tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    from virtiofs.transport.devfuse import mount_entry
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mnt = args[-1]
    proc = subprocess.Popen([sys.executable, "-m", "virtiofs", "mount", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entry = mount_entry(mnt)
        if entry is not None and entry.fstype.startswith("fuse"):
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("server did not mount within 30 s")


def _stop(proc: subprocess.Popen[bytes], mnt: str | Path) -> None:
    from virtiofs.transport.devfuse import lazy_unmount
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stderr is not None:
        proc.stderr.close()
    lazy_unmount(mnt)


def _fork(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - the child reports through its exit code
            code = 1
        finally:
            os._exit(code)
    return pid


def _reap(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Exit codes; children still running at the deadline are SIGKILLed (code -9)."""
    deadline = time.monotonic() + timeout
    codes: dict[int, int] = {}
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return [codes[p] for p in pids]


@ROOT_ONLY
@pytest.mark.devfuse
def test_flood_of_requests_keeps_memory_bounded_and_others_served(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "many").mkdir()
    for i in range(500):
        (src / "many" / f"f{i}").write_bytes(b"x" * 100)
    proc = _server(tmp_path, "--threads", "2", str(src), str(mnt))
    pids: list[int] = []
    try:
        os.listdir(mnt / "many")
        time.sleep(0.2)
        base = rss_kib(proc.pid)

        def flood(k: int) -> Callable[[], None]:
            def run() -> None:
                end = time.monotonic() + 4
                n = 0
                while time.monotonic() < end:
                    n += 1
                    try:
                        os.stat(mnt / f"missing-{k}-{n}")  # never cached: one LOOKUP each
                    except FileNotFoundError:
                        pass
                    p = mnt / f"tmp-{k}"
                    p.write_bytes(b"y" * 8192)
                    p.unlink()
                    if n % 20 == 0:
                        os.listdir(mnt / "many")
            return run

        pids = [_fork(flood(k)) for k in range(6)]
        peak = base
        probes: list[float] = []
        end = time.monotonic() + 4
        while time.monotonic() < end:
            t = time.monotonic()
            with pytest.raises(FileNotFoundError):
                os.stat(mnt / f"probe-{len(probes)}")
            probes.append(time.monotonic() - t)
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.05)
        codes = _reap(pids, 30)
        pids = []
        print(f"flood: server RSS {base} -> peak {peak} KiB; {len(probes)} probes, slowest "
              f"{max(probes) * 1e3:.0f} ms")
        assert codes == [0] * 6, codes
        assert proc.poll() is None
        assert len(probes) >= 20 and max(probes) < 2.0, (len(probes), max(probes))
        # A Python server at rest is ~30 MiB; the flood may add buffers, never unbounded ones.
        assert peak - base < 64 * 1024, f"RSS grew from {base} to {peak} KiB"
        assert len(os.listdir(mnt / "many")) == 500
    finally:
        _reap(pids, 5)
        _stop(proc, mnt)


WAITER = """
import errno, fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX)  # blocks until the holder unlocks
except OSError as e:
    sys.exit(3 if e.errno == errno.ENOLCK else 1)
fcntl.lockf(fd, fcntl.LOCK_UN)
"""


@ROOT_ONLY
@pytest.mark.devfuse
def test_in_flight_lock_waiters_beyond_the_pool_do_not_stop_the_mount(
        fuse_mount: Callable[..., Any]) -> None:
    """SETLKW waits are served on a bounded pool (dispatch.py: 2 workers, a queue of 8 here).
    More waiters than that must neither freeze the readers (then the unlock itself could not
    be read: a deadlock only an abort of the connection ends) nor grow without bound: the
    extra ones are answered ENOLCK, the others get the lock once it is released."""
    import fcntl
    m = fuse_mount(MemoryFS(), threads=2, workers=2)
    path = os.path.join(m.mountpoint, "lockfile")
    with open(path, "wb") as f:
        f.write(b"x")
    holder = os.open(path, os.O_RDWR)
    # Waiters are exec'd, not forked: a forked child would inherit the /dev/fuse fd and keep a
    # wedged connection alive after the test.
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fcntl.lockf(holder, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, "-c", WAITER, path]) for _ in range(24)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(p.poll() == 3 for p in procs) < 24 - 10:
            time.sleep(0.05)
        inflight = len(m.session.inflight)
        assert inflight <= 2 + 2, f"{inflight} requests in flight with 2 readers + 2 workers"
        stat_proc = subprocess.Popen([sys.executable, "-c",
                                      f"import os; os.stat({m.mountpoint!r})"])
        assert stat_proc.wait(10) == 0, "a stat was not served while the waiters wait"
        fcntl.lockf(holder, fcntl.LOCK_UN)
        codes = [p.wait(30) for p in procs]
        assert set(codes) <= {0, 3}, codes
        assert codes.count(0) >= 8, codes  # what the pool took (at least its queue) got the lock
        assert m.session.inflight == frozenset()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        os.close(holder)


@ROOT_ONLY
@pytest.mark.devfuse
@pytest.mark.parametrize("kernel_passthrough", [False, True],
                         ids=["python-writes", "kernel-passthrough"])
def test_client_sigkilled_mid_write_acknowledged_records_are_on_the_host(
        fuse_mount: Callable[..., Any], tmp_path: Path, kernel_passthrough: bool) -> None:
    src = tmp_path / "src"
    src.mkdir()
    m = fuse_mount(PassthroughFS(src, passthrough="auto" if kernel_passthrough else False))
    rec = 65536
    path = os.path.join(m.mountpoint, "journal")

    def record(i: int) -> bytes:
        body = random.Random(i).randbytes(rec - 8)
        return struct.pack("<II", i, zlib.crc32(body)) + body

    r, w = os.pipe()

    def writer() -> None:
        os.close(r)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        for i in range(100_000):
            os.pwrite(fd, record(i), i * rec)
            os.fsync(fd)
            os.write(w, struct.pack("<I", i))

    pid = _fork(writer)
    os.close(w)
    acked = -1
    try:
        deadline = time.monotonic() + 20
        target = 20 + random.Random(os.getpid()).randrange(20)
        while acked < target and time.monotonic() < deadline:
            if select.select([r], [], [], 1.0)[0]:
                data = os.read(r, 4096)
                if not data:
                    break
                acked = struct.unpack_from("<I", data, len(data) - 4 - len(data) % 4)[0]
        os.kill(pid, signal.SIGKILL)
        _reap([pid], 10)
        while True:  # acknowledgements written before the kill
            if not select.select([r], [], [], 0.2)[0]:
                break
            data = os.read(r, 4096)
            if not data:
                break
            acked = struct.unpack_from("<I", data, len(data) - 4 - len(data) % 4)[0]
    finally:
        os.close(r)
    assert acked >= 20, f"only {acked + 1} records acknowledged"
    host = (src / "journal").read_bytes()
    assert len(host) >= (acked + 1) * rec, "an acknowledged (fsynced) record is missing"
    for i in range((len(host) + rec - 1) // rec):
        got = host[i * rec:(i + 1) * rec]
        assert got == record(i)[:len(got)], f"record {i} on the host is not what was written"
    assert len(host) - (acked + 1) * rec <= 2 * rec  # at most the write in flight (and its page)


# -- vhost-user: a back-end process facing a dying or stalled front-end ---------------------

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vhost_user_frontend import OUT_HEADER, Frontend, fuse_request, init_request  # noqa: E402


@pytest.fixture
def backend() -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    d = Path(tempfile.mkdtemp(prefix="vfs-res-"))  # AF_UNIX paths are short
    shared = d / "shared"
    shared.mkdir()
    (shared / "file").write_bytes(b"data" * 1000)
    sock = d / "vhost.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "virtiofs", "serve", "--socket-path",
                             str(sock), "--shared-dir", str(shared), "--sandbox", "none",
                             "--reconnect"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.02)
        yield proc, sock, shared
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def _connect(sock: Path, queues: tuple[int, ...] = (0, 1), size: int = 64,
             mem_size: int = 8 << 20) -> Frontend:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    fe = Frontend(s, mem_size=mem_size)
    fe.handshake()
    for q in queues:
        fe.setup_queue(q, size)
    reply = fe.fuse(1, init_request(unique=1), 4096)
    assert OUT_HEADER.unpack_from(reply)[1:] == (0, 1)
    return fe


def _getattr(fe: Frontend, q: int, unique: int) -> None:
    reply = fe.fuse(q, fuse_request(3, unique, b"\0" * 16), 256)
    assert OUT_HEADER.unpack_from(reply)[1:] == (0, unique)


def _wait_fds(pid: int, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    n = nfds(pid)
    while n > want and time.monotonic() < deadline:
        time.sleep(0.05)
        n = nfds(pid)
    return n


def test_frontend_dying_mid_request_leaves_the_backend_serving_the_next(
        backend: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, sock, _ = backend
    idle_fds = nfds(proc.pid)

    def doomed() -> None:
        fe = _connect(sock)
        write_in = struct.pack("<QQIIQII", 0, 0, 65536, 0, 0, 0, 0)
        for u in range(15):  # 2 descriptors each: 30 of the ring's 64
            # WRITEs on a file handle that does not exist and GETATTRs, all in flight.
            fe.submit(1, fuse_request(16, 100 + u, write_in + b"w" * 65536), 256)
            fe.submit(1, fuse_request(3, 200 + u, b"\0" * 16), 256)
        os.kill(os.getpid(), signal.SIGKILL)

    for _ in range(3):
        assert _reap([_fork(doomed)], 30) == [-signal.SIGKILL]
    fe = _connect(sock)
    try:
        base = rss_kib(proc.pid)
        for u in range(20):
            _getattr(fe, 1, 1000 + u)
        assert proc.poll() is None
        assert rss_kib(proc.pid) - base < 32 * 1024
    finally:
        fe.close()
    # Everything the dead and the closed connections brought (memfd, eventfds, sockets) is gone.
    assert _wait_fds(proc.pid, idle_fds) <= idle_fds


def test_chain_claiming_1_gib_is_answered_without_copying_it(
        backend: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    from virtiofs.virtqueue import Buffer
    proc, sock, _ = backend
    fe = _connect(sock, size=64, mem_size=16 << 20)
    try:
        base = rss_kib(proc.pid)
        page = fe.alloc.alloc(65536, 4096)
        write_in = struct.pack("<QQIIQII", 0, 0, 1 << 30, 0, 0, 0, 0)
        head = fuse_request(16, 77, write_in)
        fe.mem.write(page, struct.pack("<I", (1 << 30) + 80) + head[4:])
        # 16384 descriptors of 64 KiB, every one the same guest page: 1 GiB "readable".
        q = fe.queues[1]
        q.add([Buffer(page, 65536)] * 16384, [4096], token="huge", indirect=True)
        os.eventfd_write(fe.kicks[1], 1)
        (c,) = fe.wait(1, 1, timeout=20)
        assert c.token == "huge"
        if c.length:
            length, err, unique = OUT_HEADER.unpack_from(c.data)
            assert length == c.length and err < 0 and unique == 77
        grew = rss_kib(proc.pid) - base
        print(f"1 GiB chain: back-end RSS grew {grew} KiB; used.len {c.length}")
        assert grew < 64 * 1024, "the back-end copied the claimed request"
        _getattr(fe, 1, 78)
    finally:
        fe.close()


def test_guest_that_stops_reaping_its_used_ring_stalls_only_its_own_queue(
        backend: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, sock, _ = backend
    size = 16
    fe = _connect(sock, queues=(0, 1, 2), size=size)
    try:
        base = rss_kib(proc.pid)
        q1 = fe.queues[1]
        n = size // 2  # 2 descriptors each: the ring is then full
        used_idx_at = q1.layout.used + 2
        start = struct.unpack("<H", fe.mem.read(used_idx_at, 2))[0]  # INIT went this way
        for u in range(n):
            q1.add([fuse_request(3, 500 + u, b"\0" * 16)], [256], token=500 + u)
        os.eventfd_write(fe.kicks[1], 1)
        # The back-end fills the used ring; nobody reaps it, and the driver has no room left.
        deadline = time.monotonic() + 10
        while struct.unpack("<H", fe.mem.read(used_idx_at, 2))[0] != (start + n) & 0xFFFF:
            assert time.monotonic() < deadline, "the back-end did not complete the ring"
            time.sleep(0.01)
        for _ in range(1000):  # a guest that keeps kicking a full, unreaped ring
            os.eventfd_write(fe.kicks[1], 1)
        for u in range(50):
            _getattr(fe, 2, 600 + u)
        assert proc.poll() is None and rss_kib(proc.pid) - base < 32 * 1024
        done = fe.wait(1, n, timeout=10)
        assert sorted(c.token for c in done) == list(range(500, 500 + n))
        assert all(OUT_HEADER.unpack_from(c.data)[1] == 0 for c in done)
        _getattr(fe, 1, 700)
    finally:
        fe.close()




def _entry_nodeid(reply: bytes) -> int:
    return int(struct.unpack_from("<Q", reply, 16)[0])


def test_lock_waiters_beyond_the_pool_do_not_stall_a_vhost_user_queue(
        backend: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    """The vhost-user twin of the /dev/fuse test: SETLKW waits go to a bounded pool; when it
    is full the queue thread must not block (the unlock arrives on the same queue)."""
    _, sock, _ = backend
    fe = _connect(sock, size=128)
    try:
        reply = fe.fuse(1, fuse_request(1, 2, b"file\0"), 256)  # LOOKUP
        assert OUT_HEADER.unpack_from(reply)[1] == 0
        node = _entry_nodeid(reply)
        reply = fe.fuse(1, fuse_request(14, 3, struct.pack("<II", os.O_RDWR, 0), node), 256)
        assert OUT_HEADER.unpack_from(reply)[1] == 0
        fh = struct.unpack_from("<Q", reply, 16)[0]

        def lk(unique: int, owner: int, kind: int, opcode: int) -> bytes:
            body = struct.pack("<QQQQIIII", fh, owner, 0, 0xFFFFFFFFFFFFFFFF, kind, 1, 0, 0)
            return fuse_request(opcode, unique, body, node)

        F_WRLCK, F_UNLCK, SETLK, SETLKW = 1, 2, 32, 33
        reply = fe.fuse(1, lk(4, 1, F_WRLCK, SETLK), 256)
        assert OUT_HEADER.unpack_from(reply)[1] == 0
        waiters = 30  # the default pool: 2 threads and a queue of 8
        for k in range(waiters):
            fe.submit(1, lk(100 + k, 10 + k, F_WRLCK, SETLKW), 256)
        # The queue still serves: a GETATTR, answered while the waiters wait.
        fe.submit(1, fuse_request(3, 900, b"\0" * 16), 256)
        early = fe.wait(1, 1 + waiters - 10, timeout=15)
        assert 900 in {OUT_HEADER.unpack_from(c.data)[2] for c in early}
        answered = {OUT_HEADER.unpack_from(c.data)[2]: OUT_HEADER.unpack_from(c.data)[1]
                    for c in early}
        assert set(answered.values()) <= {0, -errno.ENOLCK}, answered
        # The unlock, on the same queue; then each waiter that gets the lock gives it back.
        fe.submit(1, lk(901, 1, F_UNLCK, SETLKW), 256)
        granted = 0
        for _ in range(4 * waiters):
            if len([u for u in answered if 100 <= u < 100 + waiters]) == waiters:
                break
            for c in fe.wait(1, 1, timeout=15):
                _, err, unique = OUT_HEADER.unpack_from(c.data)
                answered[unique] = err
                if 100 <= unique < 100 + waiters and err == 0:
                    granted += 1
                    fe.submit(1, lk(1000 + unique, 10 + unique - 100, F_UNLCK, SETLK), 256)
        assert {answered.get(100 + k) for k in range(waiters)} <= {0, -errno.ENOLCK}
        assert granted >= 8  # every waiter the pool took (at least its queue of 8) got the lock
    finally:
        fe.close()


class _FaultyFS(MemoryFS):
    """GETATTR of node 1 raises a plain exception (a handler bug) while ``armed``."""

    armed = False

    def getattr(self, ctx: Any, ino: int, fh: int | None) -> Any:
        if self.armed:
            raise RuntimeError("a handler bug")
        return super().getattr(ctx, ino, fh)


def test_handler_exception_over_vhost_user_is_eio_and_the_queue_goes_on() -> None:
    from virtiofs.transport.vhost_user.backend import VhostUserBackend
    d = Path(tempfile.mkdtemp(prefix="vfs-res-"))
    fs = _FaultyFS()
    srv = VhostUserBackend(lambda: Session(fs), d / "vhost.sock")
    srv.start()
    fe = None
    try:
        fe = _connect(d / "vhost.sock")
        fs.armed = True
        for u in range(5):
            reply = fe.fuse(1, fuse_request(3, 50 + u, b"\0" * 16), 256)
            assert OUT_HEADER.unpack_from(reply) == (16, -errno.EIO, 50 + u)
        fs.armed = False
        _getattr(fe, 1, 60)
    finally:
        if fe is not None:
            fe.close()
        srv.close()
        import shutil
        shutil.rmtree(d, ignore_errors=True)
