"""Boot a Linux guest under QEMU (TCG) against a vhost-user-fs back-end, and run a script in it.

The back-end is one argument: :func:`run_guest` takes the vhost-user socket path, whoever
serves it (our backend, QEMU's C virtiofsd through :func:`start_c_virtiofsd`, or any command
through :func:`start_backend`). The back-end must listen before QEMU starts: QEMU connects as
the front-end (GUEST.md).

Every run is bounded by a timeout and QEMU is killed by PID in ``finally``; a wrong back-end
answer usually hangs the guest rather than crashing it, so the timeout is the normal way such a
failure ends (``GuestResult.timed_out``).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import VirtiofsError
from .initramfs import EXIT_MARKER, START_MARKER, build_initramfs, static_helper
from .kernel import GuestKernel, Progress, fetch_kernel

__all__ = [
    "C_VIRTIOFSD",
    "BackendError",
    "BackendProcess",
    "ConsoleParser",
    "GuestError",
    "GuestResult",
    "GuestRunner",
    "LineCallback",
    "missing_tools",
    "run_guest",
    "start_backend",
    "start_c_virtiofsd",
]

#: QEMU's C virtiofsd as packaged by Debian (``qemu-system-common``).
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
QEMU = "qemu-system-x86_64"

#: ``on_line(phase, text)``: phase is ``"boot"`` (BIOS and kernel before the script),
#: ``"script"`` (the script's output) or ``"after"`` (after the exit marker: power-off).
LineCallback = Callable[[str, str], None]

# SeaBIOS clears the screen and positions the cursor with ANSI sequences on the serial port.
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c|[()][A-Z0-9])")
# SeaBIOS may end with "Booting from ROM.." and no newline, gluing the guest's first line to it;
# a line that is only the BIOS message is left alone.
_BIOS_PREFIX = re.compile(r"^Booting from ROM\.{2,3}(?=[^.])")
_EXIT_RE = re.compile(re.escape(EXIT_MARKER) + r" (\d+)")
# Words of the kernel command line that init receives as environment variables.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_VALUE = re.compile(r"[A-Za-z0-9_./:@%+,=-]*")
# virtio_fs_config.tag is 36 bytes; a comma would split QEMU's option string.
_TAG = re.compile(r"[A-Za-z0-9_.:@+-]{1,36}")


class GuestError(VirtiofsError):
    """The guest could not run, or its script failed (see :meth:`GuestResult.check`)."""


class BackendError(VirtiofsError):
    """A back-end process exited or did not create its socket in time."""


class ConsoleParser:
    """Split QEMU's serial output into boot lines, script output and the exit status.

    Feed raw bytes as they arrive; ``\\r`` and ANSI sequences are removed, the SeaBIOS
    ``Booting from ROM..`` prefix is stripped from the line it is glued to (the line is kept),
    and the markers printed by the initramfs' ``/init`` delimit the script's output. A marker
    may also follow text without a newline (a script whose last line has none).
    """

    def __init__(
        self,
        on_line: LineCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.boot_lines: list[str] = []
        self.output_lines: list[str] = []
        self.after_lines: list[str] = []
        self.exit_status: int | None = None
        #: ``clock()`` when the start marker was seen (boot finished).
        self.started_at: float | None = None
        #: ``clock()`` when the exit marker was seen.
        self.finished_at: float | None = None
        self._on_line = on_line
        self._clock = clock
        self._partial = b""

    @property
    def phase(self) -> str:
        """``"boot"``, ``"script"`` or ``"after"``."""
        if self.started_at is None:
            return "boot"
        return "script" if self.exit_status is None else "after"

    def feed(self, data: bytes) -> None:
        """Consume console bytes; complete lines are parsed at once."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            self._line(raw)

    def close(self) -> None:
        """Parse a last line without newline (QEMU killed mid-line)."""
        if self._partial:
            raw, self._partial = self._partial, b""
            self._line(raw)

    def feed_lines(self, lines: Sequence[str]) -> None:
        """Parse already split text lines (tests, replayed logs)."""
        for line in lines:
            self._line(line.encode())

    def _emit(self, phase: str, text: str) -> None:
        {"boot": self.boot_lines, "script": self.output_lines, "after": self.after_lines}[
            phase
        ].append(text)
        if self._on_line is not None:
            self._on_line(phase, text)

    def _line(self, raw: bytes) -> None:
        text = _ANSI.sub("", raw.decode("utf-8", "replace").replace("\r", ""))
        text = _BIOS_PREFIX.sub("", text)
        if self.started_at is None:
            before, marker, rest = text.partition(START_MARKER)
            if not marker:
                self._emit("boot", text)
                return
            if before.strip():
                self._emit("boot", before)
            self.started_at = self._clock()
            text = rest
            if not text:
                return
        if self.exit_status is None:
            m = _EXIT_RE.search(text)
            if m is None:
                self._emit("script", text)
                return
            if text[: m.start()]:
                self._emit("script", text[: m.start()])
            self.exit_status = int(m.group(1))
            self.finished_at = self._clock()
            text = text[m.end() :].strip()
            if not text:
                return
        self._emit("after", text)


