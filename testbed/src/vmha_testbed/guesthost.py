"""The host end of a guest daemon's port, played by a test: the daemon (`vmha_guest`) runs
in the test's event loop on a real pty opened with pyserial-asyncio (the `SerialPort` it
uses on a virtio-serial device), and the test scripts the host on the pty's master side.

- `ScriptedHost`: decodes what the guest sends, sends what the test says.
- `Pty`, `short_tempdir`: the pty pair; a short directory for unix sockets.
- `make_config`, `messaging_config`, `running`, `guest_and_host`: the daemon with fast
  timings and a scripted host.
- `guest`: the daemon with server group messaging and its local socket, connected to its
  host (`Guest`: the daemon, the host and the socket, for the client library).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from vmha_guest.client import GuestClient
from vmha_guest.config import GuestConfig, parse_config
from vmha_guest.daemon import GuestDaemon
from vmha_guest.heartbeat import HeartbeatTiming
from vmha_guest.port import SerialPort
from vmha_protocol import FrameDecoder, GuestMessage, Inbound, decode_from_guest, encode
from vmha_protocol.heartbeat import Challenge, ChallengeResponse, Init, InitAck
from vmha_protocol.server_group import (
    MemberState,
    StatusQuery,
    StatusResponse,
    StatusResponseDone,
)

M = TypeVar("M", bound=BaseModel)
WAIT_S = 15.0  # generous: the machine is shared and small
SG = "vmha.server_group"
FAST = HeartbeatTiming(
    init_retry_first_s=0.3,
    init_retry_max_s=0.6,
    nack_reregister_delay_s=0.2,
    unavailable_retry_s=1.5,
    rejoin_min_s=1.0,
)


class ScriptedHost:
    """The host end of the port, played by the test: decodes what the guest sends,
    sends what the test says."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._decoder = FrameDecoder()
        self._inbox: asyncio.Queue[Inbound[GuestMessage] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        self.closed = False

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.fd)
            self._inbox.put_nowait(None)
            return
        for obj in self._decoder.feed(data):
            self._inbox.put_nowait(decode_from_guest(obj))

    async def receive(self, timeout: float = WAIT_S) -> Inbound[GuestMessage]:
        async with asyncio.timeout(timeout):
            inbound = await self._inbox.get()
        assert inbound is not None, "the guest closed the port"
        return inbound

    async def expect(
        self, kind: type[M], timeout: float = WAIT_S, skip: tuple[type, ...] = ()
    ) -> M:
        """The next message, which must be a `kind` (skipping messages of `skip` types)."""
        async with asyncio.timeout(timeout):
            while True:
                inbound = await self.receive()
                if isinstance(inbound.message, skip):
                    continue
                assert isinstance(inbound.message, kind), f"expected {kind.__name__}, got {inbound}"
                return inbound.message

    async def expect_address(self, kind: type[M]) -> tuple[str, M]:
        inbound = await self.receive()
        assert isinstance(inbound.message, kind), inbound
        return inbound.address, inbound.message

    def send(self, message: BaseModel, address: str = "vmha.heartbeat") -> None:
        os.write(self.fd, encode(address, message))

    def send_raw(self, data: bytes) -> None:
        os.write(self.fd, data)

    async def register(self) -> Init:
        init = await self.expect(Init)
        self.send(InitAck(invocation_id=init.invocation_id))
        return init

    async def challenge(self, init: Init, value: int) -> ChallengeResponse:
        self.send(Challenge(invocation_id=init.invocation_id, heartbeat_challenge=value))
        return await self.expect(ChallengeResponse, skip=(Init,))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.fd)
            os.close(self.fd)


class Pty:
    """A pty pair: the daemon opens `path` (the slave); the host holds the master."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.path = os.ttyname(self._slave)

    def hang_up(self) -> None:
        """Close both test-held ends: the daemon's reads then fail (EIO)."""
        for fd in (self._slave, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)


