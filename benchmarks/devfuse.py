#!/usr/bin/env python3
"""The /dev/fuse transport and the session, measured; filesystems are a parameter.

    python benchmarks/devfuse.py [--fs memfs,memfs-pool] [--runs 3] [--files 5000]
                                 [--size 256M] [--runtime 5] [--threads 2] [--unpinned]
                                 [--skip micro,floor,fio]

1. ``micro``: the cost of ``Session.handle`` for GETATTR and LOOKUP (a trivial filesystem and
   MemoryFS), in-process, against ``decode_request`` + ``encode_reply_parts`` (the protocol
   layer's general path), in µs per request.
2. ``floor``: negative lookups per second against a bare Python /dev/fuse loop (read, answer
   ENOENT with one struct, write: FACTS.md's "Python itself") and against each filesystem —
   what our design costs above the floor.
3. shared/bench/fsbench.py (the reference workload: metadata loops, then fio) against plain
   tmpfs and each filesystem, each server in its own process.

Server and load both run under ``taskset -c 0`` unless ``--unpinned`` (FACTS.md: unpinned
figures swing 5x on these 2-vCPU machines).  Every figure is repeated ``--runs`` times and
printed as median [min–max] with the ratio to tmpfs measured in the same run.

A filesystem is a factory in ``FACTORIES``: ``name -> (callable building the Filesystem,
mount options)``.  Add PassthroughFS, or anything else, there; ``--fs`` picks which run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
FSBENCH = Path("/work/shared/bench/fsbench.py")
if not FSBENCH.exists():
    FSBENCH = REPO.parent / "shared" / "bench" / "fsbench.py"


def _memfs(**kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        from virtiofs.server.memfs import MemoryFS
        return MemoryFS(**kw)
    return build


FACTORIES: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "memfs": (_memfs(), {}),
    "memfs-1thread": (_memfs(), {"threads": 1}),
    "memfs-cache-none": (_memfs(cache="none"), {}),
}
"""name -> (filesystem factory, extra devfuse mount options)."""


def _passthrough_factory() -> None:
    # Registered lazily: PassthroughFS lives in its own module (another engineer's file).
    try:
        from virtiofs.server.passthrough import PassthroughFS
    except ImportError:
        return

    def build() -> Any:
        src = tempfile.mkdtemp(prefix="devfuse-bench-src-", dir="/dev/shm")
        return PassthroughFS(src)
    FACTORIES.setdefault("passthrough", (build, {}))

    def build_nopt() -> Any:
        # Reads and writes served in Python (no FUSE_PASSTHROUGH): what the data path costs.
        src = tempfile.mkdtemp(prefix="devfuse-bench-src-", dir="/dev/shm")
        return PassthroughFS(src, passthrough=False)
    FACTORIES.setdefault("passthrough-nopt", (build_nopt, {}))


_passthrough_factory()


# ------------------------------------------------------------------------ server processes


def serve_main(name: str, mountpoint: str, threads: int) -> int:
    """The server process: serve FACTORIES[name] at ``mountpoint`` until signalled."""
    from virtiofs.transport.devfuse import serve
    factory, options = FACTORIES[name]
    options = {"threads": threads, **options}
    return serve(factory(), mountpoint, fsname=f"bench-{name}", **options)


FLOOR = r"""
import os, struct, sys
from virtiofs.protocol.structs import Attr, AttrOut
from virtiofs.server.filesystem import Filesystem
from virtiofs.server.session import Session, read_buffer_size
from virtiofs.transport import devfuse
# A bare loop (FACTS.md's "Python itself"): one thread, read -> one struct -> write for
# LOOKUP; the session only for the rest (INIT, the root's GETATTR).
class Root(Filesystem):
    def getattr(self, ctx, ino, fh):
        return AttrOut(3600, 0, 0, Attr(ino=1, mode=0o40755, nlink=2))
fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
devfuse._sys_mount(b"bench-floor", sys.argv[1].encode(), b"fuse.floor", 6,
                   devfuse.MountOptions().data(fd).encode())
