#!/usr/bin/env python3
"""PassthroughFS over /dev/fuse against its peers, measured in the same run.

    python benchmarks/passthrough.py [--runtime 5] [--files 5000] [--size 256M]
                                     [--servers ours-pt,ours-nopt,llfuse,pyfuse3] [--unpinned]

Every server serves the same fresh tmpfs and runs in its own process; the server and the load
(shared/bench/fsbench.py, the project's reference workload) are both pinned with
``taskset -c 0`` (FACTS.md: unpinned figures swing 5x on these 2-vCPU machines).  Servers:

- ``ours-pt``: PassthroughFS, cache=auto, kernel passthrough I/O on (FUSE_PASSTHROUGH);
- ``ours-nopt``: the same with ``passthrough=False`` (reads and writes served in Python);
- ``llfuse`` / ``pyfuse3``: ``examples/passthroughfs.py`` from each project's sdist
  (``pip download --no-binary``), unpacked into a temporary directory and run from there
  (never copied into this repository); the packages themselves must be installed (pip).

Prints fsbench's lines, then one table: each figure, each server, and our ratios against
llfuse and pyfuse3 next to the FACTS.md targets (metadata >= 1.0x llfuse and >= 3x pyfuse3;
with passthrough 4 KiB randread >= 5x llfuse and 1 MiB reads >= 2x llfuse).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FSBENCH_CANDIDATES = [REPO.parent / "shared" / "bench" / "fsbench.py",
                      Path("/work/shared/bench/fsbench.py")]

OURS = """
import sys
from virtiofs.server.passthrough import PassthroughFS
from virtiofs.transport.devfuse import serve
src, mnt, pt = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
serve(PassthroughFS(src, passthrough="auto" if pt else False), mnt, fsname="virtiofs-bench")
"""

META = ["meta.create", "meta.stat_cold", "meta.stat_warm", "meta.lookup_miss",
        "meta.readdir_cold", "meta.readdir_warm", "meta.unlink"]
FIO = ["fio.seqwrite_1M", "fio.seqread_1M", "fio.randread_4k", "fio.randread_4k_lat"]


def fsbench_path() -> Path:
    for path in FSBENCH_CANDIDATES:
        if path.exists():
            return path
    raise SystemExit("shared/bench/fsbench.py not found")


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            # The mount exists once mount(2) returned; a stat proves INIT was answered.
            os.stat(path)
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before mounting")
        time.sleep(0.05)
    raise TimeoutError(f"{path} not mounted after {timeout} s")


@contextlib.contextmanager
def server(cmd: list[str], mnt: Path, pin: bool) -> Iterator[subprocess.Popen[bytes]]:
    full = (["taskset", "-c", "0"] if pin else []) + cmd
    proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_mounted(mnt, proc)
        yield proc
    finally:
        if proc.poll() is None:
            # SIGINT first: llfuse/pyfuse3 examples and our serve() unmount on it.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def peer_example(package: str, workdir: Path) -> Path | None:
    """examples/passthroughfs.py from the package's sdist, unpacked under ``workdir``."""
    dest = workdir / package
    dest.mkdir(exist_ok=True)
    # --no-binary for the package only: its build dependencies come as wheels (building
    # setuptools and Cython from source too takes many minutes here).
    cp = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", package,
                         "--no-deps", "-d", str(dest), package],
                        capture_output=True, text=True, timeout=600)
    archives = sorted(dest.glob(f"{package}-*.tar.gz"))
    if not archives:
        print(f"# {package}: sdist download failed: {cp.stderr.strip()[-300:]}", flush=True)
        return None
    with tarfile.open(archives[-1]) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.endswith("examples/passthroughfs.py") and m.isfile()]
        if not members:
            print(f"# {package}: no examples/passthroughfs.py in {archives[-1].name}")
            return None
        tar.extractall(dest, members=members, filter="data")
        return dest / members[0].name


