#!/usr/bin/env python3
"""DAX window reads vs pread: 4 KiB random reads from a 64 MiB file mapped through a DaxWindow,
against os.pread on the same file in the same run.

The file is mapped the way the Linux driver does it: 2 MiB ranges from a DaxRangeAllocator,
each a SETUPMAPPING-equivalent DaxWindow.map. The page cache is warmed first, so both sides
read cached pages; what differs is the path (syscall + copy vs one memcpy from the mapping).

Readers are plain callables ``reader(offset, length) -> bytes-like``. A FUSE_READ reader
(client -> virtqueue -> back-end) plugs in once the front-end exists:

    python3 benchmarks/dax.py                       # pinned to CPU 0 (FACTS.md), 5 runs
    python3 benchmarks/dax.py --no-pin
    python3 benchmarks/dax.py --reader mymod:make   # make(path) -> reader, measured alongside

or from Python: ``run({"FUSE_READ": my_reader}, path=...)``.

End to end (issue 5), in the same run: our client reading the file through the window that our
back-end filled (SETUPMAPPING once per 2 MiB range, then no request) against the *same* client
sending one FUSE_READ per 4 KiB read, on the same front-end and back-end, for each transport:

- ``vhost``: PassthroughFS behind our vhost-user back-end (``DaxVhostUserBackend``), our
  vhost-user front-end owning a window as large as the file (SHMEM_MAP per range), the client
  over the front-end's virtqueues; ``vhost-proc`` the same with the back-end in another process;
- ``loopback``: the same filesystem over the in-process loopback virtqueues, the window handed
  to the filesystem as a direct ``WindowDaxMapper``.

    python3 benchmarks/dax.py --e2e vhost,vhost-proc,loopback --no-local
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from virtiofs.dax.allocator import DaxRangeAllocator  # noqa: E402
from virtiofs.dax.window import DaxWindow  # noqa: E402

Reader = Callable[[int, int], object]
MiB = 1 << 20
BLOCK = 4096


@contextmanager
def mapped_file(path: str, size: int) -> Iterator[tuple[int, DaxWindow, DaxRangeAllocator]]:
    """Open ``path`` and map all of it into a window, one 2 MiB range at a time."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with DaxWindow(size) as win:
            alloc = DaxRangeAllocator(size)
            for foffset in range(0, size, alloc.range_size):
                g = alloc.get_range(1, foffset, write=False)
                assert g is not None and g.setup is not None
                s = g.setup
                win.map(s.moffset, s.length, fd, s.foffset, s.writable)
                alloc.setup_done(g, True)
            yield fd, win, alloc
    finally:
        os.close(fd)


def builtin_readers(fd: int, win: DaxWindow, alloc: DaxRangeAllocator) -> dict[str, Reader]:
    """The readers measured in every run; the first is the baseline."""
    view = win.view  # released when the process ends; close() copes with it
    buf = bytearray(BLOCK)
    bufv = memoryview(buf)
    pread = os.pread
    preadv = os.preadv
    lookup = alloc.lookup

    def window_copy(off: int, n: int) -> object:
        bufv[:n] = view[off : off + n]
        return bufv[:n]

    def client_path(off: int, n: int) -> object:
        # What a DAX client does per read: find the range, then copy (no round trip).
        hit = lookup(1, off)
        assert hit is not None
        moff = hit[0]
        bufv[:n] = view[moff : moff + n]
        return bufv[:n]

    return {
        "os.pread -> bytes": lambda off, n: pread(fd, n, off),
        "os.preadv into buffer": lambda off, n: (preadv(fd, [bufv[:n]], off), bufv[:n])[1],
        "window view slice -> bytes": lambda off, n: bytes(view[off : off + n]),
        "window copy into buffer": window_copy,
        "client path: lookup + copy": client_path,
        "DaxWindow.read (checked)": win.read,
    }


def time_reader(reader: Reader, offsets: list[int]) -> float:
    """Reads per second over ``offsets``."""
    t0 = time.perf_counter_ns()
    for off in offsets:
        reader(off, BLOCK)
    return len(offsets) / ((time.perf_counter_ns() - t0) / 1e9)


