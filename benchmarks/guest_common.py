"""In-guest virtio-fs workloads against QEMU's C virtiofsd (the reference back-end).

Boots a TCG guest ``--boots`` times (one fresh virtiofsd each, on a tmpfs or given directory),
runs ``virtiofs/guest/scripts/bench.sh`` (64 MiB sequential write/read with dd, 2,000 creates,
cold stats, lookup misses, ls -l, rm -r; ``--repeat`` rounds per boot) and prints
median [min–max] per workload over all rounds, plus boot time and the back-end's CPU time.

The figures are bound by the emulated guest CPU: they are only meaningful as same-run ratios
against another back-end. The benchmark of our own back-end calls :func:`run_backend` with its
own start function and prints both tables and the ratios.

    python benchmarks/guest_common.py [--boots 3] [--repeat 3] [--kernel 6.12] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from virtiofs.guest import (
    WORKLOADS,
    BackendProcess,
    GuestRunner,
    measure_guest,
    start_c_virtiofsd,
)

StartBackend = Callable[[Path, Path], BackendProcess]


def run_backend(
    start: StartBackend,
    shared: Path,
    *,
    runner: GuestRunner,
    boots: int = 3,
    repeat: int = 3,
    mib: int = 64,
    files: int = 2000,
    device_options: dict[str, object] | None = None,
) -> dict[str, list[float]]:
    """Rates per workload over every round of every boot, plus ``boot_s`` and ``backend_cpu_s``.

    ``start(shared_dir, socket_path)`` must return a listening :class:`BackendProcess`; a
    fresh one is started per boot and stopped by PID afterwards.
    """
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="virtiofs-bench-") as tmp:
        sock = Path(tmp) / "vhost.sock"
        for _ in range(boots):
            with start(shared, sock) as backend:
                result = measure_guest(
                    sock,
                    runner=runner,
                    mib=mib,
                    files=files,
                    repeat=repeat,
                    device_options=device_options,
                )
                # C virtiofsd exits when QEMU disconnects; its CPU time is then complete.
                backend.wait_exited(timeout=5.0)
                cpu = backend.cpu_seconds()
            for name, values in result.rates.items():
                figures.setdefault(name, []).extend(values)
            figures.setdefault("boot_s", []).append(result.guest.boot_time or 0.0)
            figures.setdefault("workloads_s", []).append(result.guest.script_time or 0.0)
            if cpu is not None:
                figures.setdefault("backend_cpu_s", []).append(cpu)
    return figures


def format_figures(label: str, figures: dict[str, list[float]]) -> str:
    """``name median [min–max] unit`` lines."""
    units = {name: unit for name, (unit, _) in WORKLOADS.items()}
    units.update(boot_s="s", workloads_s="s", backend_cpu_s="s CPU")
    lines = [f"== {label}"]
    for name, values in figures.items():
        lines.append(
            f"  {name:14s} {statistics.median(values):>10,.2f} "
            f"[{min(values):,.2f}–{max(values):,.2f}] {units.get(name, '')}  (n={len(values)})"
        )
    return "\n".join(lines)


def c_virtiofsd(shared: Path, sock: Path) -> BackendProcess:
    """QEMU's C virtiofsd, cache=auto (its default)."""
    return start_c_virtiofsd(shared, sock, cache="auto")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument(
        "--dir", type=Path, help="directory to export (default: a tmpfs-backed tmp dir)"
    )
    args = ap.parse_args(argv)
    runner = GuestRunner(args.kernel, progress=lambda m: print(m, file=sys.stderr))
    kernel = runner.kernel  # fetch before timing anything
    with tempfile.TemporaryDirectory(prefix="virtiofs-share-", dir="/dev/shm") as tmp:
        shared = args.dir or Path(tmp)
        figures = run_backend(
            c_virtiofsd,
            shared,
            runner=runner,
            boots=args.boots,
            repeat=args.repeat,
            mib=args.mib,
            files=args.files,
        )
    print(f"guest kernel {kernel.release}, QEMU TCG -smp 1, export {shared}")
    print(format_figures("C virtiofsd (QEMU 7.2), cache=auto", figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