handle = Session(Root()).handle
buf = bytearray(read_buffer_size(1 << 20))
view = memoryview(buf)
unpack = struct.Struct("<IIQ").unpack_from
pack = struct.Struct("<IiQ").pack
while True:
    try:
        n = os.readv(fd, [buf])
    except OSError:
        break
    size, opcode, unique = unpack(buf)
    if opcode == 1:
        os.write(fd, pack(16, -2, unique))
    else:
        parts = handle(view[:n])
        if parts:
            os.writev(fd, parts)
"""


def _taskset(pinned: bool) -> list[str]:
    return ["taskset", "-c", "0"] if pinned else []


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@contextlib.contextmanager
def server(name: str, mountpoint: str, pinned: bool,
           threads: int) -> Iterator[subprocess.Popen[bytes]]:
    if name == "floor":
        argv = [sys.executable, "-c", FLOOR, mountpoint]
    else:
        argv = [sys.executable, __file__, "--_serve", name, mountpoint, "--threads",
                str(threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_taskset(pinned) + argv, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not mount")
            time.sleep(0.05)
        os.stat(mountpoint)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        if _mounted(mountpoint):
            subprocess.run(["umount", "-l", mountpoint], check=False)


# ----------------------------------------------------------------------------- figures


def micro(out: Callable[[str, str, float, str, str], None]) -> None:
    from virtiofs.protocol import (
        OPCODES,
        Opcode,
        decode_request,
        encode_reply_parts,
        encode_request,
    )
    from virtiofs.protocol import structs as S
    from virtiofs.server.filesystem import Filesystem
    from virtiofs.server.memfs import MemoryFS
    from virtiofs.server.session import Session

    attr = S.AttrOut(1, 0, 0, S.Attr(ino=1, mode=0o40755, nlink=2))
    entry = S.EntryOut(2, 0, 1, 1, 0, 0, attr.attr)

    class Trivial(Filesystem):
        def getattr(self, ctx: Any, ino: int, fh: Any) -> Any:
            return attr

        def lookup(self, ctx: Any, parent: int, name: bytes) -> Any:
            return entry

    def started(fs: Any) -> Session:
        s = Session(fs)
        s.handle(encode_request(Opcode.INIT, 2, 0, S.InitIn(7, 45, 1 << 20, 0xFFFFFFFF)))
        return s

    memfs = MemoryFS()
    memfs.mkdir(_ctx(), 1, b"d", 0o755)
    getattr_req = memoryview(encode_request(Opcode.GETATTR, 4, 1, S.GetattrIn()))
    lookup_req = memoryview(encode_request(Opcode.LOOKUP, 4, 1, None, [b"d"]))
    n = 50_000
    for label, fs in (("trivial", Trivial()), ("memfs", memfs)):
        s = started(fs)
        for fig, req in (("getattr", getattr_req), ("lookup", lookup_req)):
            t = min(timeit.repeat(lambda r=req, h=s.handle: h(r), number=n, repeat=5)) / n
            out(f"session-{label}", f"handle.{fig}", t * 1e6, "us",
                "Session.handle per request, best of 5")
    spec = OPCODES[Opcode.GETATTR]
    t = min(timeit.repeat(lambda: encode_reply_parts(spec, 4, decode_request(getattr_req)
                                                     and attr), number=n, repeat=5)) / n
    out("protocol-general", "decode+encode.getattr", t * 1e6, "us",
        "decode_request + encode_reply_parts, no filesystem")


def _ctx() -> Any:
    from virtiofs.server.filesystem import Context
    return Context()


MISS = r"""
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
for i in range(n):
    try:
        os.stat(f"{d}/nope{i}")
    except FileNotFoundError:
        pass
