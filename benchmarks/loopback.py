#!/usr/bin/env python3
"""Loopback transport figures: a FUSE client and a server in two processes, sharing a memfd.

Measured in one run, each as median [min-max] over ``--runs`` runs:

- GETATTR round trips/s through the loopback queues (``Client(cache="none").stat("/")``: one
  GETATTR each), server process serving MemoryFS;
- the same GETATTR through ``SessionChannel`` (client + session in one process, no transport):
  the protocol's own cost;
- the floor of any eventfd transport between two Python processes: a bare kick/call eventfd
  ping-pong (no ring, no FUSE);
- 1 MiB READ through the loopback queues: the reply lands in the driver's buffer in guest
  memory (``channel``: nothing copied in Python after that) and then into a caller's buffer
  (``readinto``: one memcpy), against a plain 1 MiB memcpy in this process.

FACTS.md: on these 2-vCPU machines a cross-vCPU wake-up costs ~50 µs, so the primary mode pins
both processes to CPU 0 (``--pin 0``, the default); ``--pin none`` gives the unpinned figures.

    python3 benchmarks/loopback.py [--runs 5] [--pin 0|none] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from virtiofs.client import Client, SessionChannel  # noqa: E402
from virtiofs.client.queue_channel import QueueChannel  # noqa: E402
from virtiofs.protocol import Opcode  # noqa: E402
from virtiofs.protocol.structs import GetattrIn, ReadIn  # noqa: E402
from virtiofs.server.memfs import MemoryFS  # noqa: E402
from virtiofs.server.session import Session  # noqa: E402
from virtiofs.transport.loopback import LoopbackDriver, spawn_server  # noqa: E402

MIB = 1 << 20

PINGPONG_CHILD = """
import os, sys
kick, call = int(sys.argv[1]), int(sys.argv[2])
while True:
    v = os.eventfd_read(kick)
    if v > 1000:
        break
    os.eventfd_write(call, 1)
"""


def rate(fn: Callable[[], None], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(50):
        fn()
    n = 0
    batch = 100
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(batch):
            fn()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - t0)


def pingpong(seconds: float, pin: str | None) -> float:
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    cmd = [sys.executable, "-c", PINGPONG_CHILD, str(kick), str(call)]
    if pin is not None:
        cmd = ["taskset", "-c", pin, *cmd]
    proc = subprocess.Popen(cmd, pass_fds=[kick, call])
    try:
        def once() -> None:
            os.eventfd_write(kick, 1)
            os.eventfd_read(call)
        return rate(once, seconds)
    finally:
        os.eventfd_write(kick, 10_000)
        proc.wait(10)
        os.close(kick)
        os.close(call)


def session_getattr(seconds: float) -> float:
    c = Client(SessionChannel(Session(MemoryFS())), cache="none")
    try:
        return rate(lambda: c.stat("/") and None, seconds)
    finally:
        c.close()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat fields 14-15, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loopback(seconds: float, pin: str | None,
             threads: int) -> tuple[float, float, float, float, float, float]:
    """(GETATTR/s, client CPU µs/GETATTR, server CPU µs/GETATTR, GETATTR/s with ``threads``
    client threads, 1 MiB READ into the driver buffer GB/s, 1 MiB readinto GB/s)."""
    driver = LoopbackDriver.create(memory_size=64 * MIB)
    try:
        with spawn_server(driver, ["--memfs"], taskset=pin) as proc:
            c = Client(QueueChannel.for_driver(driver), cache="none", timeout=30)
            try:
                for _ in range(200):
                    c.stat("/")
                n = 0
                c0, s0, t0 = time.process_time(), _cpu_seconds(proc.pid), time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    for _ in range(100):
                        c.stat("/")
                    n += 100
                el = time.perf_counter() - t0
                client_cpu = (time.process_time() - c0) / n * 1e6
                server_cpu = (_cpu_seconds(proc.pid) - s0) / n * 1e6
                getattr_rate = n / el
                multi = threaded(c, threads, seconds)
                batch = in_flight(c, 16, seconds)
                with c.open("/big", "w") as f:
                    f.write(os.urandom(MIB))
                f = c.open("/big", "r")
                arg = ReadIn(f.fh, 0, MIB)
                nodeid = f.nodeid

                def read_channel() -> None:
                    with c._transact(Opcode.READ, nodeid, arg, extra=MIB) as rb:
                        if len(rb.view) != 16 + MIB:
                            raise RuntimeError(f"short READ: {len(rb.view)}")
                buf = bytearray(MIB)

                def read_into() -> None:
                    if f.pread_into(buf, 0) != MIB:
                        raise RuntimeError("short readinto")
                chan = rate(read_channel, seconds) * MIB / 1e9
                into = rate(read_into, seconds) * MIB / 1e9
                f.close()
            finally:
                c.close()
    finally:
        driver.close()
    return getattr_rate, client_cpu, server_cpu, multi, batch, chan, into


def in_flight(c: Client, depth: int, seconds: float) -> float:
    """GETATTR/s with ``depth`` requests in flight from one thread (``request_many``)."""
    plan = c._plan(Opcode.GETATTR)
    arg = GetattrIn()

    def batch() -> None:
        reqs = [(plan.encode(next(c._unique), 1, arg, (), b"", 0, 0, c.pid), plan.reply_size)
                for _ in range(depth)]
        for rb in c.channel.request_many(reqs, timeout=30):
            if isinstance(rb, Exception):
                raise rb
            err, _attr = plan.decode(rb.view)
            rb.release()
            if err:
                raise OSError(err, "GETATTR")
    return rate(batch, seconds) * depth


def threaded(c: Client, threads: int, seconds: float) -> float:
    """GETATTR/s with ``threads`` threads sharing the client (requests in flight at once)."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def run(k: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            for _ in range(20):
                c.stat("/")
            n += 20
        counts[k] = n
    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def memcpy(seconds: float) -> float:
    src = bytes(os.urandom(MIB))
    dst = bytearray(MIB)

    def once() -> None:
        dst[:] = src
    return rate(once, seconds) * MIB / 1e9