@dataclass
class GuestResult:
    """What a guest run produced.

    ``exit_status`` is the script's status, or None when the exit marker never came (timeout,
    kernel panic, QEMU error: see ``timed_out``, ``boot_lines``, ``qemu_stderr``).
    ``duration`` is the wall time from QEMU start to its exit (or kill); ``boot_time`` the part
    before the script started; ``script_time`` the script itself.
    """

    exit_status: int | None
    output_lines: list[str]
    duration: float
    boot_time: float | None = None
    script_time: float | None = None
    timed_out: bool = False
    boot_lines: list[str] = field(default_factory=list)
    after_lines: list[str] = field(default_factory=list)
    qemu_returncode: int | None = None
    qemu_stderr: str = ""
    argv: list[str] = field(default_factory=list)
    qemu_pid: int | None = None

    @property
    def ok(self) -> bool:
        """The script ran to its end with status 0."""
        return self.exit_status == 0

    def describe(self) -> str:
        """A few lines saying how the run ended, for assertion messages."""
        if self.exit_status is not None:
            head = f"script exited with {self.exit_status} after {self.duration:.1f}s"
        elif self.timed_out:
            head = f"guest timed out after {self.duration:.1f}s (phase: " + (
                "boot)" if self.boot_time is None else "script)"
            )
        else:
            head = f"QEMU exited ({self.qemu_returncode}) without the exit marker"
        tail = (self.output_lines or self.boot_lines)[-15:]
        parts = [head, *("  | " + line for line in tail)]
        if self.qemu_stderr.strip():
            parts.append("  qemu stderr: " + self.qemu_stderr.strip()[-1500:])
        return "\n".join(parts)

    def check(self) -> GuestResult:
        """Return self when the script exited 0, else raise :class:`GuestError`."""
        if not self.ok:
            raise GuestError(self.describe())
        return self


def _qemu_value(value: str) -> str:
    # QEMU option values escape a comma by doubling it.
    return value.replace(",", ",,")


def _device_option(key: str, value: object) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
        raise ValueError(f"bad vhost-user-fs-pci property name {key!r}")
    if isinstance(value, bool):
        text = "on" if value else "off"
    else:
        text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise ValueError(f"bad value {value!r} for device property {key}")
    return f",{key}={text}"


