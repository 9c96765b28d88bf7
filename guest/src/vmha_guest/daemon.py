"""The daemon: keep the port open while the host is there, wait calmly while it is not.

Loop: open the port → the base layer runs until the connection is lost → close → wait
(capped exponential backoff) → reopen. While the host side is absent the device makes
every open end at once (read returns 0), so the backoff is what keeps this from being a
busy loop; it resets once a connection has carried a frame from the host. On stop the
heartbeat client sends `exit` and the daemon returns.

Next to the port the daemon serves applications on a unix socket (`local_api.py`): server
group messaging (`server_group.py`) and votes on revocable actions (`votes.py`). The
socket is not essential: if it cannot be served, the daemon says so and keeps
heartbeating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from vmha_guest.backoff import Backoff
from vmha_guest.base import AppHandler, BaseLayer, HostConnection
from vmha_guest.config import GuestConfig
from vmha_guest.events import EventHub
from vmha_guest.health import HealthMonitor
from vmha_guest.heartbeat import HeartbeatClient, HeartbeatTiming
from vmha_guest.local_api import LocalApiError, LocalApiServer
from vmha_guest.port import Port, PortUnavailable
from vmha_guest.server_group import ServerGroupClient
from vmha_guest.votes import VoteBroker
from vmha_protocol import AppGroup, default_address

log = logging.getLogger(__name__)

REOPEN_FIRST_S = 0.1
# How long `exit` may take to reach the host when stopping.
EXIT_FLUSH_S = 2.0


@dataclass
class DaemonStats:
    open_attempts: int = 0
    connections: int = 0  # opens that carried at least one frame from the host


class GuestDaemon:
    def __init__(
        self,
        config: GuestConfig,
        port: Port,
        *,
        heartbeat_timing: HeartbeatTiming | None = None,
    ) -> None:
        self.config = config
        self.port = port
        self.health = HealthMonitor(config.checks)
        self.events = EventHub()
        self.votes = VoteBroker(self.events)
        self.heartbeat: HeartbeatClient | None = None
        self.server_group: ServerGroupClient | None = None
        self.local_api: LocalApiServer | None = None
        handlers: list[AppHandler] = []
        original = config.addresses == "cgcs"
        if config.heartbeat.enabled:
            self.heartbeat = HeartbeatClient(
                config.heartbeat,
                default_address(AppGroup.HEARTBEAT, original=original),
                self.health,
                vote=self.votes.vote,
                notice=self.votes.notice,
                timing=heartbeat_timing,
            )
            handlers.append(self.heartbeat)
        messaging = config.server_group
        if messaging.enabled:
            self.server_group = ServerGroupClient(
                default_address(AppGroup.SERVER_GROUP, original=original),
                self.events,
                nack_window_s=messaging.nack_window_ms / 1000,
                max_members=messaging.max_members,
            )
            handlers.append(self.server_group)
        if config.local_api.enabled:
            self.local_api = LocalApiServer(
                config.local_api,
                self.events,
                self.votes,
                self.server_group,
                status_timeout_s=messaging.status_timeout_ms / 1000,
                nack_window_s=messaging.nack_window_ms / 1000,
            )
        self.base = BaseLayer(handlers)
        self.stats = DaemonStats()
        self._reopen = Backoff(REOPEN_FIRST_S, max(config.reconnect_max_ms / 1000, REOPEN_FIRST_S))
        self._waiting_reason: str | None = None  # logged once per stretch of waiting

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set."""
        self.health.start()
        await self._start_local_api()
        try:
            while not stop.is_set():
                await self._serve_once(stop)
        finally:
            if self.local_api is not None:
                await self.local_api.stop()
            await self.health.stop()

    async def _start_local_api(self) -> None:
        if self.local_api is None:
            return
        try:
            await self.local_api.start()
        except LocalApiError as exc:
            log.error("applications cannot reach the daemon: %s", exc)
            self.local_api = None

    async def _serve_once(self, stop: asyncio.Event) -> None:
        connection = self.base.connection()
        self.stats.open_attempts += 1
        try:
            transport = await self.port.open(connection)
        except PortUnavailable as exc:
            self._waiting(str(exc))
            await _sleep_unless(stop, self._reopen.next())
            return
        if await _lost_or_stopped(connection, stop):
            self._after_loss(connection)
            await _sleep_unless(stop, self._reopen.next())
        else:
            await self._leave(connection, transport)

    def _after_loss(self, connection: HostConnection) -> None:
        reason = connection.closed.result()
        if connection.frames_received:
            self.stats.connections += 1
            self._reopen.reset()
            self._waiting_reason = None
            log.warning("connection to the host lost (%s); reopening", reason or "closed")
        else:
            self._waiting(f"host not connected on {self.port.describe()} ({reason or 'closed'})")

    def _waiting(self, reason: str) -> None:
        if reason != self._waiting_reason:
            log.info("%s; waiting for it", reason)
            self._waiting_reason = reason
        else:
            log.debug("%s; still waiting", reason)

    async def _leave(self, connection: HostConnection, transport: asyncio.Transport) -> None:
        if self.heartbeat is not None and self.heartbeat.leave("vmha-guest stopped"):
            log.info("deregistered from the host (exit)")
        transport.close()  # sends what is queued first
        try:
            async with asyncio.timeout(EXIT_FLUSH_S):
                await connection.closed
        except TimeoutError:
            log.warning("the host did not take the exit message in time")
            transport.abort()


async def _lost_or_stopped(connection: HostConnection, stop: asyncio.Event) -> bool:
    """Wait for the connection to be lost (True) or for stop (False)."""
    stopping = asyncio.create_task(stop.wait())
    try:
        waiters: set[asyncio.Future[Any]] = {connection.closed, stopping}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    return not stop.is_set()


async def _sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay_s):
            await stop.wait()
