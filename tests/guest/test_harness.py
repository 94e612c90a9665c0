"""The project's guest harness, proven against QEMU 7.2 and its C virtiofsd.

Booting tests (``-m guest``) start a real TCG guest against a real C virtiofsd serving a
temporary directory, then check the host tree. The rest check the pieces on literal data
captured from this QEMU (console) or against a real peer (GNU cpio reading our archive).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtiofs.guest import (
    CHECKS,
    EXIT_MARKER,
    START_MARKER,
    BackendError,
    BackendProcess,
    ConsoleParser,
    CpioWriter,
    FileOpsSuite,
    GuestKernel,
    GuestRunner,
    parse_bench_output,
    parse_suite_output,
    run_guest,
    start_backend,
    static_helper,
)
from virtiofs.guest.kernel import module_load_order

StartVirtiofsd = Callable[..., tuple[Path, Path, BackendProcess]]

# What QEMU 7.2 wrote on stdout for `echo hello; printf "no newline"` (captured on this
# machine): SeaBIOS and iPXE with ANSI sequences and \r, then the kernel's screen clear.
CAPTURED = (
    b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n\n\n"
    b"iPXE (http://ipxe.org) 00:03.0 CA00 PCI2.10 PnP PMM+1EFCEFB0+1EF0EFB0 CA00\r\n"
    b"Press Ctrl-B to configure iPXE (PCI 00:03.0)...\r      \r\n\n\nBooting from ROM...\r\n"
    b"\x1bc\x1b[?7l\x1b[2J@@VIRTIOFS-GUEST-START@@\r\nhello\r\n"
    b"no newline@@VIRTIOFS-GUEST-EXIT@@ 0\r\n[    3.375918] reboot: Power down\r\n"
)


# --- console parser, on literal lines -----------------------------------------------------


def test_console_parser_on_captured_output() -> None:
    parser = ConsoleParser()
    parser.feed(CAPTURED)
    parser.close()
    assert parser.output_lines == ["hello", "no newline"]
    assert parser.exit_status == 0
    assert parser.boot_lines[0] == "SeaBIOS (version 1.16.2-debian-1.16.2-1)"
    assert "Booting from ROM..." in parser.boot_lines
    assert parser.after_lines == ["[    3.375918] reboot: Power down"]
    assert not any("\r" in line or "\x1b" in line for line in parser.boot_lines)


def test_console_parser_byte_by_byte_gives_the_same_result() -> None:
    whole, trickle = ConsoleParser(), ConsoleParser()
    whole.feed(CAPTURED)
    for i in range(len(CAPTURED)):
        trickle.feed(CAPTURED[i : i + 1])
    for p in (whole, trickle):
        p.close()
    assert trickle.boot_lines == whole.boot_lines
    assert trickle.output_lines == whole.output_lines == ["hello", "no newline"]
    assert trickle.exit_status == whole.exit_status == 0


def test_console_parser_strips_bios_prefix_glued_to_the_first_line() -> None:
    seen: list[tuple[str, str]] = []
    parser = ConsoleParser(on_line=lambda phase, line: seen.append((phase, line)))
    parser.feed_lines(
        [
            "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r",
            f"Booting from ROM..{START_MARKER}\r",
            "Booting from ROM..first line of the script\r",
            "OK create\r",
            f"{EXIT_MARKER} 3\r",
            "[    2.1] reboot: Power down\r",
        ]
    )
    assert parser.output_lines == ["first line of the script", "OK create"]
    assert parser.exit_status == 3
    assert seen[0] == ("boot", "SeaBIOS (version 1.16.2-debian-1.16.2-1)")
    assert seen[1] == ("script", "first line of the script")
    assert seen[-1] == ("after", "[    2.1] reboot: Power down")


def test_console_parser_without_exit_marker_reports_none() -> None:
    parser = ConsoleParser()
    parser.feed(b"SeaBIOS\r\n" + START_MARKER.encode() + b"\r\nworking\r\npartial")
    parser.close()
    assert parser.exit_status is None
    assert parser.output_lines == ["working", "partial"]
    # A kernel panic before the script: no start marker at all.
    panic = ConsoleParser()
    panic.feed_lines(["Kernel panic - not syncing: VFS: Unable to mount root fs"])
    assert panic.started_at is None and panic.output_lines == []


def test_parse_suite_output() -> None:
    checks, info = parse_suite_output(
        [
            "INFO kernel 6.12.117+deb12-amd64",
            "OK create",
            "FAIL rename content after rename: expected 'r', got ''",
            "SKIP xattr busybox has no setfattr",
            "some kernel message",
            "INFO large.sha256 abc",
        ]
    )
    assert checks["create"].status == "OK"
    assert checks["rename"].status == "FAIL" and "expected 'r'" in checks["rename"].detail
    assert checks["xattr"].detail == "busybox has no setfattr"
    assert info == {"kernel": "6.12.117+deb12-amd64", "large.sha256": "abc"}


def test_parse_bench_output() -> None:
    rates = parse_bench_output(
        ["BENCH 0 seq_write 0.500000000 64 MiB", "BENCH 1 seq_write 0.250000000 64 MiB", "x"]
    )
    assert rates == {"seq_write": [128.0, 256.0]}


# --- initramfs and kernel pieces --------------------------------------------------------------


def test_cpio_archive_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    if subprocess.run(["sh", "-c", "command -v cpio"], capture_output=True).returncode:
        pytest.skip("GNU cpio not installed")
    cpio = CpioWriter()
    cpio.add_dir("bin")
    cpio.add_file("bin/tool", b"#!/bin/sh\necho odd-size\n", 0o755)
    cpio.add_symlink("bin/alias", "/bin/tool")
    cpio.add_file("data", bytes(range(256)) * 3 + b"x")
    archive = cpio.getvalue()
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.split()
    assert listing == [b"bin", b"bin/tool", b"bin/alias", b"data"]
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=archive, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho odd-size\n"
    assert os.stat(tmp_path / "bin" / "tool").st_mode & 0o777 == 0o755
    assert os.readlink(tmp_path / "bin" / "alias") == "/bin/tool"
    assert (tmp_path / "data").read_bytes() == bytes(range(256)) * 3 + b"x"


def test_module_order_follows_depends_of_debian_6_1() -> None:
    # depends= fields of Debian's 6.1.0-56 modules (measured); GUEST.md gives the same order.
    depends = {
        "virtio_ring": "",
        "virtio": "virtio_ring",
        "virtio_pci_modern_dev": "",
        "virtio_pci_legacy_dev": "",
        "virtio_pci": "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
        "fuse": "",
        "virtiofs": "fuse,virtio,virtio_ring",
        "cuse": "fuse",
    }
    modules = {
        n: b"\0license=GPL\0depends=" + d.encode() + b"\0name=" + n.encode()
        for n, d in depends.items()
    }
    assert module_load_order(modules) == [
        "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio",
        "virtio_pci", "fuse", "virtiofs",
    ]  # fmt: skip


def _fake_kernel(tmp: Path) -> GuestKernel:
    return GuestKernel("linux-image-x", "x", tmp / "vmlinuz", tmp / "config", {})


def test_qemu_command_line(tmp_path: Path) -> None:
    runner = GuestRunner(_fake_kernel(tmp_path), memory="1G")
    argv = runner.command(
        tmp_path / "initrd",
        "/run/a,b.sock",
        tag="fs1",
        device_options={"queue-size": 256, "packed": True, "event_idx": False},
        env={"SUITE_MANY": "10"},
    )
    joined = " ".join(argv)
    assert "-accel tcg" in joined and "-smp 1" in joined and "-m 1G" in joined
    assert "memory-backend-memfd,id=mem,size=1G,share=on" in argv
    assert "socket,id=char0,path=/run/a,,b.sock" in argv  # QEMU doubles commas
    assert "vhost-user-fs-pci,chardev=char0,tag=fs1,queue-size=256,packed=on,event_idx=off" in argv
    assert argv[argv.index("-append") + 1] == (
        "console=ttyS0 quiet panic=-1 VIRTIOFS_TAG=fs1 SUITE_MANY=10"
    )
    with pytest.raises(ValueError):
        runner.command(tmp_path / "i", "/s", env={"X": "two words"})
    with pytest.raises(ValueError):
        runner.command(tmp_path / "i", "/s", tag="a,b")
    with pytest.raises(ValueError):
        runner.command(tmp_path / "i", "/s", device_options={"queue-size": "1,x=y"})


# --- back-end processes -----------------------------------------------------------------------


def test_run_guest_refuses_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no back-end socket"):
        GuestRunner(_fake_kernel(tmp_path)).run("true", tmp_path / "none.sock")


def test_start_backend_timeout_kills_the_process(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(BackendError, match="did not create"):
        start_backend(["sleep", "60"], tmp_path / "s.sock", timeout=0.3)
    assert time.monotonic() - started < 10
    # Killed by PID and reaped: no `sleep` child of ours is left.
    assert subprocess.run(["pgrep", "-P", str(os.getpid()), "-x", "sleep"]).returncode == 1


def test_start_backend_reports_early_exit(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="exited with 3") as info:
        start_backend(["sh", "-c", "echo cannot serve; exit 3"], tmp_path / "s.sock")
    assert "cannot serve" in str(info.value)


# --- booting a guest against QEMU's C virtiofsd ------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.guest
def test_fileops_suite_against_c_virtiofsd(
    guest_runner: GuestRunner, c_virtiofsd: StartVirtiofsd
) -> None:
    shared, sock, _ = c_virtiofsd()
    suite = FileOpsSuite()  # 64 MiB file, 10,000 entries, 4 writers x 100 files
    report = suite.run(sock, shared_dir=shared, runner=guest_runner, timeout=240)
    print(report.describe())
    print({k: v for k, v in report.info.items() if k != "large.sha256"})
    assert report.ok, report.describe()
    assert report.host_checked
    assert set(report.checks) == set(CHECKS)
    allowed_skips = set() if static_helper() else {"xattr"}
    assert set(report.skipped) <= allowed_skips, report.describe()
    # The 64 MiB file the guest wrote, as the host sees it, has the guest's checksum.
    assert (shared / "suite" / "large.bin").stat().st_size == 64 << 20
    assert _sha256(shared / "suite" / "large.bin") == report.info["large.sha256"]
    assert len(os.listdir(shared / "suite" / "many")) == 10_000
    if "xattr" not in report.skipped:
        assert os.getxattr(shared / "suite" / "xattr.txt", "user.keep") == b"kept"


@pytest.mark.guest
def test_fileops_suite_on_debian_6_1_kernel_with_modules(
    guest_tools: None, c_virtiofsd: StartVirtiofsd
) -> None:
    runner = GuestRunner("6.1")
    assert [m.stem for m in runner.kernel.modules][-2:] == ["fuse", "virtiofs"]
    shared, sock, _ = c_virtiofsd()
    report = FileOpsSuite(large_mib=8, many=1000).run(
        sock, shared_dir=shared, runner=runner, timeout=180
    )
    assert report.ok, report.describe()
    assert report.info["kernel"].startswith("6.1.")


# Bits of /sys/bus/virtio/devices/*/features (a string of 0/1, bit 0 first).
_INDIRECT_DESC, _EVENT_IDX, _RING_PACKED = 28, 29, 34

_FEATURES_SCRIPT = r"""
mount -t virtiofs "$VIRTIOFS_TAG" /mnt || exit 10
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat $d/device)" = 0x001a ] && echo "FEATURES $(cat $d/features)"
done
dd if=/dev/urandom of=/mnt/f bs=64k count=16 2>/dev/null || exit 11
sync; echo 3 > /proc/sys/vm/drop_caches
echo "SUM $(sha256sum < /mnt/f)"
umount /mnt || exit 12
"""


@pytest.mark.guest
@pytest.mark.parametrize(
    ("options", "expect_off"),
    [
        ({"queue-size": 1024, "event_idx": False, "indirect_desc": False},
         (_EVENT_IDX, _INDIRECT_DESC)),
        # C virtiofsd does not offer VIRTIO_F_RING_PACKED: packed=on falls back to split rings.
        ({"packed": True}, (_RING_PACKED,)),
    ],
    ids=["qsize1024-noevidx-noindirect", "packed-falls-back"],
)  # fmt: skip
def test_device_options_reach_the_guest(
    guest_runner: GuestRunner,
    c_virtiofsd: StartVirtiofsd,
    options: dict[str, object],
    expect_off: tuple[int, ...],
) -> None:
    shared, sock, _ = c_virtiofsd()
    result = guest_runner.run(
        _FEATURES_SCRIPT, sock, tag="opts", device_options=options, timeout=90
    )
    assert result.ok, result.describe()
    features = next(x.split()[1] for x in result.output_lines if x.startswith("FEATURES "))
    for bit in expect_off:
        assert features[bit] == "0", (bit, features)
    if "event_idx" not in options:
        assert features[_EVENT_IDX] == "1"  # default on: the option is what turned it off
    guest_sum = next(x.split()[1] for x in result.output_lines if x.startswith("SUM "))
    assert guest_sum == _sha256(shared / "f")


@pytest.mark.guest
def test_script_status_output_and_env(
    guest_runner: GuestRunner, c_virtiofsd: StartVirtiofsd
) -> None:
    _, sock, _ = c_virtiofsd()
    lines: list[tuple[str, str]] = []
    result = guest_runner.run(
        'echo "tag=$VIRTIOFS_TAG x=$X"; printf "last"; exit 7',
        sock,
        env={"X": "a.b:c"},
        timeout=60,
        on_line=lambda phase, line: lines.append((phase, line)),
    )
    assert result.exit_status == 7 and not result.ok
    assert result.output_lines == ["tag=myfs x=a.b:c", "last"]
    assert ("script", "last") in lines
    assert result.boot_time is not None and result.script_time is not None
    print(f"boot {result.boot_time:.2f}s, total {result.duration:.2f}s")


@pytest.mark.guest
def test_timeout_kills_qemu(guest_runner: GuestRunner, c_virtiofsd: StartVirtiofsd) -> None:
    _, sock, _ = c_virtiofsd()
    result = guest_runner.run("sleep 600", sock, timeout=3)
    assert result.timed_out and result.exit_status is None
    assert result.duration < 3 + 15
    assert result.qemu_pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(result.qemu_pid, 0)  # killed and reaped
    assert "timed out" in result.describe()


@pytest.mark.guest
def test_run_guest_function_with_one_socket_argument(
    guest_tools: None, c_virtiofsd: StartVirtiofsd
) -> None:
    shared, sock, _ = c_virtiofsd()
    (shared / "from-host").write_text("seen\n")
    result = run_guest(
        'mount -t virtiofs "$VIRTIOFS_TAG" /mnt && cat /mnt/from-host && umount /mnt',
        sock,
        memory="256M",
        timeout=60,
    )
    assert result.ok and result.output_lines == ["seen"], result.describe()
