"""Shared machinery of the fuzz targets: atheris when present, a mutation fallback otherwise.

Every ``fuzz/fuzz_*.py`` module defines ``TARGET = Target(...)`` and ends with
``if __name__ == "__main__": main(TARGET)``.  Run one directly as any atheris/libFuzzer target::

    python fuzz/fuzz_request.py -max_total_time=60 CORPUS_DIR      # coverage-guided (atheris)
    python fuzz/fuzz_request.py crash-file                          # replay one input
    python fuzz/fuzz_request.py --no-atheris --seconds 10           # the fallback mutator

or all of them, time-boxed, through ``fuzz/run.py``.

The invariant (SECURITY.md B3 h11 row, STYLE.md point 5): a target may reject its input only
with the typed errors it declares (``ProtocolError`` and its family); any other exception, and
any violated property a target checks itself (``Finding``), is a *finding*.  Findings do not
stop the run: each distinct one (exception type + innermost ``virtiofs`` frame) is printed as a
``FINDING {json}`` line on stderr, its first input written to the artifact directory, and the
fuzzer goes on, so a bounded run reports all it found.  ``VIRTIOFS_FUZZ_RAISE=1`` re-raises
instead (to let libFuzzer minimise a crash).

Imports of the code under test must happen inside ``with instrumented():`` so atheris can add
coverage counters to it; nothing in this module imports ``virtiofs``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

try:  # atheris is the optional ``fuzz`` extra; the fallback mutator needs nothing.
    import atheris  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None

_NO_ATHERIS = "--no-atheris" in sys.argv or os.environ.get("VIRTIOFS_FUZZ_NO_ATHERIS") == "1"


class Finding(AssertionError):
    """A property a target checks itself did not hold (always a finding, never an allowed
    rejection)."""


def check(cond: object, what: str) -> None:
    """Raise ``Finding(what)`` unless ``cond``."""
    if not cond:
        raise Finding(what)


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Instrument ``virtiofs`` modules imported inside the block (coverage for atheris)."""
    if atheris is None or _NO_ATHERIS:
        yield
        return
    with atheris.instrument_imports(include=["virtiofs"]):
        yield


@dataclass
class Target:
    """One fuzz target.

    ``one_input(data)`` exercises the code; it may raise only ``allowed`` exceptions (they mean
    "input rejected") or nothing.  ``seeds()`` gives the initial corpus (valid messages and the
    golden vectors).  ``setup()`` runs once in the fuzzing process before the first input;
    ``teardown()`` at exit of the fallback driver (atheris exits from C, so targets must not
    rely on it for anything but tidiness).
    """

    name: str
    one_input: Callable[[bytes], None]
    seeds: Callable[[], Iterable[bytes]]
    allowed: tuple[type[BaseException], ...]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    max_len: int = 4096
    executions: int = 0
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)