def make_config(**overrides: Any) -> GuestConfig:
    raw: dict[str, Any] = {
        "heartbeat": {
            "name": "test-vm",
            "interval_ms": 200,
            "corrective_action": "reboot",
            "vote_secs": 7,
            "shutdown_notice_secs": 11,
            "suspend_notice_secs": 12,
            "resume_notice_secs": 13,
            "restart_secs": 140,
        },
        "reconnect_max_ms": 500,
        # Tests that use the socket give it a path of their own (never /run/vmha).
        "local_api": {"enabled": False},
    }
    raw.update(overrides)
    return parse_config(raw)


class Running:
    def __init__(self, daemon: GuestDaemon, task: asyncio.Task[None], stop: asyncio.Event):
        self.daemon = daemon
        self.task = task
        self.stop = stop

    async def shutdown(self) -> None:
        self.stop.set()
        async with asyncio.timeout(WAIT_S):
            await self.task


@contextlib.asynccontextmanager
async def running(config: GuestConfig, port: Any) -> AsyncIterator[Running]:
    daemon = GuestDaemon(config, port, heartbeat_timing=FAST)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    run = Running(daemon, task, stop)
    try:
        yield run
    finally:
        if not task.done():
            await run.shutdown()


@contextlib.contextmanager
def short_tempdir() -> Iterator[Path]:
    """A short directory for unix sockets (a socket path holds at most 107 bytes; pytest's
    tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="vg-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def guest_and_host(
    pty: Pty, config: GuestConfig | None = None
) -> AsyncIterator[tuple[Running, ScriptedHost]]:
    host = ScriptedHost(os.dup(pty.master))
    try:
        async with running(config or make_config(), SerialPort(pty.path)) as run:
            yield run, host
    finally:
        host.close()


def member(name: str, state: str = "active", **extra: Any) -> MemberState:
    return MemberState(
        instance_id=f"uid-{name}", display_name=name, hostname=name, state=state, **extra
    )


def messaging_config(sock: Path, **server_group: Any) -> GuestConfig:
    return make_config(
        heartbeat={"enabled": False},
        local_api={"socket": str(sock)},
        server_group={"nack_window_ms": 300, **server_group},
    )


class Guest:
    """The daemon, its scripted host and the path of its socket."""

    def __init__(self, run: Running, host: ScriptedHost, sock: Path) -> None:
        self.run = run
        self.host = host
        self.sock = sock

    def client(self, **kwargs: Any) -> GuestClient:
        return GuestClient(self.sock, **kwargs)

    def send(self, message: Any) -> None:
        self.host.send(message, address=SG)

    async def push(self, messages: list[Any]) -> None:
        """Send more than the pty buffers at once, waiting while it is full."""
        data = memoryview(b"".join(encode(SG, message) for message in messages))
        while data:
            try:
                data = data[os.write(self.host.fd, data) :]
            except BlockingIOError:
                await asyncio.sleep(0.005)

    async def answer_status(self, members: list[MemberState]) -> StatusQuery:
        query = await self.host.expect(StatusQuery)
        for each in members:
            self.send(StatusResponse(seq=query.seq, data=each))
        self.send(StatusResponseDone(seq=query.seq))
        return query

    async def enable(self) -> None:
        """Make the daemon see messaging on (a status query answered)."""
        async with self.client() as client:
            asking = asyncio.create_task(client.status())
            await self.answer_status([member("self")])
            await asking


async def wait_for(condition: Callable[[], object], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"{what}: not within {WAIT_S:.0f} s") from None


@contextlib.asynccontextmanager
async def guest(
    pty: Pty, socket_dir: Path, config: GuestConfig | None = None
) -> AsyncIterator[Guest]:
    """The daemon with its local socket in `socket_dir` (`messaging_config` unless `config`),
    once the socket exists and, with messaging, the daemon is connected to its host."""
    sock = socket_dir / "guest.sock"
    async with guest_and_host(pty, config or messaging_config(sock)) as (run, host):
        server_group = run.daemon.server_group
        await wait_for(sock.exists, "the socket")
        if server_group is not None:
            await wait_for(lambda: server_group.connected, "the connection to the host")
        yield Guest(run, host, sock)
