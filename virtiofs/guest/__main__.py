"""``python -m virtiofs.guest``: fetch the guest kernel, or run the file-operation suite.

    python -m virtiofs.guest kernel [--series 6.12] [--series 6.1]
    python -m virtiofs.guest fileops [--kernel 6.12] [--socket SOCK --dir DIR] [--quick]

Without ``--socket`` the suite runs against QEMU's C virtiofsd serving a temporary directory;
with it, against whatever back-end already listens on SOCK (``--dir`` is the directory it
exports, for the host-side checks).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .kernel import fetch_kernel
from .qemu import GuestRunner, start_c_virtiofsd
from .suite import FileOpsSuite


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    ap = argparse.ArgumentParser(prog="python -m virtiofs.guest", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernel", help="fetch and cache guest kernels")
    k.add_argument("--series", action="append", help="6.12 (default), 6.1 or a package name")
    f = sub.add_parser("fileops", help="run the file-operation suite in a guest")
    f.add_argument("--kernel", default="6.12")
    f.add_argument("--socket", type=Path, help="an already listening back-end")
    f.add_argument("--dir", type=Path, help="directory the back-end exports (host checks)")
    f.add_argument("--tag", default="myfs")
    f.add_argument("--quick", action="store_true", help="8 MiB file, 500 entries")
    f.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)

    if args.command == "kernel":
        for series in args.series or ["6.12"]:
            kernel = fetch_kernel(series, progress=_progress)
            print(f"{series}: {kernel.vmlinuz} (modules: {len(kernel.modules)})")
        return 0

    suite = FileOpsSuite(large_mib=8, many=500) if args.quick else FileOpsSuite()
    runner = GuestRunner(args.kernel, progress=_progress)
    _ = runner.kernel  # fetch (with progress) before the timed run

    def show(phase: str, line: str) -> None:
        if phase == "script":
            print(line, flush=True)

    if args.socket is not None:
        report = suite.run(
            args.socket, shared_dir=args.dir, runner=runner, tag=args.tag,
            timeout=args.timeout, on_line=show,
        )  # fmt: skip
    else:
        with tempfile.TemporaryDirectory(prefix="virtiofs-fileops-") as tmp:
            shared, sock = Path(tmp) / "shared", Path(tmp) / "vhost.sock"
            shared.mkdir()
            with start_c_virtiofsd(shared, sock):
                report = suite.run(
                    sock, shared_dir=shared, runner=runner, tag=args.tag,
                    timeout=args.timeout, on_line=show,
                )  # fmt: skip
    print(report.describe())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