def parse(lines: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in lines.splitlines():
        parts = line.split("\t")
        if len(parts) >= 4 and not line.startswith("#"):
            try:
                out[parts[1]] = float(parts[2])
            except ValueError:
                pass
    return out


def run_fsbench(mnt: Path, label: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = (["taskset", "-c", "0"] if not args.unpinned else []) + [
        sys.executable, str(fsbench_path()), str(mnt), "--label", label,
        "--files", str(args.files), "--size", args.size, "--runtime", str(args.runtime)]
    if args.skip:
        cmd += ["--skip", args.skip]
    cp = subprocess.run(cmd, capture_output=True, text=True,
                        timeout=600 + 6 * args.runtime)
    sys.stdout.write(cp.stdout)
    sys.stdout.flush()
    if cp.returncode != 0:
        print(f"# {label}: fsbench failed: {cp.stderr.strip()[-500:]}", flush=True)
    return parse(cp.stdout)


def ratio(a: float | None, b: float | None, lower_is_better: bool = False) -> str:
    if not a or not b:
        return "-"
    return f"{(b / a if lower_is_better else a / b):.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job (default 5)")
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--servers", default="ours-pt,ours-nopt,llfuse,pyfuse3")
    ap.add_argument("--unpinned", action="store_true", help="do not pin server and load")
    ap.add_argument("--skip", default="", help="fsbench phases to skip: meta,fio")
    ap.add_argument("--no-tmpfs", action="store_true", help="skip the native tmpfs reference")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (mount(2), drop_caches)")
    pin = not args.unpinned
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="virtiofs-bench-") as tmp:
        work = Path(tmp)
        src, mnt = work / "src", work / "mnt"
        src.mkdir()
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2G", "tmpfs", str(src)], check=True)
        try:
            wanted = args.servers.split(",")
            commands: dict[str, list[str]] = {}
            env_path = str(REPO)
            for name in wanted:  # in the order given: position effects show up when swapped
                if name in ("ours-pt", "ours-nopt"):
                    commands[name] = [sys.executable, "-c", OURS, str(src), str(mnt),
                                      "1" if name == "ours-pt" else "0"]
                elif name in ("llfuse", "pyfuse3"):
                    example = peer_example(name, work)
                    if example is not None:
                        commands[name] = [sys.executable, str(example), str(src), str(mnt)]
                else:
                    raise SystemExit(f"unknown server {name!r}")
            os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
            if not args.no_tmpfs:
                print("# native tmpfs (no FUSE) for reference", flush=True)
                results["tmpfs"] = run_fsbench(src, "tmpfs", args)
            for label, cmd in commands.items():
                for leftover in src.iterdir():
                    subprocess.run(["rm", "-rf", str(leftover)], check=False)
                try:
                    with server(cmd, mnt, pin) as proc:
                        results[label] = run_fsbench(mnt, label, args)
                        if proc.poll() is not None:
                            print(f"# {label}: server died during the run", flush=True)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"# {label}: {exc}", flush=True)
        finally:
            subprocess.run(["umount", "-l", str(src)], check=False)

    servers = [s for s in ("tmpfs", "ours-pt", "ours-nopt", "llfuse", "pyfuse3") if s in results]
    print("\n# figure".ljust(22) + "".join(f"{s:>12}" for s in servers)
          + "   pt/llfuse nopt/llfuse pt/pyfuse3")
    for fig in META + FIO:
        row = [results[s].get(fig) for s in servers]
        if not any(row):
            continue
        low = fig.endswith("_lat")
        cells = "".join(f"{v:>12.0f}" if v else f"{'-':>12}" for v in row)
        r = results
        print(f"{fig:21s}{cells}   {ratio(r.get('ours-pt', {}).get(fig), r.get('llfuse', {}).get(fig), low):>9}"
              f" {ratio(r.get('ours-nopt', {}).get(fig), r.get('llfuse', {}).get(fig), low):>11}"
              f" {ratio(r.get('ours-pt', {}).get(fig), r.get('pyfuse3', {}).get(fig), low):>10}")
    print("# targets (FACTS.md): metadata >= 1.0x llfuse and >= 3x pyfuse3; passthrough on: "
          "randread_4k >= 5x llfuse, seqread_1M >= 2x llfuse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