def _signature(exc: BaseException) -> tuple[str, str]:
    """(signature, location) of an exception: its type and innermost frame inside virtiofs or
    the fuzz target (so one bug found through many inputs is reported once)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for fr in reversed(frames):
        if "/virtiofs/" in fr.filename or "/fuzz/" in fr.filename:
            where = f"{os.path.basename(fr.filename)}:{fr.lineno}:{fr.name}"
            break
    if not where and frames:
        fr = frames[-1]
        where = f"{os.path.basename(fr.filename)}:{fr.lineno}:{fr.name}"
    what = type(exc).__name__
    if isinstance(exc, Finding):
        # Self-checked properties: the message names the property; keep its stable prefix.
        what += ":" + str(exc).split(":")[0][:80]
    return f"{what}@{where}", where


def _artifact_dir() -> str:
    path = os.environ.get("VIRTIOFS_FUZZ_ARTIFACTS") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "fuzz",
        "artifacts")
    os.makedirs(path, exist_ok=True)
    return path


def _wrap(target: Target) -> Callable[[bytes], None]:
    raise_findings = os.environ.get("VIRTIOFS_FUZZ_RAISE") == "1"
    allowed = target.allowed
    one_input = target.one_input
    stats_path = os.environ.get("VIRTIOFS_FUZZ_STATS")
    last_stats = [time.monotonic()]

    def write_stats() -> None:
        if stats_path:
            tmp = stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"target": target.name, "executions": target.executions,
                           "findings": list(target.findings.values())}, f)
            os.replace(tmp, stats_path)

    def test_one_input(data: bytes) -> None:
        target.executions += 1
        now = time.monotonic()
        if now - last_stats[0] > 0.5:
            last_stats[0] = now
            write_stats()
        try:
            one_input(data)
        except allowed:
            return
        except Exception as exc:
            if raise_findings:
                raise
            sig, where = _signature(exc)
            found = target.findings.get(sig)
            if found is not None:
                found["count"] += 1
                return
            digest = hashlib.sha1(data).hexdigest()[:16]
            path = os.path.join(_artifact_dir(), f"finding-{target.name}-{digest}")
            with open(path, "wb") as f:
                f.write(data)
            record = {"target": target.name, "signature": sig, "where": where,
                      "message": str(exc)[:300], "input": path, "count": 1,
                      "traceback": "".join(traceback.format_exception(exc))[-3000:]}
            target.findings[sig] = record
            print("FINDING " + json.dumps({k: v for k, v in record.items()
                                           if k != "traceback"}), file=sys.stderr, flush=True)
            print(record["traceback"], file=sys.stderr, flush=True)
            write_stats()

    test_one_input.write_stats = write_stats  # type: ignore[attr-defined]
    return test_one_input


# -- the fallback mutator ---------------------------------------------------------------------

_INTERESTING_32 = (0, 1, 7, 8, 15, 16, 40, 255, 256, 4095, 4096, 0x7FFF, 0xFFFF, 0x10000,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


def mutate(rng: random.Random, data: bytes, corpus: list[bytes], max_len: int) -> bytes:
    """A few random byte-level mutations (bit flips, interesting integers, inserts, deletes,
    truncation, splicing): the libFuzzer mutation menu, minus coverage feedback."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2 and n >= 4:
            i = rng.randrange(n - 3)
            v = rng.choice(_INTERESTING_32 + (n, n - 1, n + 1, rng.getrandbits(32)))
            struct.pack_into("<I", buf, i, v & 0xFFFFFFFF)
        elif op == 3:
            i = rng.randrange(n + 1)
            buf[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        elif op == 4 and n:
            i = rng.randrange(n)
            del buf[i:i + rng.randint(1, 16)]
        elif op == 5 and n:
            del buf[rng.randrange(n):]
        elif op == 6 and corpus:
            other = rng.choice(corpus)
            if other:
                i = rng.randrange(len(other))
                j = rng.randrange(n + 1)
                buf[j:j] = other[i:i + rng.randint(1, 64)]
        elif op == 7 and n >= 2:
            i, j = sorted(rng.randrange(n) for _ in range(2))
            buf[j:j] = buf[i:j][:64]
        elif op == 8 and n >= 8:
            i = rng.randrange(n - 7)
            struct.pack_into("<Q", buf, i, rng.choice((0, 1 << 63, (1 << 64) - 1,
                                                        rng.getrandbits(64))))
    return bytes(buf[:max_len])


def _fallback(target: Target, run: Callable[[bytes], None], seconds: float,
              seed: int) -> None:
    rng = random.Random(seed)
    corpus = [s[:target.max_len] for s in target.seeds()] or [b""]
    for s in corpus:
        run(s)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            base = rng.choice(corpus)
            run(mutate(rng, base, corpus, target.max_len) if rng.random() < 0.95
                else rng.randbytes(rng.randint(0, 256)))


def _write_seeds(target: Target, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for s in target.seeds():
        name = hashlib.sha1(s).hexdigest()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(s)


def main(target: Target) -> None:
    """Command line of one target (see the module docstring).

    Own options (removed before libFuzzer sees argv): ``--no-atheris``, ``--seconds N``
    (fallback only; use ``-max_total_time`` with atheris), ``--seed N``,
    ``--write-seeds DIR`` (write the seed corpus and exit), ``--seeds-into DIR`` (write it, then
    fuzz with DIR as a corpus directory).
    """
    argv = list(sys.argv)
    seconds = 10.0
    seed = 0
    if "--write-seeds" in argv:
        _write_seeds(target, argv[argv.index("--write-seeds") + 1])
        return
    if "--seeds-into" in argv:
        # Write the seeds into DIR and fuzz with DIR as one of the corpus directories (one
        # process: the instrumentation is paid once).
        i = argv.index("--seeds-into")
        _write_seeds(target, argv[i + 1])
        del argv[i]
    if "--seconds" in argv:
        i = argv.index("--seconds")
        seconds = float(argv[i + 1])
        del argv[i:i + 2]
    if "--seed" in argv:
        i = argv.index("--seed")
        seed = int(argv[i + 1])
        del argv[i:i + 2]
    if "--no-atheris" in argv:
        argv.remove("--no-atheris")
    if os.environ.get("VIRTIOFS_FUZZ_LOG") != "1":
        # Servers log every refused request; at thousands per second that is the run's cost.
        logging.disable(logging.CRITICAL)
    if target.setup is not None:
        target.setup()
    run = _wrap(target)
    if atheris is None or _NO_ATHERIS:
        files = [a for a in argv[1:] if not a.startswith("-") and os.path.isfile(a)]
        start = time.monotonic()
        if files:
            for path in files:
                with open(path, "rb") as f:
                    run(f.read())
        else:
            _fallback(target, run, seconds, seed)
        elapsed = time.monotonic() - start
        run.write_stats()  # type: ignore[attr-defined]
        print(f"stat::number_of_executed_units: {target.executions}", file=sys.stderr)
        print(f"stat::elapsed_seconds: {elapsed:.1f}", file=sys.stderr)
        print(f"engine: fallback mutator (atheris {'missing' if atheris is None else 'off'})",
              file=sys.stderr)
        if target.teardown is not None:
            target.teardown()
        sys.exit(1 if target.findings else 0)
    if not any(a.startswith("-max_len") for a in argv):
        argv.append(f"-max_len={target.max_len}")
    atheris.Setup(argv, run)
    atheris.Fuzz()
