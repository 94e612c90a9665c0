"""``virtiofs probe``: check a vhost-user-fs back-end the way a guest would use it.

Connects through our vhost-user front-end (QEMU 7.2's handshake), mounts the share with our
FUSE client (the Linux kernel's INIT), runs the conformance suite of
:mod:`virtiofs.client.conformance` inside a scratch directory it removes afterwards, checks that
the back-end stops cleanly (GET_VRING_BASE reports every chain we made available), and prints a
pass/fail table. Exit status 0 only when every applicable check passed; a check that does not
apply (a feature the back-end did not offer) is listed as "skip". Each failure says what was
expected and what came back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

HELP = "Run a conformance suite against any vhost-user-fs backend"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket-path", required=True, help="the back-end's vhost-user socket")
    parser.add_argument("--tag", help="expected virtio-fs tag (needs the CONFIG feature)")
    parser.add_argument("--cache", choices=("none", "auto", "always"), default="auto",
                        help="client cache mode (default: auto, like a default mount)")
    parser.add_argument("--packed", action="store_true", help="ask for packed virtqueues")
    parser.add_argument("--queue-size", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds before a request is interrupted (default 30)")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--only", action="append", metavar="CHECK",
                        help="run only this check (repeatable); see --list")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")


def _rmtree(client: object, path: str) -> None:
    from virtiofs.client import Client
    assert isinstance(client, Client)
    for entry in client.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmtree(client, entry.path)  # type: ignore[arg-type]
        else:
            client.unlink(entry.path)
    client.rmdir(path)


def _table(rows: list[tuple[str, str, str]], out: TextIO) -> None:
    width = max((len(r[0]) for r in rows), default=10)
    for name, status, detail in rows:
        mark = {"pass": "PASS", "skip": "skip", "fail": "FAIL", "error": "ERROR"}[status]
        line = f"  {name:<{width}}  {mark:<5}  {detail}"
        print(line.rstrip(), file=out)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from virtiofs.client import Client
    from virtiofs.client.conformance import CHECKS, Result, run_check
    from virtiofs.client.queue_channel import QueueChannel
    from virtiofs.errors import ProtocolError
    from virtiofs.transport.vhost_user.frontend import Frontend
    from virtiofs.transport.vhost_user.messages import ProtocolFeature, features_str

    if args.list:
        for name in CHECKS:
            print(name, file=out)
        return 0
    names = args.only or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"virtiofs probe: unknown check(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str]] = []
    try:
        fe = Frontend.connect(args.socket_path, connect_timeout=args.connect_timeout,
                              tag=args.tag, packed=args.packed, queue_size=args.queue_size)
    except (OSError, ProtocolError, TimeoutError) as e:
        print(f"virtiofs probe: cannot set up the device at {args.socket_path}: {e}", file=out)
        return 1
    results: list[Result] = []
    try:
        print(f"back-end {args.socket_path}", file=out)
        print(f"  virtio features  {features_str(fe.offered_features)} offered, "
              f"{fe.acked_features:#x} acked", file=out)
        print(f"  protocol features {features_str(fe.offered_protocol_features, ProtocolFeature)}",
              file=out)
        rows.append(("vhost_user_handshake", "pass", f"{len(fe.log)} messages, "
                     f"{fe.backend_queue_num or 2} queues"))
        if args.tag:
            rows.append(("config_tag", "pass", f"tag {fe.config_tag!r}"))
        try:
            client = Client(QueueChannel.for_driver(fe), cache=args.cache, timeout=args.timeout)
        except (OSError, ProtocolError, TimeoutError) as e:
            rows.append(("fuse_init", "fail", str(e)))
            _table(rows, out)
            return 1
        conn = client.conn
        rows.append(("fuse_init", "pass", f"FUSE {conn.major}.{conn.minor}, max_write "
                     f"{conn.max_write}, max_pages {conn.max_pages}"))
        print(f"  FUSE {conn.major}.{conn.minor} flags {conn.flags!r}", file=out)
        base = f"/virtiofs-probe-{os.getpid()}-{int(time.time())}"
        try:
            client.mkdir(base)
        except OSError as e:
            rows.append(("scratch_directory", "fail",
                         f"mkdir {base}: expected success, got {e}"))
            _table(rows, out)
            return 1
        for name in names:
            r = run_check(client, name, base)
            results.append(r)
            rows.append((r.name, r.status, r.detail))
        if not args.keep:
            try:
                _rmtree(client, base)
            except (OSError, ProtocolError) as e:
                rows.append(("cleanup", "fail", f"removing {base}: {e}"))
        try:
            client.close()
        except (OSError, ProtocolError) as e:
            rows.append(("destroy", "fail", f"DESTROY: expected a reply, got {e}"))
        want = fe.expected_vring_bases()
        try:
            got = fe.stop()
        except (OSError, ProtocolError, TimeoutError) as e:
            rows.append(("stop_rings", "fail", f"GET_VRING_BASE: {e}"))
        else:
            if [g & 0xFFFF for g in got] == [w & 0xFFFF for w in want]:
                rows.append(("stop_rings", "pass", f"GET_VRING_BASE {got}"))
            else:
                rows.append(("stop_rings", "fail", f"GET_VRING_BASE: expected the next "
                             f"available indexes {want}, got {got}"))
    finally:
        fe.close()
    _table(rows, out)
    failed = [r for r in rows if r[1] in ("fail", "error")]
    passed = sum(1 for r in rows if r[1] == "pass")
    skipped = sum(1 for r in rows if r[1] == "skip")
    print(f"{passed} passed, {len(failed)} failed, {skipped} not applicable", file=out)
    return 1 if failed else 0
