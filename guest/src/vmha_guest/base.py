"""Base layer (PROTOCOL.md §3): frames from the host, dispatched per application group.

Each application group (heartbeat now, server group messaging later) is an `AppHandler`;
adding a group means adding a handler. Handlers live as long as the daemon; they are
attached to each connection to the host and detached when it is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pydantic import BaseModel

from vmha_protocol import (
    AppGroup,
    FrameDecoder,
    HostMessage,
    Inbound,
    ProtocolError,
    decode_from_host,
    encode,
)

log = logging.getLogger(__name__)


class Channel:
    """The open connection to the host, as handlers see it: a way to send messages."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    def send(self, address: str, message: BaseModel) -> bool:
        """Queue a message for the host; False when the connection is going away."""
        if self._transport.is_closing():
            return False
        self._transport.write(encode(address, message))
        return True


class AppHandler(Protocol):
    """One application group's side of the base layer."""

    @property
    def group(self) -> AppGroup: ...

    def attached(self, channel: Channel) -> None:
        """A connection to the host is up."""

    def received(self, inbound: Inbound[HostMessage]) -> None:
        """A valid message for this group. Must not block; start tasks for slow work."""

    def detached(self) -> None:
        """The connection is gone; stop using the channel."""


@dataclass
class BaseLayerStats:
    frames: int = 0
    invalid: int = 0
    unhandled: int = 0


class BaseLayer:
    """Routes decoded host messages to the handler of their application group."""

    def __init__(self, handlers: Iterable[AppHandler]) -> None:
        self._handlers: dict[AppGroup, AppHandler] = {}
        for handler in handlers:
            if handler.group in self._handlers:
                raise ValueError(f"two handlers for {handler.group.value}")
            self._handlers[handler.group] = handler
        self.stats = BaseLayerStats()

    def connection(self) -> HostConnection:
        """An asyncio protocol for one opening of the port."""
        return HostConnection(self)

    def attach(self, channel: Channel) -> None:
        for handler in self._handlers.values():
            handler.attached(channel)

    def detach(self) -> None:
        for handler in self._handlers.values():
            handler.detached()

    def dispatch(self, obj: dict[str, Any]) -> None:
        self.stats.frames += 1
        try:
            inbound = decode_from_host(obj)
        except ProtocolError as error:
            # There is no guest→host nack: the host cannot be told, only the log.
            self.stats.invalid += 1
            log.warning("ignored invalid message from the host: %s", error)
            return
        handler = self._handlers.get(inbound.group)
        if handler is None:
            self.stats.unhandled += 1
            log.debug("no handler for %s; dropped %s", inbound.address, inbound.message)
            return
        try:
            handler.received(inbound)
        except Exception:  # one bad message must not take the connection down
            log.exception("handler for %s failed on %s", inbound.address, inbound.message)


class HostConnection(asyncio.Protocol):
    """One opening of the port: reassembles frames and feeds them to the base layer."""

    def __init__(self, layer: BaseLayer) -> None:
        self._layer = layer
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.frames_received = 0
        # Resolves with the reason (None or an exception) when the connection is lost.
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._layer.attach(Channel(self.transport))

    def data_received(self, data: bytes) -> None:
        for obj in self._decoder.feed(data):
            self.frames_received += 1
            self._layer.dispatch(obj)

    def connection_lost(self, exc: Exception | None) -> None:
        self._layer.detach()
        if not self.closed.done():
            self.closed.set_result(exc)
