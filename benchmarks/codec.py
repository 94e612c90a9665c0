"""Codec fast-path benchmark: ``decode_request`` and ``encode_reply_parts`` against a floor.

For GETATTR, LOOKUP, READ and WRITE this times, in one run and one process:

- the *floor*: what a hand-written decoder/encoder must do at least — ``unpack_from`` of the
  in_header and of the op's arguments into plain tuples (plus slicing the name or the data),
  and ``pack`` of out_header + reply struct from a flat tuple;
- ``virtiofs.protocol.decode_request`` (typed ``Request`` with ``InHeader``/``GetattrIn`` …) and
  ``encode_reply_parts`` (from the typed reply struct).

It prints per-call nanoseconds, calls per second and the ratio to the floor (issue #2 targets:
ratio <= 2x, >= 500k GETATTR decodes/s).  Pin it for stable figures (FACTS.md):
``taskset -c 0 python benchmarks/codec.py``.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

from virtiofs.protocol import (
    OPCODES,
    Opcode,
    Request,
    decode_request,
    encode_reply_parts,
    encode_request,
)
from virtiofs.protocol import structs as S

HDR = struct.Struct("<IIQQIIIHH")
OUT = struct.Struct("<IiQ")
GETATTR_IN = struct.Struct("<IIQ")
RW_IN = struct.Struct("<QQIIQII")
ATTR = "QQQQQQIIIIIIIIII"
ATTR_OUT = struct.Struct("<QII" + ATTR)
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR)
WRITE_OUT = struct.Struct("<II")

ATTR_VALUES = S.Attr(ino=5, size=4096, blocks=8, atime=1, mtime=2, ctime=3, mode=0o100644,
                     nlink=1, uid=1000, gid=1000, blksize=4096)


def _messages() -> dict[str, bytes]:
    return {
        "GETATTR": encode_request(Opcode.GETATTR, 2, 5, S.GetattrIn(1, 0, 7)),
        "LOOKUP": encode_request(Opcode.LOOKUP, 4, 1, names=[b"some-file-name.txt"]),
        "READ": encode_request(Opcode.READ, 6, 5, S.ReadIn(7, 8192, 4096, 0, 0, 0o100000)),
        "WRITE": encode_request(Opcode.WRITE, 8, 5, S.WriteIn(7, 0, 4096, 0, 0, 0o100001),
                                data=bytes(4096)),
    }


def _floors(msgs: dict[str, bytes]) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    hdr_u, oh_p = HDR.unpack_from, OUT.pack
    ga_u, rw_u = GETATTR_IN.unpack_from, RW_IN.unpack_from
    attr_flat = (1, 0, 0, *ATTR_VALUES)
    entry_flat = (5, 0, 1, 1, 0, 0, *ATTR_VALUES)
    data = bytes(4096)
    g, lk, rd, wr = (msgs[k] for k in ("GETATTR", "LOOKUP", "READ", "WRITE"))
    ao_p, eo_p, wo_p = ATTR_OUT.pack, ENTRY_OUT.pack, WRITE_OUT.pack

    def dec_getattr() -> Any:
        return hdr_u(g), ga_u(g, 40)

    def dec_lookup() -> Any:
        h = hdr_u(lk)
        return h, lk[40:h[0] - 1]

    def dec_read() -> Any:
        return hdr_u(rd), rw_u(rd, 40)

    def dec_write() -> Any:
        h = hdr_u(wr)
        return h, rw_u(wr, 40), memoryview(wr)[80:h[0]]

    def enc_getattr() -> Any:
        return [oh_p(120, 0, 2), ao_p(*attr_flat)]

    def enc_lookup() -> Any:
        return [oh_p(144, 0, 4), eo_p(*entry_flat)]

    def enc_read() -> Any:
        return [oh_p(16 + len(data), 0, 6), data]

    def enc_write() -> Any:
        return [oh_p(24, 0, 8), wo_p(4096, 0)]

    return {"GETATTR": (dec_getattr, enc_getattr), "LOOKUP": (dec_lookup, enc_lookup),
            "READ": (dec_read, enc_read), "WRITE": (dec_write, enc_write)}


def _typed_floors(msgs: dict[str, bytes]) -> dict[str, Callable[[], Any]]:
    """The floor plus what the typed API must do: the InHeader/arg NamedTuples and the
    Request, built with ``tuple.__new__`` (the cheapest way CPython has)."""
    hdr_u, ga_u, rw_u = HDR.unpack_from, GETATTR_IN.unpack_from, RW_IN.unpack_from
    new, req, ih = tuple.__new__, Request, S.InHeader
    g, lk, rd, wr = (msgs[k] for k in ("GETATTR", "LOOKUP", "READ", "WRITE"))
    specs = {k: OPCODES[Opcode[k]] for k in msgs}
    empty = memoryview(b"")

    def getattr_() -> Any:
        return new(req, (new(ih, hdr_u(g)), specs["GETATTR"], new(S.GetattrIn, ga_u(g, 40)),
                         (), empty, (), ()))

    def lookup() -> Any:
        h = hdr_u(lk)
        return new(req, (new(ih, h), specs["LOOKUP"], None, (lk[40:h[0] - 1],), empty, (), ()))

    def read() -> Any:
        return new(req, (new(ih, hdr_u(rd)), specs["READ"], new(S.ReadIn, rw_u(rd, 40)),
                         (), empty, (), ()))

    def write() -> Any:
        h = hdr_u(wr)
        return new(req, (new(ih, h), specs["WRITE"], new(S.WriteIn, rw_u(wr, 40)), (),
                         memoryview(wr)[80:h[0]], (), ()))

    return {"GETATTR": getattr_, "LOOKUP": lookup, "READ": read, "WRITE": write}


def _ours(msgs: dict[str, bytes]) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    results: dict[str, Any] = {
        "GETATTR": S.AttrOut(1, 0, 0, ATTR_VALUES),
        "LOOKUP": S.EntryOut(5, 0, 1, 1, 0, 0, ATTR_VALUES),
        "READ": bytes(4096),
        "WRITE": S.WriteOut(4096),
    }
    out = {}
    for name, msg in msgs.items():
        spec = OPCODES[Opcode[name]]
        result = results[name]

        def dec(msg: bytes = msg) -> Any:
            return decode_request(msg)

        def enc(spec: Any = spec, result: Any = result) -> Any:
            return encode_reply_parts(spec, 2, result)

        out[name] = (dec, enc)
    return out


def _best_pair(floor: Callable[[], Any], ours: Callable[[], Any], number: int,
               repeat: int) -> tuple[float, float]:
    """Best per-call ns of each, timed in alternation so machine noise hits both alike."""
    best_floor = best_ours = float("inf")
    # CPU time of this thread, not wall time: on a shared 2-vCPU machine the wall clock also
    # counts the time other tenants held the CPU.
    t_floor = timeit.Timer(floor, timer=time.thread_time)
    t_ours = timeit.Timer(ours, timer=time.thread_time)
    for _ in range(repeat):
        best_floor = min(best_floor, t_floor.timeit(number=number))
        best_ours = min(best_ours, t_ours.timeit(number=number))
    return best_floor / number * 1e9, best_ours / number * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings (best is kept)")
    args = parser.parse_args(argv)
    msgs = _messages()
    floors, ours = _floors(msgs), _ours(msgs)
    # Sanity: both paths see the same message.
    for name, msg in msgs.items():
        req = decode_request(msg)
        assert tuple(req.header) == HDR.unpack_from(msg), name
    print(f"python {sys.version.split()[0]}; best of {args.repeat} x {args.number} calls")
    typed = _typed_floors(msgs)
    print(f"{'op':8} {'dir':6} {'floor ns':>9} {'ours ns':>8} {'ratio':>6} {'ours/s':>11} "
          f"{'typed-floor ns':>15} {'ours/typed':>10}")
    worst = 0.0
    for name in msgs:
        for i, direction in enumerate(("decode", "encode")):
            floor, mine = _best_pair(floors[name][i], ours[name][i], args.number, args.repeat)
            ratio = mine / floor
            worst = max(worst, ratio)
            extra = ""
            if direction == "decode":
                t_floor, _ = _best_pair(typed[name], ours[name][i], args.number, args.repeat)
                extra = f" {t_floor:15.0f} {mine / t_floor:9.2f}x"
            print(f"{name:8} {direction:6} {floor:9.0f} {mine:8.0f} {ratio:5.2f}x "
                  f"{1e9 / mine:11,.0f}{extra}")
    print(f"worst ratio {worst:.2f}x (target <= 2x); typed-floor = floor + the InHeader, "
          "argument and Request NamedTuples the API returns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
