"""A QEMU guest for tests and the demo: the vmha guest image booted with its virtio-serial ports.

`GuestVM` starts `qemu-system-x86_64` (TCG; KVM only when `VMHA_QEMU_KVM=1`) with two
virtio-serial ports, each a unix socket on the host where QEMU listens:
- the messaging port (`vmha.messaging` by default): the socket the node agent connects to
  (in a directory of the test's choosing with `channel_socket`, e.g. where a node agent
  looks for a virt-launcher's socket);
- `vmha.testctl`: the guest's test-control service, which runs shell commands (`run`).
and a QMP monitor socket, through which `migrate` live-migrates the running guest into a new
QEMU process, as KubeVirt moves a VM from one virt-launcher to another.

QEMU never outlives its owner (`vmha_testbed.children`: own session, killed by the kernel when
the test process dies), and an atexit hook kills any guest still running.
Environment: VMHA_QEMU_KVM=1 uses KVM (`-cpu host`), VMHA_QEMU_CPU overrides the
CPU model (TCG default `max`), VMHA_QEMU the QEMU binary.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from vmha_testbed import children
from vmha_testbed.guestimage import GuestImage

KVM_ENV = "VMHA_QEMU_KVM"
QEMU_ENV = "VMHA_QEMU"
CPU_ENV = "VMHA_QEMU_CPU"
DEFAULT_PORT = "vmha.messaging"
TESTCTL_PORT = "vmha.testctl"
READY_MARKER = "VMHA-GUEST-READY"
GUEST_CONFIG_PATH = "etc/vmha/guest.toml"
# Boot under TCG on a loaded 2-core machine takes tens of seconds; be generous.
DEFAULT_READY_TIMEOUT = 300.0
# Added to a command's own timeout while waiting for its answer (the guest may be slow).
TESTCTL_GRACE = 30.0
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
MAX_SOCKET_PATH = 100
MAX_SUN_PATH = 107
# Copying 256 MiB between two local QEMUs takes about a second; TCG on a busy machine longer.
MIGRATION_TIMEOUT = 120.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_RESPONSE = re.compile(rb"@@VMHA-TESTCTL (BEGIN|END) (\d+)(?: (-?\d+))?")


class GuestVMError(RuntimeError):
    """QEMU failed, exited, or the guest did not behave as a booted vmha guest should."""


class GuestCommandError(GuestVMError):
    """A command run in the guest exited non-zero."""

    def __init__(self, command: str, returncode: int, output: str) -> None:
        super().__init__(f"guest command {command!r} exited {returncode}: {output.strip()}")
        self.command = command
        self.returncode = returncode
        self.output = output


def kvm_requested() -> bool:
    return os.environ.get(KVM_ENV, "").lower() in ("1", "true", "yes", "on")


class GuestVM:
    """One QEMU guest booted from a `GuestImage`; use it as a context manager.

    `config` is the guest daemon's TOML config (written to /etc/vmha/guest.toml);
    `files` adds or replaces other guest files (guest path → content), e.g.
    `/etc/default/vmha-guest` with `VMHA_GUEST_ARGS="--log-level debug"`.
    `channel_socket`: where QEMU listens for the messaging port (its directory must exist;
    at most 107 bytes); by default a socket next to the test-control one.
    """

    def __init__(
        self,
        image: GuestImage,
        name: str,
        *,
        config: str | None = None,
        files: Mapping[str, str | bytes] | None = None,
        port_name: str = DEFAULT_PORT,
        workdir: Path | None = None,
        memory_mb: int = 256,
        kvm: bool | None = None,
        kernel_args: Sequence[str] = (),
        channel_socket: Path | None = None,
    ) -> None:
        if not _NAME.fullmatch(name) or not _NAME.fullmatch(port_name):
            raise ValueError(f"not usable as a hostname/port name: {name!r}, {port_name!r}")
        if channel_socket is not None and len(os.fsencode(channel_socket)) > MAX_SUN_PATH:
            raise ValueError(f"longer than a unix socket address: {channel_socket}")
        self.image = image
        self.name = name
        self.port_name = port_name
        self.memory_mb = memory_mb
        self.kvm = kvm_requested() if kvm is None else kvm
        self._files: dict[str, str | bytes] = {"etc/hostname": f"{name}\n"}
        if config is not None:
            self._files[GUEST_CONFIG_PATH] = config
        self._files.update({path.lstrip("/"): content for path, content in (files or {}).items()})
        self._kernel_args = tuple(kernel_args)
        self._owned_dirs: list[Path] = []
        self.workdir = workdir or self._temporary_dir(f"vmha-{name}-")
        self.workdir.mkdir(parents=True, exist_ok=True)
        socket_dir = self.workdir
        if len(str(socket_dir / "testctl.sock")) > MAX_SOCKET_PATH:
            socket_dir = self._temporary_dir("vmha-sock-")
        self.channel_socket = channel_socket or socket_dir / f"{name}.{port_name}.sock"
        self.testctl_socket = socket_dir / f"{name}.testctl.sock"
        self.qmp_socket = socket_dir / f"{name}.qmp.sock"
        self.console_log = self.workdir / f"{name}.console.log"
        self.qemu_log = self.workdir / f"{name}.qemu.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._testctl: _TestControlClient | None = None
        self._testctl_lock = threading.Lock()
        self.paused = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> GuestVM:
        try:
            self.start()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        self._launch(incoming=None)

    def _launch(self, incoming: Path | None) -> None:
        """Start QEMU: booting, or (`incoming`) waiting for a migration on that socket."""
        if self._process is not None:
            raise GuestVMError(f"{self.name} already started")
        for path in (self.channel_socket, self.testctl_socket, self.qmp_socket, incoming):
            if path is not None:
                path.unlink(missing_ok=True)
        initrd = self.image.initrd_with(self._files, self.workdir / f"{self.name}.initrd.img")
        command = self.qemu_command(initrd, incoming=incoming)
        with self.qemu_log.open("wb") as qemu_output:
            self._process = children.spawn(command, output=qemu_output)
        self._started_at = time.monotonic()
        _LIVE.add(self)
        try:
            self._wait_for_sockets(extra=() if incoming is None else (incoming,))
        except BaseException:
            self.kill()
            raise

    def qemu_command(self, initrd: Path, *, incoming: Path | None = None) -> list[str]:
        cpu = os.environ.get(CPU_ENV) or ("host" if self.kvm else "max")
        accel = ["-accel", "kvm" if self.kvm else "tcg", "-cpu", cpu]
        append = [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            f"vmha.hostname={self.name}",
            f"vmha.ports={self.port_name},{TESTCTL_PORT}",
            *self._kernel_args,
        ]
        return [
            os.environ.get(QEMU_ENV, "qemu-system-x86_64"),
            *("-name", f"vmha-{self.name}", "-nodefaults", "-no-user-config"),
            *accel,
            *("-m", str(self.memory_mb), "-smp", "1"),
            *("-display", "none", "-no-reboot"),
            *("-chardev", f"file,id=console,path={_qemu_value(self.console_log)}"),
            *("-serial", "chardev:console"),
            *("-kernel", str(self.image.kernel), "-initrd", str(initrd)),
            *("-append", " ".join(append)),
            *("-device", "virtio-rng-pci", "-device", "virtio-serial-pci,id=vser0"),
            *self._port_options("messaging", self.channel_socket, self.port_name),
            *self._port_options("testctl", self.testctl_socket, TESTCTL_PORT),
            *("-qmp", f"unix:{_qemu_value(self.qmp_socket)},server=on,wait=off"),
            *(("-incoming", f"unix:{_qemu_value(incoming)}") if incoming else ()),
        ]

    @staticmethod
    def _port_options(chardev: str, path: Path, port: str) -> list[str]:
        return [
            "-chardev",
            f"socket,id={chardev},path={_qemu_value(path)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={chardev},name={port}",
        ]

    def _wait_for_sockets(self, timeout: float = 30.0, extra: Sequence[Path] = ()) -> None:
        sockets = (self.channel_socket, self.testctl_socket, self.qmp_socket, *extra)
        deadline = time.monotonic() + timeout
        while not all(path.exists() for path in sockets):
            self._raise_if_exited("while starting")
            if time.monotonic() > deadline:
                raise GuestVMError(f"{self.name}: QEMU created no sockets in {timeout:.0f} s")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> float:
        """Wait for the boot to finish and the test-control port to answer; seconds since start."""
        self.wait_console(re.escape(READY_MARKER), timeout)
        remaining = max(10.0, self._started_at + timeout - time.monotonic())
        self.check("true", timeout=remaining)
        return time.monotonic() - self._started_at

    def wait_console(self, pattern: str, timeout: float, offset: int = 0) -> str:
        """Wait until the console log (from byte `offset`) has a line matching regex `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text(offset)
            for line in text.splitlines():
                if regex.search(line):
                    return line
            self._raise_if_exited(f"while waiting for {pattern!r} on the console")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no {pattern!r} on the console in {timeout:.0f} s; "
                    f"console tail:\n{self.console_text()[-3000:]}"
                )
            time.sleep(0.2)

    def console_text(self, offset: int = 0) -> str:
        try:
            with self.console_log.open("rb") as console:
                console.seek(offset)
                return console.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def console_size(self) -> int:
        """The console log's current length: pass it as `offset` to wait for new lines only."""
        try:
            return self.console_log.stat().st_size
        except FileNotFoundError:
            return 0

    def pause(self) -> None:
        """Freeze the whole VM (SIGSTOP of QEMU): to the node agent, a hung guest.

        Returns once the kernel reports QEMU stopped (signals are delivered asynchronously).
        """
        pid = self._require_pid()
        os.kill(pid, signal.SIGSTOP)
        self._wait_for_state(pid, stopped=True)
        self.paused = True

    def resume(self) -> None:
        pid = self._require_pid()
        os.kill(pid, signal.SIGCONT)
        self._wait_for_state(pid, stopped=False)
        self.paused = False

    def _wait_for_state(self, pid: int, *, stopped: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (_process_state(pid) in ("T", "t")) != stopped:
            if time.monotonic() > deadline:
                raise GuestVMError(f"{self.name}: QEMU not {'stopped' if stopped else 'running'}")
            time.sleep(0.01)

    def migrate(
        self, channel_socket: Path | None = None, *, timeout: float = MIGRATION_TIMEOUT
    ) -> GuestVM:
        """Live-migrate the running guest into a new QEMU process and return that one.

        As KubeVirt moves a VM between virt-launchers: the target QEMU starts with the same
        machine and `-incoming`, the source QEMU sends it the guest's memory and device
        state over a unix socket (QMP `migrate`), the target runs on and the source ends.
        The guest does not restart (same kernel, processes and boot id); only the host ends
        of its ports are new: the target's messaging port listens at `channel_socket`.
        This object has no QEMU afterwards (close it to remove its files).
        """
        if self.paused:
            raise GuestVMError(f"{self.name}: a stopped QEMU cannot send its state")
        self._require_pid()
        target = GuestVM(
            self.image,
            self.name,
            files=self._files,
            port_name=self.port_name,
            memory_mb=self.memory_mb,
            kvm=self.kvm,
            kernel_args=self._kernel_args,
            channel_socket=channel_socket,
        )
        incoming = target.qmp_socket.with_name(f"{self.name}.incoming.sock")
        try:
            target._launch(incoming=incoming)
            deadline = time.monotonic() + timeout
            with _QmpClient(self.qmp_socket, timeout) as source:
                source.execute("migrate", uri=f"unix:{incoming}")
                self._wait_migrated(source, deadline)
            with _QmpClient(target.qmp_socket, timeout) as running:
                while running.execute("query-status").get("status") != "running":
                    if time.monotonic() > deadline:
                        raise GuestVMError(f"{self.name}: the migrated guest does not run")
                    time.sleep(0.05)
        except BaseException:
            target.close()
            raise
        self.stop()  # paused after the migration, as the source virt-launcher's QEMU is
        target._started_at = self._started_at
        return target

    def _wait_migrated(self, source: _QmpClient, deadline: float) -> None:
        while True:
            info = source.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise GuestVMError(f"{self.name}: migration {status}: {info.get('error-desc')}")
            if time.monotonic() > deadline:
                source.execute("migrate_cancel")
                raise GuestVMError(f"{self.name}: migration not done in time ({status})")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL QEMU: to the node agent, a crashed VM."""
        if self._process is not None:
            children.kill(self._process)
        self.paused = False
        self._close_testctl()

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate QEMU (SIGTERM, SIGKILL after `timeout`); a no-op once it has exited."""
        if self._process is not None:
            children.stop(self._process, timeout)
        self.paused = False
        self._close_testctl()

    def close(self) -> None:
        """Stop QEMU and remove the temporary directories this object created."""
        self.stop()
        _LIVE.discard(self)
        for directory in self._owned_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------------ test control

    def run(
        self, command: str, timeout: float = 60.0, *, grace: float = TESTCTL_GRACE
    ) -> tuple[int, str]:
        """Run `command` with `sh -c` in the guest; (exit code, stdout and stderr together).

        The guest kills the command after `timeout` seconds (exit code 137); the host gives
        up `grace` seconds later with TimeoutError (a late answer is then skipped).
        """
        with self._testctl_lock:
            if self._testctl is None:
                self._raise_if_exited("before running a command")
                self._testctl = _TestControlClient(self.testctl_socket)
            try:
                return self._testctl.run(command, timeout, grace)
            except OSError:
                self._close_testctl()  # a broken connection is opened anew next time
                raise

    def check(self, command: str, timeout: float = 60.0) -> str:
        """Like `run`, but raise GuestCommandError unless the command exits 0; its output."""
        returncode, output = self.run(command, timeout)
        if returncode != 0:
            raise GuestCommandError(command, returncode, output)
        return output

    async def run_async(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        return await asyncio.to_thread(self.run, command, timeout)

    async def check_async(self, command: str, timeout: float = 60.0) -> str:
        return await asyncio.to_thread(self.check, command, timeout)

    # ------------------------------------------------------------------ helpers

    def _temporary_dir(self, prefix: str) -> Path:
        directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self._owned_dirs.append(directory)
        return directory

    def _require_pid(self) -> int:
        if not self.is_running:
            raise GuestVMError(f"{self.name}: QEMU is not running")
        assert self._process is not None
        return self._process.pid

    def _raise_if_exited(self, doing: str) -> None:
        if self._process is not None and self._process.poll() is not None:
            qemu_output = self.qemu_log.read_text(errors="replace")[-2000:]
            raise GuestVMError(
                f"{self.name}: QEMU exited ({self._process.returncode}) {doing}; "
                f"QEMU said:\n{qemu_output}\nconsole tail:\n{self.console_text()[-3000:]}"
            )

    def _close_testctl(self) -> None:
        client, self._testctl = self._testctl, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"GuestVM({self.name!r}, pid={self.pid}, workdir={str(self.workdir)!r})"


class _TestControlClient:
    """The host side of the guest's vmha-testctl service (framing in guest_files/vmha-testctl)."""

    _ids = itertools.count(1)

    def __init__(self, path: Path) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(str(path))
        self._buffer = b""

    def run(self, command: str, timeout: float, grace: float) -> tuple[int, str]:
        request_id = next(self._ids)
        encoded = base64.b64encode(command.encode()).decode()
        guest_timeout = max(1, math.ceil(timeout))
        self._socket.sendall(f"{request_id} {guest_timeout} {encoded}\n".encode())
        deadline = time.monotonic() + timeout + grace
        output: list[bytes] | None = None
        while True:
            line = self._read_line(deadline, command)
            match = _RESPONSE.fullmatch(line)
            if match is None:
                if output is not None:
                    output.append(line)
                continue  # also the rest of an answer we gave up on earlier
            if int(match.group(2)) != request_id:
                continue
            if match.group(1) == b"BEGIN":
                output = []
            elif output is not None:
                text = base64.b64decode(b"".join(output)).decode(errors="replace")
                return int(match.group(3)), text

    def _read_line(self, deadline: float, command: str) -> bytes:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"guest command {command!r}: no answer from vmha-testctl")
            self._socket.settimeout(remaining)
            try:
                chunk = self._socket.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError("vmha-testctl connection closed (QEMU exited?)")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def close(self) -> None:
        self._socket.close()


class _QmpClient:
    """A QEMU Machine Protocol connection (JSON lines over the monitor's unix socket)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout)
        self._socket.connect(str(path))
        self._stream = self._socket.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> dict[str, Any]:
        request = {"execute": command, "arguments": arguments}
        self._stream.write(json.dumps(request).encode() + b"\n")
        self._stream.flush()
        while True:
            answer = self._read()
            if "error" in answer:
                raise GuestVMError(f"QMP {command}: {answer['error'].get('desc')}")
            if "return" in answer:
                result = answer["return"]
                return result if isinstance(result, dict) else {}
            # anything else is an asynchronous event (STOP, RESUME, ...): not needed here

    def _read(self) -> dict[str, Any]:
        line = self._stream.readline()
        if not line:
            raise GuestVMError("QMP connection closed (QEMU exited?)")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        self._stream.close()
        self._socket.close()

    def __enter__(self) -> _QmpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BootGuests(Protocol):
    """The signature of `boot_guests` with the image and directory bound (a test fixture)."""

    def __call__(
        self,
        configs: Sequence[str | None],
        *,
        names: Sequence[str] | None = None,
        port_name: str = DEFAULT_PORT,
        files: Mapping[str, str | bytes] | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        channel_sockets: Sequence[Path | None] | None = None,
    ) -> list[GuestVM]: ...


def boot_guests(
    image: GuestImage,
    workdir: Path,
    configs: Sequence[str | None],
    *,
    names: Sequence[str] | None = None,
    port_name: str = DEFAULT_PORT,
    files: Mapping[str, str | bytes] | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    channel_sockets: Sequence[Path | None] | None = None,
) -> list[GuestVM]:
    """Start one guest per config at once, then wait until all are ready.

    `names` default to guest-1, guest-2, ...; each guest gets `workdir/<name>/`.
    `channel_sockets`, one per config, place the messaging sockets (see `GuestVM`). On any
    failure every guest started here is closed again. The caller closes the returned guests.
    """
    names = list(names or [f"guest-{index}" for index in range(1, len(configs) + 1)])
    sockets = list(channel_sockets or [None] * len(configs))
    if not len(names) == len(sockets) == len(configs):
        raise ValueError("one name and one channel socket per config")
    guests: list[GuestVM] = []
    try:
        for name, config, channel_socket in zip(names, configs, sockets, strict=True):
            guest = GuestVM(
                image,
                name,
                config=config,
                files=files,
                port_name=port_name,
                workdir=workdir / name,
                channel_socket=channel_socket,
            )
            guests.append(guest)
            guest.start()
        for guest in guests:
            guest.wait_ready(ready_timeout)
    except BaseException:
        for guest in guests:
            guest.close()
        raise
    return guests


def _process_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat ("" once the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rpartition(")")[2].split()[0]


def _qemu_value(path: Path) -> str:
    """A path as a value in a QEMU option list, where a comma is written twice."""
    return str(path).replace(",", ",,")


_LIVE: set[GuestVM] = set()  # started and not closed yet


@atexit.register
def _kill_leftovers() -> None:
    for vm in list(_LIVE):
        vm.kill()
