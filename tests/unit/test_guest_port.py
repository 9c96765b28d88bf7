"""Finding the port, and opening it with pyserial-asyncio: non-tty devices, data buffered
before a hang-up, and non-blocking writes that never spin."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from vmha_guest.port import PortUnavailable, SerialPort, VirtioSerial, resolve_port

pytestmark = pytest.mark.timeout(60)
WAIT_S = 15.0


class Recorder(asyncio.Protocol):
    """Records what a transport delivers, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.made = asyncio.Event()
        self.received = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append(("made", None))
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.received.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))
        self.lost.set_result(exc)

    def data(self) -> bytes:
        return b"".join(d for kind, d in self.events if kind == "data" and isinstance(d, bytes))


def _fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    dev, sys_root = tmp_path / "dev", tmp_path / "sys"
    (dev / "virtio-ports").mkdir(parents=True)
    (sys_root / "class" / "virtio-ports").mkdir(parents=True)
    return dev, sys_root


def _sysfs_port(dev: Path, sys_root: Path, device: str, name: str) -> None:
    entry = sys_root / "class" / "virtio-ports" / device
    entry.mkdir()
    (entry / "name").write_text(f"{name}\n")
    (dev / device).touch()


def test_an_absolute_path_is_taken_as_it_is(tmp_path: Path) -> None:
    assert resolve_port("/dev/hvc7", dev_root=tmp_path, sys_root=tmp_path) == Path("/dev/hvc7")


def test_a_name_is_found_through_the_udev_link(tmp_path: Path) -> None:
    dev, sys_root = _fake_tree(tmp_path)
    (dev / "virtio-ports" / "my.port").touch()
    assert resolve_port("my.port", dev_root=dev, sys_root=sys_root) == dev / "virtio-ports/my.port"


def test_a_name_is_found_through_sysfs_without_udev(tmp_path: Path) -> None:
    dev, sys_root = _fake_tree(tmp_path)
    _sysfs_port(dev, sys_root, "vport0p1", "other")
    _sysfs_port(dev, sys_root, "vport0p2", "vmha.messaging")
    assert resolve_port("vmha.messaging", dev_root=dev, sys_root=sys_root) == dev / "vport0p2"


def test_the_default_prefers_vmha_then_finds_cgcs(tmp_path: Path) -> None:
    dev, sys_root = _fake_tree(tmp_path)
    assert resolve_port(None, dev_root=dev, sys_root=sys_root) is None
    (dev / "virtio-ports" / "cgcs.messaging").touch()
    assert (
        resolve_port(None, dev_root=dev, sys_root=sys_root) == dev / "virtio-ports/cgcs.messaging"
    )
    _sysfs_port(dev, sys_root, "vport1p1", "vmha.messaging")
    assert resolve_port(None, dev_root=dev, sys_root=sys_root) == dev / "vport1p1"


async def test_a_missing_port_is_unavailable_with_where_it_was_looked_for(tmp_path: Path) -> None:
    dev, sys_root = _fake_tree(tmp_path)
    port = SerialPort(None, dev_root=dev, sys_root=sys_root)
    with pytest.raises(
        PortUnavailable,
        match=r"no virtio-serial port vmha\.messaging or cgcs\.messaging \(looked in ",
    ):
        await port.open(Recorder())
    with pytest.raises(PortUnavailable, match="No such file or directory"):
        await SerialPort(str(tmp_path / "gone")).open(Recorder())


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_plain_pyserial_cannot_open_a_device_that_is_not_a_tty(fifo: Path) -> None:
    # Why VirtioSerial exists: a virtio port is a character device with no termios.
    with pytest.raises(serial.SerialException, match="Could not configure port"):
        serial.Serial(str(fifo))
    device = VirtioSerial()
    device.port = str(fifo)
    device.open()
    try:
        assert device.is_open
    finally:
        device.close()


async def test_a_non_tty_device_carries_data_through_pyserial_asyncio(fifo: Path) -> None:
    # A FIFO opened read-write loops back what we write: both directions of the real
    # transport over a device on which every termios call fails.
    recorder = Recorder()
    transport = await SerialPort(str(fifo)).open(recorder)
    try:
        async with asyncio.timeout(WAIT_S):
            await recorder.made.wait()
            transport.write(b'\n{"hello": 1}\n')
            while recorder.data() != b'\n{"hello": 1}\n':
                recorder.received.clear()
                await recorder.received.wait()
    finally:
        transport.close()
    async with asyncio.timeout(WAIT_S):
        assert await recorder.lost is None


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int, str]]:
    master, slave = os.openpty()
    yield master, slave, os.ttyname(slave)
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


async def test_a_hang_up_is_reported_as_a_lost_connection(
    pty_pair: tuple[int, int, str],
) -> None:
    # (A pty hang-up also flushes unread input, so a pty cannot show that data the host
    # sent before going away is still read; the virtio device keeps it, and the transport
    # delivers every read before reporting the loss.)
    master, slave, path = pty_pair
    recorder = Recorder()
    await SerialPort(path).open(recorder)
    async with asyncio.timeout(WAIT_S):
        await recorder.made.wait()
        os.write(master, b'\n{"n": 1}\n')
        await recorder.received.wait()
    os.close(slave)
    os.close(master)
    async with asyncio.timeout(WAIT_S):
        reason = await recorder.lost
    assert isinstance(reason, serial.SerialException)
    assert [kind for kind, _ in recorder.events] == ["made", "data", "lost"]


def test_a_full_device_makes_write_return_zero_instead_of_spinning(
    pty_pair: tuple[int, int, str],
) -> None:
    _, _, path = pty_pair
    device = VirtioSerial(path, timeout=0, write_timeout=0)
    try:
        chunk = b"x" * 4096
        written = [device.write(chunk) for _ in range(256)]  # nobody reads the master
        assert 0 in written  # full: pyserial's own write() would retry EAGAIN forever
        assert sum(written) > 0
    finally:
        device.close()
