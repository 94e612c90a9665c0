#!/usr/bin/env python3
"""Run the fuzz targets, each for a bounded time in its own process, and report.

    python fuzz/run.py [--seconds N] [--engine auto|atheris|fallback] [--json FILE] [TARGET ...]
    make fuzz                      # every target, 60 s each (FUZZ_SECONDS=N to change)

TARGET names are the ``fuzz/fuzz_NAME.py`` files (``request``, ``reply``, ``dirents``,
``notify``, ``split_ring``, ``packed_ring``, ``vhost_user``, ``session``); none means all.
With atheris installed (the ``fuzz`` extra) each target runs coverage-guided with a corpus
kept in ``.cache/fuzz/corpus/NAME`` between runs and seeded from valid messages and the golden
vectors; without it (or ``--engine fallback``) a seeded random mutator runs instead.

Printed: executions, executions per second and findings per target.  A finding is any
exception other than the target's typed errors, or a violated property the target checks;
each distinct one is listed with the file holding its first input (``.cache/fuzz/artifacts``).
Replay one with ``python fuzz/fuzz_NAME.py FILE`` (``VIRTIOFS_FUZZ_RAISE=1`` for the
traceback).  Exit status: 0 when every target ran and found nothing, 1 otherwise.

As root, the ``session`` target gets a 64 MiB tmpfs as its scratch area (unmounted afterwards)
so nothing a hostile request writes can reach a real disk.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, ".cache", "fuzz")
_MNT_DETACH = 2


def targets() -> list[str]:
    """Names of every ``fuzz/fuzz_*.py`` target."""
    return sorted(name[5:-3] for name in os.listdir(HERE)
                  if name.startswith("fuzz_") and name.endswith(".py"))


def have_atheris() -> bool:
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Result:
    """What one bounded run of one target did."""

    target: str
    engine: str
    seconds: float
    executions: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    error: str | None = None
    """Set when the run itself failed (crash of the fuzzing process, timeout, no stats)."""

    @property
    def execs_per_second(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.findings and self.error is None


def _mount_tmpfs(size: str = "64m") -> str | None:
    """A private tmpfs for the session target (root only); None when it cannot be had."""
    if os.geteuid() != 0:
        return None
    path = tempfile.mkdtemp(prefix="virtiofs-fuzz-tmpfs-")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, f"size={size},mode=0755".encode()):
        os.rmdir(path)
        return None
    return path


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(path.encode(), _MNT_DETACH)
    try:
        os.rmdir(path)
    except OSError:
        pass


def run_target(name: str, seconds: float, engine: str, *, keep_corpus: bool = True,
               verbose: bool = False) -> Result:
    """Fuzz ``name`` for ``seconds`` in a subprocess (hard timeout ``seconds + 120``)."""
    path = os.path.join(HERE, f"fuzz_{name}.py")
    if not os.path.exists(path):
        return Result(name, engine, 0.0, error=f"no target {path}")
    use_atheris = engine == "atheris" or (engine == "auto" and have_atheris())
    engine_name = "atheris" if use_atheris else "fallback"
    artifacts = os.path.join(CACHE, "artifacts", name)
    os.makedirs(artifacts, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"virtiofs-fuzz-{name}-")
    stats = os.path.join(work, "stats.json")
    env = dict(os.environ, VIRTIOFS_FUZZ_ARTIFACTS=artifacts, VIRTIOFS_FUZZ_STATS=stats,
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    scratch = _mount_tmpfs() if name == "session" else None
    # Without a tmpfs the session target's scratch tree lives in the work dir (removed below).
    env["VIRTIOFS_FUZZ_SCRATCH"] = scratch if scratch is not None else work
    if use_atheris:
        corpus = (os.path.join(CACHE, "corpus", name) if keep_corpus
                  else os.path.join(work, "corpus"))
        os.makedirs(corpus, exist_ok=True)
        seeds = os.path.join(work, "seeds")
        # -handle_xfsz=0: the session target caps file sizes with RLIMIT_FSIZE and ignores
        # SIGXFSZ (writes past the cap answer EFBIG); libFuzzer would call that a crash.
        cmd = [sys.executable, path, f"-max_total_time={max(1, int(seconds))}",
               "-print_final_stats=1", "-timeout=20", "-rss_limit_mb=3072", "-handle_xfsz=0",
               f"-artifact_prefix={artifacts}/", corpus, "--seeds-into", seeds]
    else:
        cmd = [sys.executable, path, "--no-atheris", "--seconds", str(seconds)]
        env["VIRTIOFS_FUZZ_NO_ATHERIS"] = "1"
    result = Result(name, engine_name, seconds)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=work, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        result.error = f"still running {seconds + 120:.0f} s after start: killed"
    finally:
        if scratch is not None:
            _umount(scratch)
    result.seconds = time.monotonic() - start
    result.returncode = proc.returncode
    text = out.decode(errors="replace")
    if verbose:
        sys.stderr.write(text)
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    try:
        with open(stats) as f:
            doc = json.load(f)
        result.executions = int(doc.get("executions", 0))
        result.findings = list(doc.get("findings", []))
    except (OSError, ValueError):
        pass
    if m:
        result.executions = max(result.executions, int(m.group(1)))
    shutil.rmtree(work, ignore_errors=True)
    for f in result.findings:
        f.pop("traceback", None)
    # libFuzzer's own verdicts: an uncaught exception (VIRTIOFS_FUZZ_RAISE), a timeout or an
    # out-of-memory in the target.
    crash = re.search(r"(==\d+== ERROR: libFuzzer: [^\n]+|Uncaught Python exception[^\n]*|"
                      r"ALARM: working on the last Unit[^\n]*|out-of-memory[^\n]*)", text)
    if crash:
        result.findings.append({"target": name, "signature": crash.group(1)[:120],
                                "message": text[crash.start():crash.start() + 1500],
                                "input": _newest(artifacts), "count": 1})
    if result.error is None and proc.returncode not in (0, None) and not result.findings:
        result.error = f"exit status {proc.returncode}: " + text[-1500:]
    if result.error is None and result.executions == 0:
        result.error = "no executions recorded: " + text[-1500:]
    return result


def _newest(directory: str) -> str | None:
    try:
        names = [os.path.join(directory, n) for n in os.listdir(directory)]
    except OSError:
        return None
    return max(names, key=os.path.getmtime) if names else None


def report(results: list[Result]) -> str:
    lines = [f"{'target':<14} {'engine':<9} {'seconds':>8} {'executions':>11} {'exec/s':>8} "
             f"{'findings':>8}"]
    for r in results:
        lines.append(f"{r.target:<14} {r.engine:<9} {r.seconds:>8.1f} {r.executions:>11,} "
                     f"{r.execs_per_second:>8.0f} {len(r.findings):>8}"
                     + ("  ERROR" if r.error else ""))
    for r in results:
        if r.error:
            lines.append(f"\n{r.target}: run failed: {r.error}")
        for f in r.findings:
            lines.append(f"\n{r.target}: FINDING {f.get('signature')} x{f.get('count', 1)}\n"
                         f"  {str(f.get('message', ''))[:400]}\n  input: {f.get('input')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(targets()))
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    ap.add_argument("--engine", choices=("auto", "atheris", "fallback"), default="auto")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--fresh-corpus", action="store_true",
                    help="start from the seeds only (do not use or grow .cache/fuzz/corpus)")
    ap.add_argument("-j", "--jobs", type=int, default=1,
                    help="targets run at once (each is one process; default 1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the fuzzers' output")
    args = ap.parse_args(argv)
    names = args.targets or targets()
    unknown = [n for n in names if n not in targets()]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; known: {targets()}")
    if args.engine == "atheris" and not have_atheris():
        ap.error("atheris is not installed (pip install -e .[fuzz])")
    def one(name: str) -> Result:
        r = run_target(name, args.seconds, args.engine, keep_corpus=not args.fresh_corpus,
                       verbose=args.verbose)
        print(f"{name}: {r.executions:,} executions in {r.seconds:.1f} s ({r.engine}), "
              f"{len(r.findings)} finding(s){'' if r.error is None else ', RUN FAILED'}",
              flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, names))
    print()
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), execs_per_second=r.execs_per_second) for r in results],
                      f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
