"""``virtiofs demo``: a Linux guest mounts a host directory served by this package, in one command.

On a fresh machine it installs QEMU from Debian (apt, once) and downloads the guest kernel
(cached under ~/.cache/virtiofs/guest), serves a directory with our vhost-user back-end
(PassthroughFS, in this process), boots a QEMU TCG guest that mounts it with
``mount -t virtiofs``, lists it, reads a file, writes one, and shows that write on the host.
Everything goes through the guest harness the tests use (``virtiofs.guest``). Ctrl-C ends it
cleanly: QEMU is killed by PID, the back-end stops, the socket and a temporary directory go.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HELP = "Boot a Linux guest that mounts a directory served by virtiofs"

GUEST_SCRIPT = r"""
step() { echo "guest\$ $*"; }
step mount -t virtiofs "$VIRTIOFS_TAG" /mnt
mount -t virtiofs "$VIRTIOFS_TAG" /mnt || exit 3
step ls -l /mnt
ls -l /mnt
step cat /mnt/hello.txt
cat /mnt/hello.txt
step "echo 'written by the guest' > /mnt/from-guest.txt"
echo "written by the guest at $(date -u +%H:%M:%S) (kernel $(uname -r))" > /mnt/from-guest.txt || exit 4
step "dd if=/dev/urandom of=/mnt/big.bin bs=1M count=4; sha256sum /mnt/big.bin"
dd if=/dev/urandom of=/mnt/big.bin bs=1M count=4 2>/dev/null && sync || exit 5
echo 3 > /proc/sys/vm/drop_caches
echo "sha256 $(sha256sum /mnt/big.bin | cut -c1-16)…"
step umount /mnt
umount /mnt || exit 6
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shared-dir", type=Path, default=None,
                        help="directory to serve (default: a fresh one with a few files)")
    parser.add_argument("--kernel", default="6.12", help="guest kernel series (6.12 or 6.1)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds the guest may take in all (default 180)")
    parser.add_argument("--cache", choices=("auto", "always", "none"), default="auto")


def _say(message: str) -> None:
    print(f"virtiofs demo: {message}", file=sys.stderr, flush=True)


def _populate(root: Path) -> None:
    (root / "hello.txt").write_text("Hello from the host! This file is served by virtiofs, "
                                    "a pure-Python vhost-user back-end.\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.md").write_text("- boot a guest\n- mount -t virtiofs\n")
    (root / "numbers.csv").write_text("".join(f"{i},{i * i}\n" for i in range(100)))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``virtiofs demo``."""
    from virtiofs.guest import GuestError, GuestRunner
    from virtiofs.guest.kernel import KernelFetchError
    from virtiofs.guest.tools import ensure_tools
    from virtiofs.server.passthrough import PassthroughFS
    from virtiofs.transport.vhost_user import make_backend

    if args.shared_dir is not None and not args.shared_dir.is_dir():
        print(f"virtiofs demo: error: {args.shared_dir} is not a directory", file=sys.stderr)
        return 2
    missing = ensure_tools(progress=_say)
    if missing:
        _say("cannot run without: " + "; ".join(missing))
        return 1
    runner = GuestRunner(args.kernel, progress=_say)
    work = Path(tempfile.mkdtemp(prefix="virtiofs-demo-"))
    backend = None
    try:
        try:
            kernel = runner.kernel  # downloads once, with progress messages
        except KernelFetchError as e:
            _say(f"cannot fetch the guest kernel: {e}")
            return 1
        shared = args.shared_dir
        if shared is None:
            shared = work / "shared"
            shared.mkdir()
            _populate(shared)
        shared = shared.resolve()
        sock = work / "vhost.sock"
        fs = PassthroughFS(shared, cache=args.cache, passthrough=False)
        backend = make_backend(fs, sock)
        backend.start()
        _say(f"serving {shared} on {sock}")
        _say(f"booting QEMU (TCG, kernel {kernel.release}); this takes a few seconds…")
        started = time.monotonic()
        booted = threading.Event()

        def ticker() -> None:
            # Progress while the guest boots (TCG: 5-15 s with no console output).
            while not booted.wait(5.0):
                _say(f"  … still booting ({time.monotonic() - started:.0f} s)")

        def on_line(phase: str, line: str) -> None:
            if phase == "script":
                if not booted.is_set():
                    booted.set()
                    _say(f"guest up after {time.monotonic() - started:.1f} s")
                print(("  " if not line.startswith("guest$") else "") + line, flush=True)

        threading.Thread(target=ticker, name="demo-ticker", daemon=True).start()
        try:
            result = runner.run(GUEST_SCRIPT, sock, timeout=args.timeout, on_line=on_line)
        finally:
            booted.set()
        if not result.ok:
            _say("the guest run failed:\n" + result.describe())
            return 1
        written = shared / "from-guest.txt"
        print(f"host$ cat {written}")
        print("  " + written.read_text().strip())
        big = shared / "big.bin"
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        print(f"host$ sha256sum {big}\n  sha256 {digest[:16]}… ({big.stat().st_size} bytes)")
        _say(f"done in {time.monotonic() - started:.1f} s "
             f"(the guest's files stay in {shared})" if args.shared_dir else
             f"done in {time.monotonic() - started:.1f} s")
        return 0
    except KeyboardInterrupt:
        _say("interrupted; QEMU stopped, back-end closed")
        return 130
    except GuestError as e:
        _say(str(e))
        return 1
    finally:
        if backend is not None:
            backend.close()
        shutil.rmtree(work, ignore_errors=True)
