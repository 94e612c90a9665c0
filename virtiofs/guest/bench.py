"""Time virtio-fs workloads inside the guest (``scripts/bench.sh``).

The guest clocks each workload itself (``/proc/timer_list``, nanoseconds, no fork), so the
figures exclude boot and QEMU start. They are bound by the emulated CPU under TCG: compare
back-ends in the same run only, as ratios (FACTS.md). ``benchmarks/guest_common.py`` prints
them for QEMU's C virtiofsd; the benchmark of our own back-end reuses :func:`measure_guest`
with another socket.
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

from .qemu import GuestError, GuestResult, GuestRunner, LineCallback
from .suite import guest_script

__all__ = ["WORKLOADS", "GuestBenchResult", "measure_guest", "parse_bench_output"]

#: name -> (unit of the rate, description).
WORKLOADS: dict[str, tuple[str, str]] = {
    "seq_write": ("MiB/s", "dd 1 MiB blocks from /dev/zero, conv=fsync"),
    "seq_read": ("MiB/s", "dd 1 MiB blocks after drop_caches"),
    "create": ("files/s", "': >f' in an ash loop (LOOKUP+CREATE+FLUSH+RELEASE)"),
    "stat_cold": ("files/s", "'[ -e f ]' after drop_caches (LOOKUP)"),
    "lookup_miss": ("files/s", "'[ -e missing ]' (negative LOOKUP)"),
    "ls_l_cold": ("entries/s", "ls -l of the directory after drop_caches"),
    "rm_r": ("files/s", "rm -r of the directory (READDIR+UNLINK)"),
}

_LINE = re.compile(r"BENCH (\d+) (\w+) (\d+\.\d+) (\d+) (\S+)")


@dataclass
class GuestBenchResult:
    """Rates per workload, one value per round, plus the guest run itself."""

    guest: GuestResult
    rates: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """Median rate of a workload over the rounds."""
        return statistics.median(self.rates[name])

    def table(self, label: str = "") -> str:
        """Figures as ``name  median [min–max] unit`` lines."""
        head = f"{label}: " if label else ""
        lines = [
            f"{head}boot {self.guest.boot_time or 0:.2f}s, workloads {self.guest.script_time or 0:.1f}s"
        ]
        for name, (unit, _) in WORKLOADS.items():
            values = self.rates.get(name)
            if values:
                lines.append(
                    f"  {name:12s} {statistics.median(values):>10,.1f} "
                    f"[{min(values):,.1f}–{max(values):,.1f}] {unit}"
                )
        return "\n".join(lines)


def parse_bench_output(lines: list[str]) -> dict[str, list[float]]:
    """Rates (count / seconds) per workload from ``BENCH`` lines, in round order."""
    rates: dict[str, list[float]] = {}
    for line in lines:
        m = _LINE.fullmatch(line.strip())
        if m is None:
            continue
        _, name, seconds, count, _unit = m.groups()
        secs = float(seconds)
        rates.setdefault(name, []).append(int(count) / secs if secs > 0 else float("inf"))
    return rates


def measure_guest(
    socket_path: str | os.PathLike[str],
    *,
    runner: GuestRunner | None = None,
    tag: str = "myfs",
    mib: int = 64,
    files: int = 2000,
    repeat: int = 3,
    device_options: Mapping[str, object] | None = None,
    timeout: float = 300.0,
    on_line: LineCallback | None = None,
) -> GuestBenchResult:
    """Boot a guest against ``socket_path`` and time the workloads ``repeat`` times.

    Raises :class:`GuestError` when the script does not finish with ``OK bench``.
    """
    env = {"BENCH_MIB": str(mib), "BENCH_FILES": str(files), "BENCH_REPEAT": str(repeat)}
    guest = (runner or GuestRunner()).run(
        guest_script("bench.sh"),
        socket_path,
        tag=tag,
        device_options=device_options,
        env=env,
        timeout=timeout,
        on_line=on_line,
    )
    if not guest.ok or "OK bench" not in guest.output_lines:
        raise GuestError("guest benchmark failed: " + guest.describe())
    return GuestBenchResult(guest, parse_bench_output(guest.output_lines))