def calibration() -> float:
    """Microseconds of a fixed pure-Python loop: how loaded the machine is right now."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(200):
            sum(range(1000))
        best = min(best, (time.perf_counter() - t) / 200 * 1e6)
    return best


def summary(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    p.add_argument("--pin", default="0", help="CPU for both processes, or 'none'")
    p.add_argument("--threads", type=int, default=8, help="client threads for the "
                   "requests-in-flight figure")
    args = p.parse_args()
    pin = None if args.pin == "none" else args.pin
    if pin is not None:
        os.sched_setaffinity(0, {int(pin)})
    res: dict[str, list[float]] = {k: [] for k in (
        "pingpong", "session", "getattr", "ccpu", "scpu", "multi", "batch", "read_chan",
        "read_into", "memcpy", "calib")}
    for _ in range(args.runs):
        res["calib"].append(calibration())
        res["pingpong"].append(pingpong(args.seconds, pin))
        res["session"].append(session_getattr(args.seconds))
        g, cc, sc, mt, bt, rc, ri = loopback(args.seconds, pin, args.threads)
        res["batch"].append(bt)
        res["getattr"].append(g)
        res["ccpu"].append(cc)
        res["scpu"].append(sc)
        res["multi"].append(mt)
        res["read_chan"].append(rc)
        res["read_into"].append(ri)
        res["memcpy"].append(memcpy(args.seconds))
    mode = f"pinned to CPU {pin}" if pin is not None else "unpinned"
    print(f"loopback benchmark, {mode}, {args.runs} runs (median [min-max])")
    print(f"  eventfd ping-pong, 2 processes     {summary(res['pingpong'], ',.0f')} round trips/s")
    print(f"  GETATTR via SessionChannel (1 proc){summary(res['session'], ',.0f'):>28} /s")
    print(f"  GETATTR via loopback, 2 processes  {summary(res['getattr'], ',.0f')} /s "
          f"(target >= 30,000)")
    ratio = [g / p for g, p in zip(res["getattr"], res["pingpong"], strict=True)]
    print(f"    = {summary(ratio, '.2f')} x the bare eventfd ping-pong")
    print(f"    CPU per GETATTR: client {summary(res['ccpu'], '.1f')} us, server "
          f"{summary(res['scpu'], '.1f')} us")
    print(f"  GETATTR via loopback, {args.threads} threads  {summary(res['multi'], ',.0f')} /s")
    print(f"  GETATTR via loopback, 16 in flight {summary(res['batch'], ',.0f')} /s "
          "(one thread, request_many)")
    print(f"  machine speed: sum(range(1000)) takes {summary(res['calib'], '.1f')} us "
          "(grows with the load of other processes: compare runs by it)")
    print(f"  1 MiB READ into the driver buffer  {summary(res['read_chan'], '.2f')} GB/s "
          f"(target >= 1)")
    print(f"  1 MiB READ + readinto user buffer  {summary(res['read_into'], '.2f')} GB/s")
    print(f"  plain 1 MiB memcpy (this process)  {summary(res['memcpy'], '.2f')} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
