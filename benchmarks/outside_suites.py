#!/usr/bin/env python3
"""Outside suites on our mounts: Debian's ``stress-ng`` filesystem stressors with ``--verify``
and ``fio`` with ``verify=crc32c``, run on a plain directory, a /dev/fuse PassthroughFS mount of
a directory beside it, and a /dev/fuse MemoryFS mount, in the same run (issue #6, SECURITY.md
B4 "Others on this machine").

    python benchmarks/outside_suites.py [--stressors a,b,...] [--ops N] [--timeout S]
                                        [--targets plain,passthrough,memfs] [--no-fio]
                                        [--json FILE]

Prints a table: one row per stressor / fio job, one column per target, each cell PASS, FAIL,
SKIP (stress-ng said the stressor cannot run there: exit 3/4, "skipped") or DEAD (the server
process died or the mount stopped answering; it is restarted for the next row).  Failure
excerpts follow the table.  Exit status 0 when no cell of a mount is FAIL/DEAD where the same
row passes on the plain directory.

Each server is a separate ``python -m virtiofs mount`` process (``--allow-other``; PassthroughFS
with ``--xattr``), started in its own session and killed by PID at the end; mounts are detached
lazily whatever happens.  Every subprocess has a timeout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The issue's list first, then the rest of stress-ng 0.15's filesystem class that makes sense
# on a single directory (bind-mount, binderfs, fanotify, verity, procfs need other things).
ISSUE_STRESSORS = ["dir", "dentry", "rename", "link", "symlink", "chmod", "chown", "utime",
                   "xattr", "fallocate", "lockf", "flock", "hdd", "seek", "readahead",
                   "filename"]
MORE_STRESSORS = ["access", "chdir", "copy-file", "dirdeep", "dirmany", "fcntl", "fiemap",
                  "fpunch", "fsize", "fstat", "getdent", "iomix", "locka", "lockofd", "mknod",
                  "open", "sync-file", "touch", "lease", "inotify", "dnotify", "file-ioctl",
                  "handle"]
# Not run: "io" calls sync(2) for the whole machine (it measures the host, not the directory).
ALL_STRESSORS = ISSUE_STRESSORS + MORE_STRESSORS

# Sizes that keep a run short (stress-ng defaults write GiBs).
EXTRA_ARGS: dict[str, list[str]] = {
    "hdd": ["--hdd-bytes", "8M", "--hdd-write-size", "64K"],
    "fallocate": ["--fallocate-bytes", "8M"],
    "seek": ["--seek-size", "8M"],
    "readahead": ["--readahead-bytes", "8M"],
    "iomix": ["--iomix-bytes", "8M"],
    "fsize": [],
    "dirdeep": ["--dirdeep-dirs", "2", "--dirdeep-inodes", "2000"],
    "dirmany": ["--dirmany-bytes", "0"],
    "copy-file": ["--copy-file-bytes", "128M"],  # stress-ng's minimum
    "sync-file": ["--sync-file-bytes", "8M"],
    "fpunch": [],
}

# Stressors whose bogo op is itself a loop (link/symlink: thousands of links per op).
OPS_DIVISOR = {"link": 20, "symlink": 20, "dirmany": 10, "dirdeep": 10, "dentry": 2}

FIO_JOBS: dict[str, list[str]] = {
    "fio seq-write 1M psync": ["--rw=write", "--bs=1M", "--size=32M", "--ioengine=psync"],
    "fio rand-write 4K libaio qd16": ["--rw=randwrite", "--bs=4k", "--size=8M",
                                      "--ioengine=libaio", "--iodepth=16"],
    "fio seq-write 1M direct": ["--rw=write", "--bs=1M", "--size=32M", "--ioengine=psync",
                                "--direct=1"],
    "fio rand-write 4K mmap": ["--rw=randwrite", "--bs=4k", "--size=8M", "--ioengine=mmap"],
}

TARGETS = ("plain", "passthrough", "memfs")
_MNT_DETACH = 2


@dataclass
class Cell:
    """One (row, target) outcome."""

    status: str
    """PASS, FAIL, SKIP or DEAD."""
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Server:
    """A ``virtiofs mount`` process and its mount point."""

    kind: str
    mountpoint: str
    source: str | None
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""
    restarts: int = 0

    def start(self) -> None:
        argv = [sys.executable, "-m", "virtiofs", "mount", "--allow-other"]
        if self.kind == "memfs":
            argv += ["--memory", self.mountpoint]
        else:
            assert self.source is not None
            argv += ["--xattr", self.source, self.mountpoint]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.logfile = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if is_fuse_mount(self.mountpoint):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}; "
                                   f"log {self.log}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} not mounted within 30 s; log {self.log}")

    def alive(self) -> bool:
        """The process runs and the mount answers a statfs within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            r = subprocess.run(["stat", "-f", self.mountpoint], capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        lazy_unmount(self.mountpoint)
        if getattr(self, "logfile", None) is not None:
            self.logfile.close()

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def rss_kib(self) -> int | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


def is_fuse_mount(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == real and fields[sep + 1].startswith("fuse"):
                return True
    return False


def lazy_unmount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # Several times: a mount point can carry stacked mounts if a test went wrong.
    for _ in range(4):
        if not is_fuse_mount(path):
            return
        libc.umount2(os.fsencode(path), _MNT_DETACH)


@contextmanager
def targets(selected: Sequence[str], base: str) -> Iterator[dict[str, tuple[str, Server | None]]]:
    """Directories to stress, per target: (path, server or None), cleaned up afterwards."""
    servers: list[Server] = []
    out: dict[str, tuple[str, Server | None]] = {}
    try:
        for kind in selected:
            if kind == "plain":
                path = os.path.join(base, "plain")
                os.makedirs(path)
                out[kind] = (path, None)
                continue
            mnt = os.path.join(base, f"mnt-{kind}")
            os.makedirs(mnt)
            src = None
            if kind == "passthrough":
                src = os.path.join(base, "source")
                os.makedirs(src)
            srv = Server(kind, mnt, src, log=os.path.join(base, f"{kind}.log"))
            servers.append(srv)
            srv.start()
            out[kind] = (mnt, srv)
        yield out
    finally:
        for srv in servers:
            srv.stop()


def _workdir(path: str, row: str) -> str:
    d = os.path.join(path, row.replace(" ", "_").replace("/", "_"))
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o777)  # stress-ng drops to nobody for some stressors when run as root
    return d


def run_stressor(name: str, path: str, ops: int, timeout: float) -> Cell:
    work = _workdir(path, name)
    ops = max(1, ops // OPS_DIVISOR.get(name, 1))
    cmd = ["stress-ng", f"--{name}", "1", f"--{name}-ops", str(ops), "--verify",
           "--timeout", f"{int(timeout)}s", "--temp-path", work, "--metrics-brief",
           *EXTRA_ARGS.get(name, [])]
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60,
                           cwd=work)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        return Cell("FAIL", time.monotonic() - start, f"stress-ng hung past {timeout + 60} s: "
                    + (out if isinstance(out, str) else out.decode(errors="replace"))[-800:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - start
    text = r.stdout + r.stderr
    lines = [ln for ln in text.splitlines() if " fail:" in ln or "error" in ln.lower()
             or "skipp" in ln or "not implemented" in ln.lower()]
    if r.returncode in (3, 4) or ("skipp" in text and r.returncode == 0):
        return Cell("SKIP", elapsed, "; ".join(lines)[-600:] or f"exit {r.returncode}")
    if r.returncode == 0:
        return Cell("PASS", elapsed)
    return Cell("FAIL", elapsed, f"exit {r.returncode}: " + "\n".join(lines)[-1500:])


def run_fio(name: str, args: list[str], path: str, timeout: float) -> Cell:
    work = _workdir(path, "fio")
    # verify_state_save=0: fio would otherwise drop a *-verify.state file in its cwd.
    cmd = ["fio", "--name=verify", f"--directory={work}", "--verify=crc32c", "--do_verify=1",
           "--verify_fatal=1", "--verify_state_save=0", "--numjobs=1", "--output-format=json",
           "--group_reporting", *args]
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60,
                           cwd=work)
    except subprocess.TimeoutExpired:
        return Cell("FAIL", time.monotonic() - start, "fio hung")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - start
    try:
        doc = json.loads(r.stdout[r.stdout.index("{"):])
        errors = [j.get("error", 0) for j in doc.get("jobs", [])]
    except ValueError:
        errors = [r.returncode or -1]
    if r.returncode == 0 and not any(errors):
        return Cell("PASS", elapsed)
    detail = f"exit {r.returncode}, job errors {errors}: " + r.stderr[-1200:]
    if "Invalid argument" in r.stderr and "--direct=1" in args:
        return Cell("SKIP", elapsed, "O_DIRECT refused: " + detail)
    return Cell("FAIL", elapsed, detail)


@dataclass
class Report:
    rows: list[str]
    targets: list[str]
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)
    server_rss_kib: dict[str, int | None] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    def regressions(self) -> list[tuple[str, str]]:
        """(row, target) where a mount fails a row the plain directory passes."""
        out = []
        for row in self.rows:
            plain = self.cells[row].get("plain")
            for t in self.targets:
                if t == "plain":
                    continue
                c = self.cells[row].get(t)
                if c is not None and c.status in ("FAIL", "DEAD") and (
                        plain is None or plain.status == "PASS"):
                    out.append((row, t))
        return out

    def table(self) -> str:
        width = max(len(r) for r in self.rows) + 2
        head = f"{'row':<{width}}" + "".join(f"{t:>16}" for t in self.targets)
        lines = [head, "-" * len(head)]
        for row in self.rows:
            cells = self.cells[row]
            lines.append(f"{row:<{width}}" + "".join(
                f"{cells[t].status + f' {cells[t].seconds:.1f}s':>16}" if t in cells else
                f"{'-':>16}" for t in self.targets))
        totals = {t: sum(1 for r in self.rows if self.cells[r].get(t, Cell('')).status == "PASS")
                  for t in self.targets}
        lines.append("-" * len(head))
        lines.append(f"{'passed':<{width}}" + "".join(f"{totals[t]:>13}/{len(self.rows):<2}"
                                                       for t in self.targets))
        if self.server_rss_kib:
            lines.append("server RSS at the end (KiB): " + ", ".join(
                f"{k} {v}" for k, v in self.server_rss_kib.items()))
        if any(self.restarts.values()):
            lines.append(f"server restarts: {self.restarts}")
        for row in self.rows:
            for t in self.targets:
                c = self.cells[row].get(t)
                if c is not None and c.status != "PASS" and c.detail:
                    lines.append(f"\n[{c.status}] {row} on {t}:\n  "
                                 + c.detail.strip().replace("\n", "\n  ")[:1200])
        return "\n".join(lines)


def run(stressors: Sequence[str], selected: Sequence[str], *, ops: int = 200,
        timeout: float = 20.0, fio: bool = True, fio_jobs: Sequence[str] | None = None,
        progress: bool = True) -> Report:
    """Run every stressor (and fio job) on every selected target; returns the report."""
    for tool in ("stress-ng",) + (("fio",) if fio else ()):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (scripts/bootstrap.sh installs it)")
    jobs = list(fio_jobs if fio_jobs is not None else FIO_JOBS) if fio else []
    report = Report(list(stressors) + jobs, list(selected))
    base = tempfile.mkdtemp(prefix="virtiofs-outside-")
    try:
        with targets(selected, base) as where:
            for row in report.rows:
                report.cells[row] = {}
                for t in selected:
                    path, srv = where[t]
                    if row in FIO_JOBS:
                        cell = run_fio(row, FIO_JOBS[row], path, timeout)
                    else:
                        cell = run_stressor(row, path, ops, timeout)
                    if srv is not None and not srv.alive():
                        cell = Cell("DEAD", cell.seconds, f"server died or hung during {row}: "
                                    f"{cell.detail} (log {srv.log}: "
                                    f"{_tail(srv.log)})")
                        srv.restart()
                    report.cells[row][t] = cell
                    if progress:
                        print(f"  {row:<28} {t:<12} {cell.status} {cell.seconds:.1f}s",
                              file=sys.stderr, flush=True)
            for t in selected:
                srv = where[t][1]
                if srv is not None:
                    report.server_rss_kib[t] = srv.rss_kib()
                    report.restarts[t] = srv.restarts
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return report


def _tail(path: str, n: int = 600) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stressors", default=",".join(ALL_STRESSORS),
                    help="comma-separated stress-ng stressors (default: all listed)")
    ap.add_argument("--ops", type=int, default=300, help="bogo ops per stressor")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per stressor")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--json", help="write the cells as JSON here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse to mount", file=sys.stderr)
        return 2
    selected = [t for t in args.targets.split(",") if t]
    bad = set(selected) - set(TARGETS)
    if bad:
        ap.error(f"unknown targets {bad}")
    stressors = [s for s in args.stressors.split(",") if s]
    report = run(stressors, selected, ops=args.ops, timeout=args.timeout, fio=not args.no_fio)
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({row: {t: asdict(c) for t, c in cells.items()}
                       for row, cells in report.cells.items()}, f, indent=1)
    bad_cells = report.regressions()
    if bad_cells:
        print(f"\nfails on our mounts but passes on the plain directory: {bad_cells}")
    return 1 if bad_cells else 0


if __name__ == "__main__":
    sys.exit(main())
