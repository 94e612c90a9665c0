"""The file-operation suite: a guest script plus the host-side check of what it left behind.

The guest half is ``scripts/fileops.sh`` (busybox ash), printing ``OK name`` / ``FAIL name
detail`` / ``SKIP name reason`` / ``INFO key value`` lines. The host half,
:meth:`FileOpsSuite.verify_host`, checks the tree the script leaves in the exported directory
(contents, link counts, modes, owners, times, the large file's SHA-256, the 10,000 entries, the
concurrent writers' files, xattrs).

Running it against another back-end is one argument, the socket::

    with start_c_virtiofsd(shared, sock):            # or our own back-end on `sock`
        report = FileOpsSuite().run(sock, shared_dir=shared)
    assert report.ok, report.describe()
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .qemu import GuestResult, GuestRunner, LineCallback

__all__ = [
    "CHECKS",
    "CheckResult",
    "FileOpsSuite",
    "SuiteReport",
    "guest_script",
    "parse_suite_output",
]

#: Every check the guest script reports, in order; a missing one means the script died early.
CHECKS = (
    "mount", "create", "create_excl", "write", "read", "append", "truncate", "rename", "link",
    "symlink", "mkdir_rmdir", "chmod", "chown", "utimes", "unlink", "readdir", "statfs",
    "fsync", "seed", "large", "many", "concurrent", "xattr", "umount",
)  # fmt: skip

#: 2001-02-03 04:05:06 UTC, what the script's ``touch -d`` sets.
UTIMES_EPOCH = 981173106

_LINE = re.compile(r"(OK|FAIL|SKIP|INFO) (\S+) ?(.*)")


def guest_script(name: str) -> str:
    """The text of ``virtiofs/guest/scripts/<name>`` (package data)."""
    return resources.files(__package__).joinpath("scripts", name).read_text()


@dataclass(frozen=True)
class CheckResult:
    """One ``OK``/``FAIL``/``SKIP`` line."""

    status: str
    detail: str = ""


def parse_suite_output(lines: list[str]) -> tuple[dict[str, CheckResult], dict[str, str]]:
    """Checks and INFO values from the script's console lines; other lines are ignored."""
    checks: dict[str, CheckResult] = {}
    info: dict[str, str] = {}
    for line in lines:
        m = _LINE.fullmatch(line.strip())
        if m is None:
            continue
        kind, name, rest = m.groups()
        if kind == "INFO":
            info[name] = rest
        elif name in checks and checks[name].status == "FAIL":
            continue  # keep the first failure if a name repeats
        else:
            checks[name] = CheckResult(kind, rest)
    return checks, info


@dataclass
class SuiteReport:
    """The outcome of one suite run: guest checks, INFO figures, host-side problems."""

    guest: GuestResult
    checks: dict[str, CheckResult]
    info: dict[str, str]
    host_problems: list[str] = field(default_factory=list)
    host_checked: bool = False

    @property
    def failed(self) -> dict[str, CheckResult]:
        """Checks that printed FAIL."""
        return {n: c for n, c in self.checks.items() if c.status == "FAIL"}

    @property
    def skipped(self) -> dict[str, CheckResult]:
        """Checks that printed SKIP (with the reason as detail)."""
        return {n: c for n, c in self.checks.items() if c.status == "SKIP"}

    @property
    def missing(self) -> list[str]:
        """Checks the script never reported (it stopped early or hung)."""
        return [n for n in CHECKS if n not in self.checks]

    @property
    def ok(self) -> bool:
        """Guest exited 0, no FAIL, nothing missing, host tree as expected."""
        return (
            self.guest.exit_status == 0
            and not self.failed
            and not self.missing
            and not self.host_problems
        )

    def describe(self) -> str:
        """A readable summary for assertion messages and the demo."""
        lines = [
            f"guest: {self.guest.describe().splitlines()[0]}; boot {_s(self.guest.boot_time)},"
            f" script {_s(self.guest.script_time)}",
            f"checks: {sum(c.status == 'OK' for c in self.checks.values())} OK, "
            f"{len(self.failed)} FAIL, {len(self.skipped)} SKIP, {len(self.missing)} missing",
        ]
        lines += [f"  FAIL {n}: {c.detail}" for n, c in self.failed.items()]
        lines += [f"  SKIP {n}: {c.detail}" for n, c in self.skipped.items()]
        if self.missing:
            lines.append(f"  missing: {' '.join(self.missing)}")
            lines += ["  | " + x for x in (self.guest.output_lines or self.guest.boot_lines)[-10:]]
        lines += [f"  host: {p}" for p in self.host_problems]
        return "\n".join(lines)


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