class GuestRunner:
    """Boots guests with one kernel and one QEMU configuration.

    ``kernel`` is a :class:`GuestKernel` or a series for :func:`fetch_kernel` (fetched on first
    use, with ``progress`` messages). ``helpers`` adds the statically compiled
    ``/bin/vfs-xattr`` to the initramfs when a C compiler is available.
    """

    def __init__(
        self,
        kernel: GuestKernel | str = "6.12",
        *,
        qemu: str = QEMU,
        memory: str = "512M",
        smp: int = 1,
        cache: Path | None = None,
        progress: Progress | None = None,
        helpers: bool = True,
        extra_qemu_args: Sequence[str] = (),
    ) -> None:
        self._kernel = kernel
        self.qemu = qemu
        self.memory = memory
        self.smp = smp
        self.cache = cache
        self.progress = progress
        self.helpers = helpers
        self.extra_qemu_args = list(extra_qemu_args)

    @property
    def kernel(self) -> GuestKernel:
        """The guest kernel (fetched and cached on first access)."""
        if not isinstance(self._kernel, GuestKernel):
            self._kernel = fetch_kernel(self._kernel, cache=self.cache, progress=self.progress)
        return self._kernel

    def initramfs(self, script: str) -> Path:
        """The (cached) initramfs running ``script`` with this runner's kernel modules."""
        extra: dict[str, Path | bytes] = {}
        if self.helpers:
            xattr = static_helper("vfs-xattr", cache=self.cache)
            if xattr is not None:
                extra["/bin/vfs-xattr"] = xattr
        return build_initramfs(
            script, modules=self.kernel.modules, extra_files=extra, cache=self.cache
        )

    def command(
        self,
        initrd: Path,
        socket_path: str | os.PathLike[str],
        *,
        tag: str = "myfs",
        device_options: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        memory: str | None = None,
    ) -> list[str]:
        """The QEMU command line (GUEST.md's recipe) for one run."""
        if not _TAG.fullmatch(tag):
            raise ValueError(f"bad virtio-fs tag {tag!r} (1-36 characters, no comma or space)")
        mem = memory or self.memory
        if not re.fullmatch(r"\d+[MG]", mem):
            raise ValueError(f"bad memory size {mem!r} (like 512M or 1G)")
        words = ["console=ttyS0", "quiet", "panic=-1"]
        for name, value in {"VIRTIOFS_TAG": tag, **(env or {})}.items():
            if not _ENV_NAME.fullmatch(name) or not _ENV_VALUE.fullmatch(value):
                raise ValueError(f"guest env {name}={value!r}: use [A-Za-z0-9_./:@%+,=-] only")
            words.append(f"{name}={value}")
        device = f"vhost-user-fs-pci,chardev=char0,tag={tag}" + "".join(
            _device_option(k, v) for k, v in (device_options or {}).items()
        )
        return [
            self.qemu,
            "-accel", "tcg",
            "-smp", str(self.smp),
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=char0,path={_qemu_value(os.fspath(socket_path))}",
            "-device", device,
            "-nographic", "-no-reboot",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(initrd),
            "-append", " ".join(words),
            *self.extra_qemu_args,
        ]  # fmt: skip

    def run(
        self,
        script: str,
        socket_path: str | os.PathLike[str],
        *,
        tag: str = "myfs",
        device_options: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        memory: str | None = None,
        timeout: float = 120.0,
        on_line: LineCallback | None = None,
    ) -> GuestResult:
        """Boot, run ``script`` (busybox ash) in the guest, power off; never longer than ``timeout``.

        ``env`` values reach the script as environment variables (``VIRTIOFS_TAG`` is always
        set to ``tag``); ``device_options`` are extra ``vhost-user-fs-pci`` properties such as
        ``{"queue-size": 256, "packed": True, "num-request-queues": 2, "event_idx": False}``.
        """
        if not os.path.exists(socket_path):
            raise BackendError(f"{os.fspath(socket_path)}: no back-end socket (start it first)")
        initrd = self.initramfs(script)
        argv = self.command(
            initrd, socket_path, tag=tag, device_options=device_options, env=env, memory=memory
        )
        return _run_qemu(argv, timeout=timeout, on_line=on_line)


