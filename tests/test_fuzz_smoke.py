"""Every fuzz target runs for a few seconds and finds nothing (SECURITY.md B3: fuzzing in CI,
time-boxed; STYLE.md point 11).

One ``fuzz/run.py`` invocation (two targets at a time, each in its own process, a fresh corpus
seeded from valid messages and the golden vectors) takes about 40 s for all targets; the
assertions are then made per target so a failure names it.  atheris (the ``fuzz`` extra) gives
coverage-guided runs; without it the seeded mutator of ``fuzz/_harness.py`` runs instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
SECONDS = float(os.environ.get("VIRTIOFS_FUZZ_SMOKE_SECONDS", "3"))
TARGETS = sorted(p.stem[5:] for p in FUZZ.glob("fuzz_*.py"))
EXPECTED = {"request", "reply", "dirents", "notify", "split_ring", "packed_ring", "vhost_user",
            "session"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fuzz") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "--seconds", str(SECONDS), "--jobs", "2",
         "--fresh-corpus", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60 + 30 * len(TARGETS))
    assert out.exists(), f"fuzz/run.py wrote no results:\n{proc.stdout}\n{proc.stderr}"
    doc = json.loads(out.read_text())
    print(proc.stdout)
    return {r["target"]: r for r in doc}


def test_every_issue_target_exists() -> None:
    assert EXPECTED <= set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_and_finds_nothing(results: dict[str, dict[str, Any]],
                                            target: str) -> None:
    r = results[target]
    assert r["error"] is None, r["error"]
    assert r["executions"] > 0
    assert r["findings"] == [], json.dumps(r["findings"], indent=1)


def test_fuzz_runner_reports_a_finding(tmp_path: Path) -> None:
    """The runner is not blind: a target whose code raises an untyped error is reported (and
    the run goes on instead of stopping at the first one)."""
    probe = FUZZ / "fuzz_zz_probe_selftest.py"
    probe.write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        "from _harness import Target, main\n"
        "def one(data):\n"
        "    if len(data) > 3 and data[0] == 0x41:\n"
        "        raise KeyError('planted bug')\n"
        "    if data[:1] == b'B':\n"
        "        raise ValueError('allowed')\n"
        "T = Target('zz_probe_selftest', one, lambda: [b'AAAA', b'B'], allowed=(ValueError,))\n"
        "if __name__ == '__main__':\n"
        "    main(T)\n")
    try:
        out = tmp_path / "r.json"
        proc = subprocess.run(
            [sys.executable, str(FUZZ / "run.py"), "--seconds", "1", "--fresh-corpus",
             "--json", str(out), "zz_probe_selftest"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (r,) = json.loads(out.read_text())
        assert len(r["findings"]) == 1 and "KeyError" in r["findings"][0]["signature"]
        assert r["executions"] > 2
    finally:
        probe.unlink()