print(n / (time.perf_counter() - t))
"""


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def floor(names: list[str], mnt: str, pinned: bool, threads: int,
          out: Callable[[str, str, float, str, str], None]) -> None:
    n = 20000
    for name in ["floor", *names]:
        with server(name, mnt, pinned, threads) as proc:
            # A fresh name each call: one LOOKUP round trip each (FACTS.md: ENOENT is not
            # cached; MemoryFS caches negative entries, but never for a name not yet asked).
            cpu = _cpu_seconds(proc.pid)
            rate = float(subprocess.run(_taskset(pinned) + [sys.executable, "-c", MISS, mnt,
                                                            str(n)],
                                        capture_output=True, text=True, check=True,
                                        timeout=300).stdout)
            cpu = _cpu_seconds(proc.pid) - cpu
            out(name, "lookup_miss", rate, "ops/s", f"{n} absent names, one round trip each")
            # CPU time does not count waiting: the figure the machine's load disturbs least.
            out(name, "server_cpu_per_request", cpu / n * 1e6, "us",
                "server process utime+stime per LOOKUP (user + kernel)")


def fsbench(label: str, mnt: str, args: argparse.Namespace, skip: set[str],
            out: Callable[[str, str, float, str, str], None]) -> None:
    cmd = _taskset(not args.unpinned) + [
        sys.executable, str(FSBENCH), mnt, "--label", label, "--files", str(args.files),
        "--size", args.size, "--runtime", str(args.runtime), "--phase-limit", "30"]
    if "fio" in skip:
        cmd += ["--skip", "fio"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) >= 4:
            try:
                out(fields[0], fields[1], float(fields[2]), fields[3],
                    fields[4] if len(fields) > 4 else "")
            except ValueError:
                print(line, flush=True)
    if result.returncode:
        print(f"# fsbench {label} failed: {result.stderr.strip()[-300:]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fs", default="memfs", help="comma list of " + ",".join(FACTORIES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unpinned", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of micro,floor,fio,fsbench")
    parser.add_argument("--_serve", nargs=2, metavar=("NAME", "MOUNTPOINT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._serve:
        return serve_main(args._serve[0], args._serve[1], args.threads)
    names = [n for n in args.fs.split(",") if n]
    unknown = [n for n in names if n not in FACTORIES]
    if unknown:
        parser.error(f"unknown filesystem(s) {unknown}; known: {list(FACTORIES)}")
    skip = set(filter(None, args.skip.split(",")))
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    units: dict[str, str] = {}

    def out(label: str, figure: str, value: float, unit: str, notes: str = "") -> None:
        values[label, figure].append(value)
        units[figure] = unit
        print(f"{label}\t{figure}\t{value:.2f}\t{unit}\t{notes}", flush=True)

    pinned = not args.unpinned
    print(f"# devfuse bench: fs={names} runs={args.runs} pinned={pinned} "
          f"threads={args.threads} kernel={os.uname().release}", flush=True)
    if "micro" not in skip:
        micro(out)
    work = tempfile.mkdtemp(prefix="devfuse-bench-")
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    tmpfs = tempfile.mkdtemp(prefix="devfuse-bench-tmpfs-", dir="/dev/shm")
    try:
        for run in range(args.runs):
            print(f"# run {run + 1}/{args.runs}", flush=True)
            if "floor" not in skip:
                floor(names, mnt, pinned, args.threads, out)
            if "fsbench" not in skip:
                fsbench("tmpfs", tmpfs, args, skip, out)
                for name in names:
                    with server(name, mnt, pinned, args.threads):
                        fsbench(name, mnt, args, skip, out)
    finally:
        if _mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmpfs, ignore_errors=True)
    summary(values, units, names)
    return 0


def summary(values: dict[tuple[str, str], list[float]], units: dict[str, str],
            names: list[str]) -> None:
    print("\n# median [min-max] over runs; ratio = filesystem / reference in the same runs")
    figures = sorted({f for _, f in values}, key=lambda f: (f.split(".")[0], f))
    for figure in figures:
        ref_label = "floor" if figure in ("lookup_miss", "server_cpu_per_request") else "tmpfs"
        ref = values.get((ref_label, figure))
        for label in [ref_label, *names, "session-trivial", "session-memfs",
                      "protocol-general"]:
            xs = values.get((label, figure))
            if not xs:
                continue
            med = statistics.median(xs)
            cell = f"{med:,.1f} [{min(xs):,.1f}-{max(xs):,.1f}]"
            ratio = f"  {med / statistics.median(ref):.2f}x {ref_label}" \
                if ref and label != ref_label else ""
            print(f"{label:18} {figure:22} {cell:>32} {units[figure]}{ratio}")


if __name__ == "__main__":
    sys.exit(main())
