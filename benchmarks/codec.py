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

Two more references are printed for decode, next to the floor (the ratio to the floor stays
the headline):

- *checked*: the floor plus what any hand-written decoder of peer bytes must also do and the
  floor leaves out because it knows the message in advance: dispatch on ``in_header.opcode``
  (a dict of per-opcode functions), ``len`` against the bytes received, ``total_extlen``, the
  LOOKUP name's NUL, WRITE's ``size`` against the data (SECURITY.md: hostile input is refused,
  never misread).  Still plain tuples;
- *typed*: the floor plus the InHeader/argument/Request NamedTuples the API returns, built with
  ``tuple.__new__`` (the cheapest way CPython has); no dispatch, no checks.

And ``decoder_for()`` on a memoryview: the call the session's hot loop makes.

Every timed callable is one call from timeit's loop (``fn(msg)`` is compiled into the loop),
so ours and the floors have the same call depth (a closure around ``decode_request`` would
add a frame to ours only).
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
    decoder_for,
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


def _checked_floor() -> Callable[[bytes], Any]:
    """A hand-written decoder of peer bytes into plain tuples (see the module docstring)."""
    hdr_u, ga_u, rw_u = HDR.unpack_from, GETATTR_IN.unpack_from, RW_IN.unpack_from
    mv = memoryview

    def getattr_(buf: bytes, h: tuple[int, ...]) -> Any:
        if h[0] != 56 or h[7]:
            raise ValueError("bad GETATTR")
        return h, ga_u(buf, 40)

    def lookup(buf: bytes, h: tuple[int, ...]) -> Any:
        n = h[0]
        if h[7] or n < 41 or n > len(buf) or buf[n - 1]:
            raise ValueError("bad LOOKUP")
        name = buf[40:n - 1]
        if 0 in name:
            raise ValueError("bad LOOKUP name")
        return h, name

    def read(buf: bytes, h: tuple[int, ...]) -> Any:
        if h[0] != 80 or h[7]:
            raise ValueError("bad READ")
        return h, rw_u(buf, 40)

    def write(buf: bytes, h: tuple[int, ...]) -> Any:
        n = h[0]
        if h[7] or n < 80 or n > len(buf):
            raise ValueError("bad WRITE")
        a = rw_u(buf, 40)
        if a[2] != n - 80:
            raise ValueError("bad WRITE size")
        return h, a, mv(buf)[80:n]

    table = {int(Opcode.GETATTR): getattr_, int(Opcode.LOOKUP): lookup,
             int(Opcode.READ): read, int(Opcode.WRITE): write}

    def decode(buf: bytes) -> Any:
        h = hdr_u(buf)
        return table[h[1]](buf, h)

    return decode


def _call(fn: Callable[..., Any], *args: Any) -> timeit.Timer:
    """A CPU-time timer of ``fn(*args)`` compiled into timeit's loop: one call per iteration."""
    names = ", ".join(f"a{i}" for i in range(len(args)))
    namespace = {"fn": fn, **{f"a{i}": a for i, a in enumerate(args)}}
    # CPU time of this thread, not wall time: on a shared 2-vCPU machine the wall clock also
    # counts the time other tenants held the CPU.
    return timeit.Timer(f"fn({names})", globals=namespace, timer=time.thread_time)


def _ours(msgs: dict[str, bytes]) -> dict[str, tuple[timeit.Timer, timeit.Timer, timeit.Timer]]:
    """Timers of decode_request(msg), encode_reply_parts(spec, 2, result) and
    decoder_for()(memoryview(msg))."""
    results: dict[str, Any] = {
        "GETATTR": S.AttrOut(1, 0, 0, ATTR_VALUES),
        "LOOKUP": S.EntryOut(5, 0, 1, 1, 0, 0, ATTR_VALUES),
        "READ": bytes(4096),
        "WRITE": S.WriteOut(4096),
    }
    session_decode = decoder_for()
    out = {}
    for name, msg in msgs.items():
        spec = OPCODES[Opcode[name]]
        out[name] = (_call(decode_request, msg), _call(encode_reply_parts, spec, 2, results[name]),
                     _call(session_decode, memoryview(msg)))
    return out


def _best(timers: list[timeit.Timer], number: int, repeat: int) -> list[float]:
    """Best per-call ns of each, timed in alternation so machine noise hits all alike."""
    best = [float("inf")] * len(timers)
    for _ in range(repeat):
        for i, t in enumerate(timers):
            best[i] = min(best[i], t.timeit(number=number))
    return [b / number * 1e9 for b in best]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings (best is kept)")
    args = parser.parse_args(argv)
    msgs = _messages()
    floors, typed, checked, ours = _floors(msgs), _typed_floors(msgs), _checked_floor(), _ours(msgs)
    # Sanity: every path sees the same message.
    for name, msg in msgs.items():
        req = decode_request(msg)
        assert tuple(req.header) == HDR.unpack_from(msg) == checked(msg)[0], name
        assert decoder_for()(memoryview(msg)) == req == typed[name](), name
    print(f"python {sys.version.split()[0]}; best of {args.repeat} x {args.number} calls, "
          "CPU time; ns per call")
    print(f"{'op':8} {'dir':6} {'floor':>6} {'ours':>6} {'ratio':>6} {'ours/s':>10} "
          f"{'checked':>7} {'ours/chk':>8} {'typed':>6} {'ours/typ':>8} {'decoder_for(mv)':>15}")
    worst = 0.0
    for name, msg in msgs.items():
        dec, enc, session = ours[name]
        f_dec, f_enc = (_call(f) for f in floors[name])
        floor, mine, chk, typ, sess = _best(
            [f_dec, dec, _call(checked, msg), _call(typed[name]), session],
            args.number, args.repeat)
        worst = max(worst, mine / floor)
        print(f"{name:8} decode {floor:6.0f} {mine:6.0f} {mine / floor:5.2f}x {1e9 / mine:10,.0f} "
              f"{chk:7.0f} {mine / chk:7.2f}x {typ:6.0f} {mine / typ:7.2f}x {sess:15.0f}")
        floor, mine = _best([f_enc, enc], args.number, args.repeat)
        worst = max(worst, mine / floor)
        print(f"{name:8} encode {floor:6.0f} {mine:6.0f} {mine / floor:5.2f}x {1e9 / mine:10,.0f}")
    print(f"worst ratio to the floor {worst:.2f}x (target <= 2x); checked = floor + dispatch "
          "and the checks peer bytes need; typed = floor + the NamedTuples the API returns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