def _run_qemu(argv: list[str], *, timeout: float, on_line: LineCallback | None) -> GuestResult:
    parser = ConsoleParser(on_line)
    stderr = bytearray()
    start = time.monotonic()
    deadline = start + timeout
    timed_out = False
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            open_streams = 2
            while open_streams:
                now = time.monotonic()
                if parser.finished_at is not None:
                    # After the exit marker only power-off remains; don't wait long on it.
                    deadline = min(deadline, parser.finished_at + 15.0)
                if now >= deadline:
                    timed_out = parser.exit_status is None
                    break
                for key, _ in sel.select(timeout=min(1.0, deadline - now)):
                    stream: IO[bytes] = key.fileobj  # type: ignore[assignment]
                    chunk = os.read(stream.fileno(), 65536)
                    if not chunk:
                        sel.unregister(stream)
                        open_streams -= 1
                    elif key.data == "out":
                        parser.feed(chunk)
                    else:
                        stderr += chunk[: max(0, 65536 - len(stderr))]
        parser.close()
        if not timed_out:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL to this PID only
        try:
            proc.wait(timeout=10)
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    end = time.monotonic()
    started, finished = parser.started_at, parser.finished_at
    return GuestResult(
        exit_status=parser.exit_status,
        output_lines=parser.output_lines,
        duration=end - start,
        boot_time=None if started is None else started - start,
        script_time=None if started is None or finished is None else finished - started,
        timed_out=timed_out,
        boot_lines=parser.boot_lines,
        after_lines=parser.after_lines,
        qemu_returncode=proc.returncode,
        qemu_stderr=stderr.decode("utf-8", "replace"),
        argv=argv,
        qemu_pid=proc.pid,
    )


def run_guest(
    script: str,
    socket_path: str | os.PathLike[str],
    *,
    tag: str = "myfs",
    memory: str = "512M",
    device_options: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    kernel: GuestKernel | str = "6.12",
    on_line: LineCallback | None = None,
    progress: Progress | None = None,
) -> GuestResult:
    """Boot a guest against the vhost-user-fs back-end at ``socket_path`` and run ``script``.

    The script runs under busybox ash as root with the virtio-fs device present but not
    mounted; ``mount -t virtiofs "$VIRTIOFS_TAG" /mnt`` mounts it. See :class:`GuestRunner`.
    """
    runner = GuestRunner(kernel, memory=memory, progress=progress)
    return runner.run(
        script,
        socket_path,
        tag=tag,
        device_options=device_options,
        env=env,
        timeout=timeout,
        on_line=on_line,
    )


# ---------------------------------------------------------------------------------------------
# Back-end processes


