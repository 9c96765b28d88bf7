"""The virtio-serial port: finding it, and opening it with pyserial-asyncio.

The rest of the daemon sees only the `Port` interface (open → an asyncio transport
driving an asyncio protocol), so tests can run it over a pty or a socket pair.

Behaviour of the guest device (PROTOCOL.md §1) that shapes this module: while the host
side is not connected, `read()` returns 0 and `poll()` reports POLLHUP (so the fd is
always "readable"), and a non-blocking `write()` fails with EAGAIN. Data the host sent
before it went away is still read first. We turn "host absent" into a lost connection;
the daemon then closes the port and reopens it after a backoff, so nothing spins on a
permanently readable fd.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import serial
import serial_asyncio

DEFAULT_PORT_NAMES: Final = ("vmha.messaging", "cgcs.messaging")


class PortUnavailable(Exception):
    """The port cannot be opened now (missing, busy, …); the daemon retries later."""


class Port(Protocol):
    """Where the daemon's byte stream to the host comes from."""

    def describe(self) -> str: ...

    async def open(self, protocol: asyncio.Protocol) -> asyncio.Transport:
        """Open the port and drive `protocol` with it; raise PortUnavailable if not now."""
        ...


def resolve_port(
    spec: str | None, *, dev_root: Path = Path("/dev"), sys_root: Path = Path("/sys")
) -> Path | None:
    """The device path for a port name or absolute path; None when no such port exists.

    A name is looked up as the udev link `/dev/virtio-ports/<name>`, then (in a guest
    without udev) through `/sys/class/virtio-ports/vportNpM/name` → `/dev/vportNpM`.
    Without a spec: `vmha.messaging`, then `cgcs.messaging`.
    """
    if spec is not None and spec.startswith("/"):
        return Path(spec)
    for name in (spec,) if spec is not None else DEFAULT_PORT_NAMES:
        found = _find_named_port(name, dev_root, sys_root)
        if found is not None:
            return found
    return None


def _find_named_port(name: str, dev_root: Path, sys_root: Path) -> Path | None:
    link = dev_root / "virtio-ports" / name
    if link.exists():
        return link
    for entry in sorted((sys_root / "class" / "virtio-ports").glob("vport*")):
        try:
            port_name = (entry / "name").read_text().strip()
        except OSError:
            continue
        if port_name == name and (dev_root / entry.name).exists():
            return dev_root / entry.name
    return None


class HostNotConnected(serial.SerialException):  # type: ignore[misc]
    """The host side of the port is not connected (read returned 0, or EAGAIN + POLLHUP)."""


class VirtioSerial(serial.Serial):  # type: ignore[misc]
    """A `serial.Serial` that also drives character devices that are not terminals.

    A virtio-serial port has no line settings: termios calls fail with ENOTTY and
    pyserial's `open()` would give up. On such a device terminal configuration is skipped,
    and so is pyserial's input flush at open (messages the host sent must be kept).

    Non-blocking I/O (timeout 0, as pyserial-asyncio sets) is one syscall per call:
    pyserial's own `write()` retries EAGAIN in a tight loop, which would freeze the event
    loop while the host is away.
    """

    _is_tty = True

    def _reconfigure_port(self, force_update: bool = False) -> None:
        self._is_tty = os.isatty(self.fd)
        if self._is_tty:
            super()._reconfigure_port(force_update)

    def _update_dtr_state(self) -> None:
        if self._is_tty:
            super()._update_dtr_state()

    def _update_rts_state(self) -> None:
        if self._is_tty:
            super()._update_rts_state()

    def _reset_input_buffer(self) -> None:
        if self._is_tty:
            super()._reset_input_buffer()

    def flush(self) -> None:
        if self._is_tty:
            super().flush()

    def read(self, size: int = 1) -> bytes:
        if self._is_tty or self.timeout != 0:
            data: bytes = super().read(size)
            return data
        if not self.is_open:
            raise serial.PortNotOpenError()
        try:
            data = os.read(self.fd, size)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise serial.SerialException(f"read failed: {exc}") from exc
        if not data:
            raise HostNotConnected("host side not connected (read returned 0)")
        return data

    def write(self, data: Any) -> int:
        if self.write_timeout != 0:
            written: int = super().write(data)
            return written
        if not self.is_open:
            raise serial.PortNotOpenError()
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            if self._hung_up():
                raise HostNotConnected("host side not connected (write: EAGAIN)") from None
            return 0  # full: the transport waits for the fd to become writable
        except OSError as exc:
            raise serial.SerialException(f"write failed: {exc}") from exc

    def _hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        return any(events & select.POLLHUP for _, events in poller.poll(0))


class _SerialTransport(serial_asyncio.SerialTransport):  # type: ignore[misc]
    def _fatal_error(self, exc: Exception, message: str = "") -> None:
        # pyserial-asyncio hands write errors to the loop's exception handler (a traceback
        # at ERROR level). Losing the host is routine: close, and let connection_lost
        # report it.
        self._abort(exc)


class SerialPort:
    """The virtio-serial port, opened with pyserial-asyncio."""

    def __init__(
        self,
        spec: str | None = None,
        *,
        dev_root: Path = Path("/dev"),
        sys_root: Path = Path("/sys"),
    ) -> None:
        self.spec = spec
        self._dev_root = dev_root
        self._sys_root = sys_root
        self.path: Path | None = None  # the device last opened

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return self.spec or " or ".join(DEFAULT_PORT_NAMES)

    async def open(self, protocol: asyncio.Protocol) -> asyncio.Transport:
        path = resolve_port(self.spec, dev_root=self._dev_root, sys_root=self._sys_root)
        if path is None:
            raise PortUnavailable(f"no virtio-serial port {self._names()}")
        device = VirtioSerial()
        device.port = str(path)
        try:
            device.open()
        except serial.SerialException as exc:
            raise PortUnavailable(f"cannot open {path}: {_open_error(exc)}") from exc
        if not _pollable(device.fd):
            device.close()
            raise PortUnavailable(f"cannot open {path}: the event loop cannot wait on it")
        self.path = path
        transport: asyncio.Transport = _SerialTransport(
            asyncio.get_running_loop(), protocol, device
        )
        return transport

    def _names(self) -> str:
        names: Sequence[str] = (self.spec,) if self.spec else DEFAULT_PORT_NAMES
        where = f"{self._dev_root}/virtio-ports, {self._sys_root}/class/virtio-ports"
        return f"{' or '.join(names)} (looked in {where})"


def _pollable(fd: int) -> bool:
    """Whether epoll accepts the fd (it refuses regular files and e.g. /dev/null)."""
    poller = select.epoll()
    try:
        poller.register(fd, select.EPOLLIN)
    except PermissionError:
        return False
    finally:
        poller.close()
    return True


def _open_error(exc: serial.SerialException) -> str:
    if exc.errno == errno.EBUSY:
        return "busy: another process has the port open"
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc)