def run(
    extra: dict[str, Reader] | None = None,
    *,
    path: str | None = None,
    size: int = 64 * MiB,
    reads: int = 200_000,
    runs: int = 5,
) -> dict[str, list[float]]:
    """Measure every reader (built-ins + ``extra``) on the same offsets; returns reads/s per run.

    ``path`` is an existing file of at least ``size`` bytes; by default a random one is
    created in the temporary directory and removed afterwards.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            path = os.path.join(tmp, "dax-bench")
            with open(path, "wb") as f:
                for _ in range(size // MiB):
                    f.write(os.urandom(MiB))
        with open(path, "rb") as f:  # warm the page cache
            while f.read(8 * MiB):
                pass
        rnd = random.Random(42)
        offsets = [rnd.randrange(size // BLOCK) * BLOCK for _ in range(reads)]
        with mapped_file(path, size) as (fd, win, alloc):
            # Fault every window page in once: the first touch of a page costs a page-table
            # fill that a long-lived mapping pays only once.
            with win.view as v:
                for off in range(0, size, BLOCK):
                    v[off]
            readers = builtin_readers(fd, win, alloc)
            readers.update(extra or {})
            for name, reader in readers.items():  # same bytes, or the figures mean nothing
                for off in offsets[:64]:
                    assert bytes(reader(off, BLOCK)) == os.pread(fd, BLOCK, off), name  # type: ignore[call-overload]
            results: dict[str, list[float]] = {name: [] for name in readers}
            for _ in range(runs):  # interleaved, so drift hits every reader alike
                for name, reader in readers.items():
                    results[name].append(time_reader(reader, offsets))
    return results


# ------------------------------------------------------------------------------ end to end

_BACKEND_PROC = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[4])
    from virtiofs.server.passthrough import PassthroughFS
    from virtiofs.transport.vhost_user.dax import make_dax_backend
    backend = make_dax_backend(PassthroughFS(sys.argv[1]), sys.argv[2],
                               dax_window=int(sys.argv[3]))
    try:
        backend.serve_forever()
    finally:
        backend.close()
""")


@contextmanager
def e2e_client(transport: str, root: str, window: int) -> Iterator[Any]:
    """A ``Client(cache="always", dax=...)`` over ``transport`` serving ``root`` (see the module
    docstring); everything is torn down on exit, a back-end process killed by pid."""
    from virtiofs.client import Client
    from virtiofs.client.queue_channel import QueueChannel
    from virtiofs.server.dax import DAX_EXTRA_KEY, WindowDaxMapper
    from virtiofs.server.passthrough import PassthroughFS
    from virtiofs.server.session import Session
    from virtiofs.transport.loopback import LoopbackDriver, LoopbackServer
    from virtiofs.transport.vhost_user.dax import make_dax_backend
    from virtiofs.transport.vhost_user.frontend import Frontend

    with ExitStack() as stack:
        sock = os.path.join(root, "..", f"dax-bench-{transport}.sock")
        if transport == "loopback":
            fs = PassthroughFS(root)
            stack.callback(fs.close)
            win = stack.enter_context(DaxWindow(window))
            driver = stack.enter_context(LoopbackDriver.create())
            session = Session(fs)
            session.extra[DAX_EXTRA_KEY] = WindowDaxMapper(win)
            stack.enter_context(LoopbackServer(session, driver.setup()))
            client = Client(QueueChannel.for_driver(driver), cache="always", dax=win)
        elif transport == "vhost":
            fs = PassthroughFS(root)
            stack.callback(fs.close)
            backend = make_dax_backend(fs, sock, dax_window=window)
            stack.callback(backend.close)
            backend.start()
            fe = stack.enter_context(Frontend.connect(sock, dax_window=window))
            client = Client(QueueChannel.for_driver(fe), cache="always", dax=True)
        elif transport == "vhost-proc":
            repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
            proc = subprocess.Popen([sys.executable, "-c", _BACKEND_PROC, root, sock,
                                     str(window), repo])

            def reap() -> None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
            stack.callback(reap)
            fe = stack.enter_context(Frontend.connect(sock, dax_window=window,
                                                      connect_timeout=20))
            client = Client(QueueChannel.for_driver(fe), cache="always", dax=True)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        stack.callback(client.close)
        if client.dax is None:
            raise RuntimeError(f"{transport}: DAX was not negotiated")
        yield client