class BackendProcess:
    """A vhost-user back-end process serving ``socket_path``, stopped by PID.

    Use as a context manager (or call :meth:`stop`): SIGTERM, then SIGKILL after a grace
    period, then the socket is removed. Its stdout and stderr go to a temporary log file
    (never a pipe nobody reads), available through :meth:`output`.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        socket_path: Path,
        log: IO[bytes],
        argv: list[str],
    ) -> None:
        self.popen = popen
        self.socket_path = socket_path
        self.argv = argv
        self._log = log

    @property
    def pid(self) -> int:
        """The back-end's process id."""
        return self.popen.pid

    def output(self) -> str:
        """Everything the back-end printed so far (stdout and stderr, interleaved)."""
        if self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def _proc_stat(self) -> list[bytes] | None:
        if self.popen.returncode is not None:
            return None  # reaped: /proc no longer has it
        try:
            with open(f"/proc/{self.popen.pid}/stat", "rb") as f:
                # Split after the command name, which may contain spaces; [0] is field 3.
                return f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return None

    def cpu_seconds(self) -> float | None:
        """CPU time (user+system) of the process and its reaped children, from /proc.

        Children count because C virtiofsd's namespace sandbox forks and serves in the
        child. Readable once the process has exited on its own (C virtiofsd does when QEMU
        goes away, see :meth:`wait_exited`) until :meth:`stop` reaps it; None after that.
        """
        fields = self._proc_stat()
        if fields is None:
            return None
        # utime, stime, cutime, cstime are fields 14-17 of proc(5).
        ticks = sum(int(x) for x in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")

    def wait_exited(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until the process has exited, without reaping it."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self._proc_stat()
            if fields is None or fields[0] in (b"Z", b"X"):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process (SIGTERM, SIGKILL after ``timeout``), remove the socket.

        Returns the exit status (negative signal number when killed by a signal).
        """
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=10)
        finally:
            _remove_socket(self.socket_path)
        return self.popen.returncode

    def close(self) -> None:
        """Stop the process and drop its log."""
        try:
            self.stop()
        finally:
            self._log.close()

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def start_backend(
    argv: Sequence[str],
    socket_path: str | os.PathLike[str],
    *,
    timeout: float = 10.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> BackendProcess:
    """Start a back-end command and return once it listens on ``socket_path``.

    A stale socket at that path is removed first. The socket is only checked for existence,
    never connected to: C virtiofsd serves exactly one connection and would take a probe for
    QEMU. Raises :class:`BackendError` (with the process output) if the process exits first or
    the socket does not appear within ``timeout``; the process is then killed.
    """
    sock = Path(socket_path)
    if sock.exists() or sock.is_symlink():
        if not stat.S_ISSOCK(os.lstat(sock).st_mode):
            raise BackendError(f"{sock} exists and is not a socket")
        sock.unlink()
    log = tempfile.TemporaryFile(prefix="virtiofs-backend-")
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=full_env, cwd=cwd
    )
    backend = BackendProcess(proc, sock, log, list(argv))
    deadline = time.monotonic() + timeout
    try:
        delay = 0.002
        while True:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(sock).st_mode):
                    return backend
            if proc.poll() is not None:
                raise BackendError(
                    f"{argv[0]} exited with {proc.returncode} before creating {sock}:\n"
                    + backend.output()[-3000:]
                )
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"{argv[0]} did not create {sock} within {timeout}s:\n"
                    + backend.output()[-3000:]
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    except BaseException:
        backend.close()
        raise


def start_c_virtiofsd(
    shared_dir: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    *,
    cache: str = "auto",
    xattr: bool = True,
    options: Sequence[str] = (),
    binary: str = C_VIRTIOFSD,
    timeout: float = 10.0,
) -> BackendProcess:
    """Start QEMU's C virtiofsd serving ``shared_dir`` (the reference back-end).

    It serves one QEMU connection and exits when QEMU goes away: start one per guest run.
    ``options`` are extra ``-o`` values (``"writeback"``, ``"flock"``, ...). Do not combine
    with ``num-request-queues`` > 1: QEMU 7.2's C virtiofsd crashes on it (GUEST.md).
    """
    argv = [binary, f"--socket-path={os.fspath(socket_path)}", "-o", f"source={shared_dir}"]
    argv += ["-o", f"cache={cache}"]
    if xattr:
        argv += ["-o", "xattr"]
    for opt in options:
        argv += ["-o", opt]
    return start_backend(argv, socket_path, timeout=timeout)


def missing_tools(*, virtiofsd: bool = True) -> list[str]:
    """What the guest harness needs and this host lacks (empty when all is there)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt-get install qemu-system-x86)")
    if virtiofsd and not os.access(C_VIRTIOFSD, os.X_OK):
        missing.append(f"{C_VIRTIOFSD} (apt-get install qemu-system-common)")
    from .initramfs import InitramfsError, find_static_busybox

    try:
        find_static_busybox()
    except InitramfsError:
        missing.append("static busybox (apt-get install busybox-static)")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        missing.append("apt-get and dpkg-deb (to fetch the guest kernel)")
    return missing