@dataclass(frozen=True)
class FileOpsSuite:
    """Parameters of the file-operation suite (defaults are what issue #4 asks for)."""

    large_mib: int = 64
    many: int = 10_000
    writers: int = 4
    per_writer: int = 100
    seed_bytes: int = 1 << 20
    xattr: bool = True

    def script(self) -> str:
        """The guest script (same text for every parameter set, so one cached initramfs)."""
        return guest_script("fileops.sh")

    def env(self, seed_sha256: str | None = None) -> dict[str, str]:
        """Environment for the guest script (passed on the kernel command line)."""
        env = {
            "SUITE_LARGE_MIB": str(self.large_mib),
            "SUITE_MANY": str(self.many),
            "SUITE_WRITERS": str(self.writers),
            "SUITE_PER_WRITER": str(self.per_writer),
            "SUITE_XATTR": "1" if self.xattr else "0",
        }
        if seed_sha256:
            env["SUITE_SEED_SHA256"] = seed_sha256
        return env

    def prepare_host(self, root: Path) -> str:
        """Write ``seed/host.bin`` (random bytes) into the exported tree; return its SHA-256.

        The guest reads it back and compares: data written on the host side, read through
        the back-end.
        """
        seed = root / "seed"
        seed.mkdir(exist_ok=True)
        data = os.urandom(self.seed_bytes)
        (seed / "host.bin").write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def run(
        self,
        socket_path: str | os.PathLike[str],
        *,
        shared_dir: str | os.PathLike[str] | None = None,
        runner: GuestRunner | None = None,
        tag: str = "myfs",
        device_options: Mapping[str, object] | None = None,
        timeout: float = 300.0,
        on_line: LineCallback | None = None,
    ) -> SuiteReport:
        """Run the suite in a guest against the back-end at ``socket_path``.

        With ``shared_dir`` (the host directory the back-end exports) the seed file is written
        before boot and the resulting tree is checked after; without it (an in-memory
        back-end) only the guest's own checks count.
        """
        root = None if shared_dir is None else Path(shared_dir)
        seed = self.prepare_host(root) if root is not None else None
        guest = (runner or GuestRunner()).run(
            self.script(),
            socket_path,
            tag=tag,
            device_options=device_options,
            env=self.env(seed),
            timeout=timeout,
            on_line=on_line,
        )
        checks, info = parse_suite_output(guest.output_lines)
        if seed is None and checks.get("seed", CheckResult("SKIP")).status == "SKIP":
            checks["seed"] = CheckResult("SKIP", "no host directory to seed")
        report = SuiteReport(guest, checks, info)
        if root is not None and guest.exit_status is not None:
            report.host_problems = self.verify_host(root, info, checks)
            report.host_checked = True
        return report

    def verify_host(
        self,
        root: Path,
        info: Mapping[str, str],
        checks: Mapping[str, CheckResult] | None = None,
    ) -> list[str]:
        """Problems found in the tree the guest script left under ``root/suite``.

        ``info`` gives the guest's SHA-256 of the large file; ``checks`` (when given) limits
        the xattr verification to runs whose guest xattr check passed.
        """
        d = root / "suite"
        problems: list[str] = []

        def expect(cond: bool, what: str) -> None:
            if not cond:
                problems.append(what)

        def content(name: str, data: bytes) -> None:
            try:
                got = (d / name).read_bytes()
            except OSError as exc:
                problems.append(f"{name}: {exc}")
                return
            expect(got == data, f"{name}: content {got[:60]!r} != {data[:60]!r}")

        if not d.is_dir():
            return [f"{d} missing"]
        content("create.txt", b"hello\n")
        content("excl.txt", b"new\n")
        content("write.txt", b"alXYa\nbeta\n")
        content("append.txt", b"one\ntwo\nthree\n")
        content("truncate.txt", b"0123" + bytes(100000 - 4))
        content("trunc0.txt", b"")
        content("rdir2/r4", b"r\n")
        for gone in ("r1", "r2", "r3", "rdir", "d1", "u1", "u2"):
            expect(not os.path.lexists(d / gone), f"{gone} should not exist")
        content("l1", b"L\nM\n")
        try:
            s1, s2 = os.stat(d / "l1"), os.stat(d / "l2")
            expect(s1.st_ino == s2.st_ino, "l1 and l2 are not the same inode")
            expect(s1.st_nlink == 2, f"l1 nlink {s1.st_nlink} != 2")
        except OSError as exc:
            problems.append(f"link: {exc}")
        for name, target in (("sl", "create.txt"), ("dangling", "/nonexistent/x")):
            try:
                expect(os.readlink(d / name) == target, f"{name} -> {os.readlink(d / name)}")
            except OSError as exc:
                problems.append(f"{name}: {exc}")
        expect((d / "keepdir" / "sub").is_dir(), "keepdir/sub is not a directory")
        for name, mode in (("mode.txt", 0o640), ("modedir", 0o1777)):
            try:
                got = os.stat(d / name).st_mode & 0o7777
                expect(got == mode, f"{name} mode {got:o} != {mode:o}")
            except OSError as exc:
                problems.append(f"{name}: {exc}")
        try:
            st = os.stat(d / "own.txt")
            expect((st.st_uid, st.st_gid) == (1234, 5678), f"own.txt owner {st.st_uid}:{st.st_gid}")
            st = os.stat(d / "utimes.txt")
            expect(int(st.st_mtime) == UTIMES_EPOCH, f"utimes.txt mtime {st.st_mtime}")
            expect(int(st.st_atime) == UTIMES_EPOCH, f"utimes.txt atime {st.st_atime}")
        except OSError as exc:
            problems.append(f"owner/times: {exc}")
        expect(sorted(os.listdir(d / "ls.d")) == ["a", "b", "c"], "ls.d entries")
        content("fsync.bin", bytes(16384))
        # The large file: size and SHA-256 as the guest computed it.
        large = d / "large.bin"
        try:
            size = large.stat().st_size
            expect(size == self.large_mib << 20, f"large.bin size {size} != {self.large_mib} MiB")
            digest = _sha256_file(large)
            expect(
                digest == info.get("large.sha256"),
                f"large.bin sha256 {digest} != guest's {info.get('large.sha256')}",
            )
        except OSError as exc:
            problems.append(f"large.bin: {exc}")
        try:
            names = set(os.listdir(d / "many"))
            expected = {f"f{i}" for i in range(self.many)}
            expect(
                names == expected,
                f"many/: {len(names)} entries, {len(expected - names)} missing, "
                f"{len(names - expected)} unexpected",
            )
        except OSError as exc:
            problems.append(f"many: {exc}")
        for k in range(self.writers):
            for j in range(self.per_writer):
                name = f"w{k}-{j}"
                try:
                    data = (d / "conc" / name).read_bytes()
                except OSError as exc:
                    problems.append(f"conc/{name}: {exc}")
                    break
                if data != f"{name}\n".encode():
                    problems.append(f"conc/{name}: {data!r}")
                    break
            lines = "".join(f"w{k}-{j}\n" for j in range(self.per_writer)).encode()
            content(f"conc/log{k}", lines)
        xattr_ok = checks is None or checks.get("xattr", CheckResult("SKIP")).status == "OK"
        if self.xattr and xattr_ok and os.path.exists(d / "xattr.txt"):
            try:
                val = os.getxattr(d / "xattr.txt", "user.keep")
                expect(val == b"kept", f"xattr user.keep = {val!r}")
                expect("user.test" not in os.listxattr(d / "xattr.txt"), "user.test not removed")
            except OSError as exc:
                if exc.errno != errno.ENOTSUP:
                    problems.append(f"xattr.txt: {exc}")
        return problems


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