def run_e2e(transport: str, path: str, size: int, offsets: list[int],
            runs: int) -> dict[str, list[float]]:
    """Reads/s of the client through the window and through FUSE_READ, interleaved runs."""
    from virtiofs.protocol import Opcode

    root = os.path.dirname(path)
    with e2e_client(transport, root, size) as client, \
            client.open("/" + os.path.basename(path)) as f:
        buf = bytearray(BLOCK)
        bufv = memoryview(buf)
        # Map every range and fault every page in once, as the local figures do.
        for off in range(0, size, BLOCK):
            f.pread_into(bufv, off)
        setups = client.stats[Opcode.SETUPMAPPING]

        def dax(off: int, n: int) -> object:
            f.pread_into(bufv[:n], off)
            return bufv[:n]

        def fuse_read(off: int, n: int) -> object:
            got = client._read_raw(f, off, bufv[:n])  # exactly one FUSE_READ
            return bufv[:got]

        readers: dict[str, Reader] = {f"{transport}: client via DAX window": dax,
                                      f"{transport}: client via FUSE_READ": fuse_read}
        with open(path, "rb") as host:
            for name, reader in readers.items():
                for off in offsets[:64]:
                    host.seek(off)
                    assert bytes(reader(off, BLOCK)) == host.read(BLOCK), name  # type: ignore[call-overload]
        results: dict[str, list[float]] = {name: [] for name in readers}
        n_reads = {name: len(offsets) if "DAX" in name else max(len(offsets) // 10, 1000)
                   for name in readers}
        for _ in range(runs):
            for name, reader in readers.items():
                results[name].append(time_reader(reader, offsets[:n_reads[name]]))
        sent = client.stats[Opcode.SETUPMAPPING] - setups
        if sent:
            raise AssertionError(f"{sent} SETUPMAPPING during the timed reads")
    return results


def _print(results: dict[str, list[float]], base_name: str) -> None:
    base = statistics.median(results[base_name])
    for name, v in results.items():
        med = statistics.median(v)
        print(f"{name:44} {med:14,.0f} [{min(v):,.0f}-{max(v):,.0f}] {med / base:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=200_000, help="4 KiB reads per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--path", help="existing file to read (default: a fresh random file)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin to CPU 0")
    ap.add_argument(
        "--reader",
        action="append",
        default=[],
        metavar="MODULE:FACTORY",
        help="extra reader: FACTORY(path) returns reader(offset, length) (e.g. FUSE_READ)",
    )
    ap.add_argument("--e2e", default="vhost,vhost-proc,loopback",
                    help="end-to-end transports, comma-separated ('' for none)")
    ap.add_argument("--no-local", action="store_true",
                    help="skip the local window-vs-pread figures")
    args = ap.parse_args()
    if not args.no_pin:
        os.sched_setaffinity(0, {0})
    size = args.size_mib * MiB
    pin = "unpinned" if args.no_pin else "pinned to CPU 0"
    extra: dict[str, Reader] = {}
    for spec in args.reader:
        if args.path is None:
            ap.error("--reader needs --path (the plugged reader must serve the same file)")
        mod, _, factory = spec.partition(":")
        extra[spec] = getattr(importlib.import_module(mod), factory)(args.path)
    if not args.no_local:
        results = run(extra, path=args.path, size=size, reads=args.reads, runs=args.runs)
        print(
            f"4 KiB random reads over a {args.size_mib} MiB cached file, {args.reads} reads x "
            f"{args.runs} runs, {pin}, Python {sys.version.split()[0]}"
        )
        print(f"{'reader':44} {'reads/s median [min-max]':>34} {'vs pread':>9}")
        _print(results, next(iter(results)))
    transports = [t for t in args.e2e.split(",") if t]
    if not transports:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            os.mkdir(os.path.join(tmp, "root"))
            path = os.path.join(tmp, "root", "dax-bench")
            with open(path, "wb") as f:
                for _ in range(size // MiB):
                    f.write(os.urandom(MiB))
        rnd = random.Random(42)
        offsets = [rnd.randrange(size // BLOCK) * BLOCK for _ in range(args.reads)]
        print(
            f"\nEnd to end: our client, 4 KiB random reads of a {args.size_mib} MiB file "
            f"through a {args.size_mib} MiB DAX window vs FUSE_READ (same client, front-end, "
            f"back-end), {args.runs} runs, {pin} (FUSE_READ timed on a tenth of the reads)"
        )
        print(f"{'reader':44} {'reads/s median [min-max]':>34} {'vs READ':>9}")
        for transport in transports:
            res = run_e2e(transport, path, size, offsets, args.runs)
            names = list(res)
            _print(res, names[1])


if __name__ == "__main__":
    main()
