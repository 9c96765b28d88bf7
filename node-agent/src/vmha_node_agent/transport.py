"""The host end of a VM's virtio-serial port: a unix stream socket that QEMU listens on.

`GuestChannel` connects, reconnects with backoff for as long as the VM is on this node, paces
reads to the guest's byte budget, and bounds what it buffers towards a guest that stopped
reading. It knows nothing of the protocol above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, cast

from vmha_node_agent.config import ChannelPolicy, GuestLimits
from vmha_node_agent.ratelimit import TokenBucket

log = logging.getLogger(__name__)

# sockaddr_un holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH_BYTES = 107


class ChannelListener(Protocol):
    def channel_connected(self) -> None: ...
    def channel_data(self, data: bytes) -> None: ...
    def channel_lost(self, reason: str) -> None: ...


class GuestChannel:
    def __init__(
        self,
        path: Path,
        listener: ChannelListener,
        policy: ChannelPolicy,
        limits: GuestLimits,
    ) -> None:
        self.path = path
        self._listener = listener
        self._policy = policy
        self._max_write_buffer = limits.max_write_buffer_bytes
        self._read_budget = TokenBucket(limits.bytes_per_second, limits.bytes_per_second)
        self._transport: asyncio.Transport | None = None
        # Set whenever the guest has read enough of what we queued (or the channel dropped).
        self._drained = asyncio.Event()
        self.connects = 0
        self.writes_dropped = 0

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def run(self) -> None:
        """Keep a connection up until cancelled."""
        delay = self._policy.reconnect_initial_s
        while True:
            closed = await self._connect()
            if closed is None:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._policy.reconnect_max_s)
                continue
            delay = self._policy.reconnect_initial_s
            try:
                reason = await closed
            finally:
                self._close_transport()
            self._listener.channel_lost(reason)

    def send(self, frame: bytes) -> bool:
        """Queue a frame; False when not connected or the guest is not draining its input."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() + len(frame) > self._max_write_buffer:
            self.writes_dropped += 1
            return False
        transport.write(frame)
        return True

    async def send_when_writable(self, frame: bytes, timeout_s: float) -> bool:
        """Queue a frame once the guest has read enough to make room for it; False when
        the channel is down or stays full for `timeout_s` (a long answer paced to the
        guest's reading, never beyond the write buffer)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            transport = self._transport
            if transport is None or transport.is_closing():
                return False
            if transport.get_write_buffer_size() + len(frame) <= self._max_write_buffer:
                transport.write(frame)
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._drained.clear()
            # Woken by resume_writing; the short poll covers a buffer that never reached
            # the high-water mark.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.1)):
                    await self._drained.wait()

    def writable(self) -> None:
        self._drained.set()

    def close(self) -> None:
        self._close_transport()

    async def _connect(self) -> asyncio.Future[str] | None:
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[str] = loop.create_future()
        try:
            with connectable_path(self.path) as path:
                transport, _ = await loop.create_unix_connection(
                    lambda: _ChannelProtocol(self, closed), path
                )
        except OSError as exc:
            log.debug("channel %s not reachable: %s", self.path, exc)
            return None
        # Told when the guest has read most of a long answer (see send_when_writable).
        transport.set_write_buffer_limits(high=self._max_write_buffer // 2)
        self._transport = transport
        self.connects += 1
        self._listener.channel_connected()
        return closed

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    def deliver(self, data: bytes, transport: asyncio.Transport) -> None:
        # A guest over its byte budget is paused, not disconnected: it only slows itself.
        pause_s = self._read_budget.take_debt(len(data))
        if pause_s > 0:
            transport.pause_reading()
            asyncio.get_running_loop().call_later(pause_s, _resume, transport)
        self._listener.channel_data(data)


@contextlib.contextmanager
def connectable_path(path: Path) -> Iterator[str]:
    """A path `connect()` accepts for `path`, even one longer than a unix socket address.

    Host paths of sockets in a pod's volume can be longer than 107 bytes (a kubelet root
    mounted under another prefix, a long pod volume name); then we go through a descriptor
    of the directory: /proc/self/fd/<fd>/<name>.
    """
    if len(os.fsencode(path)) <= MAX_UNIX_PATH_BYTES:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def _resume(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.resume_reading()


class _ChannelProtocol(asyncio.Protocol):
    def __init__(self, channel: GuestChannel, closed: asyncio.Future[str]) -> None:
        self._channel = channel
        self._closed = closed
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport (no isinstance).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._channel.deliver(data, self._transport)

    def eof_received(self) -> bool:
        return False  # close our side too

    def resume_writing(self) -> None:
        self._channel.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self._channel.writable()
        if not self._closed.done():
            self._closed.set_result(str(exc) if exc else "closed by peer")
