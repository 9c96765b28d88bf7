"""Server group messaging (PROTOCOL.md §5), the guest's side: the base layer handler that
queries status, sends broadcasts, and hands notifications and broadcasts from the host to
the applications subscribed to them.

The protocol is datagrams without acknowledgements, so this module adds what an
application needs to get a clear answer:

- A status query has a `seq`; `status_response` messages with that seq are collected until
  `status_response_done` with the same seq, at most `max_members` of them, within a
  timeout. Answers to other seqs (a query that timed out) are ignored.
- A `nack` names the message type it refuses but not which message; it is matched to the
  oldest waiting status query, or to the broadcast in its nack window. Broadcasts go out
  one at a time for that reason: each waits `nack_window_s` for a nack before it counts as
  sent.
- Messaging state per connection: unknown, enabled (the host answered a query or sent a
  notification or broadcast), disabled (a `messaging-disabled` nack). A broadcast while the
  state is not enabled first queries status, so "messaging is off" or "the host does not
  answer" is a prompt error instead of a message lost in silence.
- No host on the port: every operation fails at once with `host-not-connected`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import ValidationError

from vmha_guest.base import Channel
from vmha_guest.events import EventHub
from vmha_guest.local_protocol import (
    ApiError,
    ErrorCode,
    Topic,
    broadcast_event,
    host_event,
    notification_event,
)
from vmha_protocol import AppGroup, HostMessage, Inbound, limits
from vmha_protocol.nack import NackReason, nack_reason
from vmha_protocol.server_group import (
    GuestBroadcast,
    HostBroadcast,
    MemberState,
    Notification,
    ServerGroupNack,
    StatusQuery,
    StatusResponse,
    StatusResponseDone,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A host that sends no reason code (one built before codes, or another implementation):
# recognise "messaging is not enabled/disabled/off" in its text.
_DISABLED_TEXT = re.compile(r"messaging\b.*\b(not enabled|disabled|off)\b", re.IGNORECASE)

_NACK_ERRORS: dict[NackReason | None, tuple[ErrorCode, str]] = {
    NackReason.MESSAGING_DISABLED: (
        ErrorCode.MESSAGING_DISABLED,
        "server group messaging is disabled for this VM",
    ),
    NackReason.RATE_LIMITED: (
        ErrorCode.RATE_LIMITED,
        "the host dropped the broadcast (rate limit)",
    ),
    NackReason.TOO_LARGE: (ErrorCode.TOO_LARGE, "the host refused the message as too large"),
    NackReason.UNAVAILABLE: (ErrorCode.UNAVAILABLE, "the host cannot serve it now"),
}


class MessagingState(enum.StrEnum):
    UNKNOWN = "unknown"
    ENABLED = "enabled"
    DISABLED = "disabled"


@dataclass(frozen=True)
class StatusResult:
    seq: int
    members: tuple[MemberState, ...]
    truncated: bool  # more members answered than `max_members`; the rest were dropped


@dataclass
class ServerGroupStats:
    status_queries: int = 0
    broadcasts_sent: int = 0
    notifications: int = 0
    broadcasts_received: int = 0
    nacks: int = 0
    stale_responses: int = 0  # answers to a query nobody waits for any more
    unmatched_nacks: int = 0


@dataclass
class _PendingQuery:
    seq: int
    future: asyncio.Future[StatusResult | ApiError]
    members: dict[str, MemberState] = field(default_factory=dict)
    truncated: bool = False


def validated_broadcast(data: str) -> GuestBroadcast:
    """The message for `data`, or ApiError saying why it cannot be a broadcast."""
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError:
        raise ApiError(ErrorCode.INVALID_MESSAGE, "the message is not valid Unicode text") from None
    try:
        return GuestBroadcast(data=data)
    except ValidationError:
        if size > limits.MAX_BROADCAST_BYTES:
            raise ApiError(
                ErrorCode.TOO_LARGE,
                f"the message is {size} bytes; a broadcast holds at most "
                f"{limits.MAX_BROADCAST_BYTES} bytes of UTF-8",
            ) from None
        raise ApiError(
            ErrorCode.INVALID_MESSAGE,
            "a broadcast cannot contain a newline or another control character",
        ) from None


class ServerGroupClient:
    """The server group application group's handler in the base layer."""

    group = AppGroup.SERVER_GROUP

    def __init__(
        self,
        address: str,
        hub: EventHub,
        *,
        nack_window_s: float,
        max_members: int = 1024,
        max_pending_queries: int = 16,
        max_waiting_broadcasts: int = 64,
    ) -> None:
        self.address = address
        self._hub = hub
        self._nack_window_s = nack_window_s
        self._max_members = max_members
        self._max_pending_queries = max_pending_queries
        self._max_waiting_broadcasts = max_waiting_broadcasts
        self._channel: Channel | None = None
        self.state = MessagingState.UNKNOWN
        self.stats = ServerGroupStats()
        self._seq = 0  # never reset: a late answer from an earlier connection cannot match
        self._queries: dict[int, _PendingQuery] = {}  # in the order they were sent
        self._broadcast_turn = asyncio.Lock()
        self._broadcasts_waiting = 0
        self._window: asyncio.Future[ApiError] | None = None

    @property
    def connected(self) -> bool:
        return self._channel is not None

    # -- base layer ----------------------------------------------------------------------

    def attached(self, channel: Channel) -> None:
        self._channel = channel
        self.state = MessagingState.UNKNOWN
        self._publish_host()

    def detached(self) -> None:
        self._channel = None
        self._fail_waiting(_not_connected("lost the connection to the host"))
        self.state = MessagingState.UNKNOWN
        self._publish_host()

    def received(self, inbound: Inbound[HostMessage]) -> None:
        match inbound.message:
            case StatusResponse() as response:
                self._on_status_response(response)
            case StatusResponseDone() as done:
                self._on_status_done(done)
            case Notification() as notification:
                self._enabled()
                self.stats.notifications += 1
                self._hub.publish([Topic.NOTIFICATION], notification_event(notification.data))
            case HostBroadcast() as broadcast:
                self._enabled()
                self.stats.broadcasts_received += 1
                event = broadcast_event(broadcast.source_instance, broadcast.data)
                self._hub.publish([Topic.BROADCAST], event)
            case ServerGroupNack() as nack:
                self._on_nack(nack)
            case other:
                log.debug("ignored %s on the server group address", other.msg_type)

    # -- operations for applications ----------------------------------------------------

    async def status(self, timeout_s: float) -> StatusResult:
        """Every member's state, the asking VM included."""
        channel = self._require_channel()
        if len(self._queries) >= self._max_pending_queries:
            raise ApiError(
                ErrorCode.BUSY, f"{len(self._queries)} status queries are already waiting"
            )
        self._seq += 1
        seq = self._seq
        pending = _PendingQuery(seq, asyncio.get_running_loop().create_future())
        self._queries[seq] = pending
        try:
            if not channel.send(self.address, StatusQuery(seq=seq)):
                raise _not_connected()
            self.stats.status_queries += 1
            try:
                async with asyncio.timeout(timeout_s):
                    outcome = await pending.future
            except TimeoutError:
                raise ApiError(
                    ErrorCode.HOST_NOT_ANSWERING,
                    f"the host did not answer a status query within {round(timeout_s, 1):g} s",
                ) from None
        finally:
            self._queries.pop(seq, None)
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome

    async def broadcast(self, data: str, timeout_s: float) -> int:
        """Send `data` to every other member; its size in bytes once no nack came back."""
        message = validated_broadcast(data)
        self._require_channel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self._take_broadcast_turn(timeout_s)
        try:
            await self._send_broadcast(message, deadline)
        finally:
            self._broadcast_turn.release()
        return len(message.data.encode())

    # -- broadcasts ----------------------------------------------------------------------

    async def _take_broadcast_turn(self, timeout_s: float) -> None:
        if self._broadcasts_waiting >= self._max_waiting_broadcasts:
            raise ApiError(ErrorCode.BUSY, f"{self._broadcasts_waiting} broadcasts are waiting")
        self._broadcasts_waiting += 1
        try:
            async with asyncio.timeout(timeout_s):
                await self._broadcast_turn.acquire()
        except TimeoutError:
            raise ApiError(
                ErrorCode.BUSY, "earlier broadcasts are still waiting out their nack window"
            ) from None
        finally:
            self._broadcasts_waiting -= 1

    async def _send_broadcast(self, message: GuestBroadcast, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if self.state is not MessagingState.ENABLED:
            await self.status(max(deadline - loop.time(), 0.001))
        channel = self._require_channel()
        window: asyncio.Future[ApiError] = loop.create_future()
        self._window = window
        try:
            if not channel.send(self.address, message):
                raise _not_connected()
            self.stats.broadcasts_sent += 1
            wait_s = min(self._nack_window_s, deadline - loop.time())
            if wait_s <= 0:
                return
            try:
                async with asyncio.timeout(wait_s):
                    error = await window
            except TimeoutError:
                return  # no nack: as sent as a datagram gets
            raise error
        finally:
            self._window = None

    # -- host messages -------------------------------------------------------------------

    def _on_status_response(self, response: StatusResponse) -> None:
        self._enabled()
        pending = self._queries.get(response.seq)
        if pending is None:
            self.stats.stale_responses += 1
            return
        member = response.data
        if member.instance_id in pending.members or len(pending.members) < self._max_members:
            pending.members[member.instance_id] = member
        else:
            pending.truncated = True

    def _on_status_done(self, done: StatusResponseDone) -> None:
        self._enabled()
        pending = self._queries.get(done.seq)
        if pending is None:
            self.stats.stale_responses += 1
            return
        if pending.truncated:
            log.warning(
                "status %d: more than %d members; the rest dropped", done.seq, self._max_members
            )
        _resolve(
            pending.future,
            StatusResult(done.seq, tuple(pending.members.values()), pending.truncated),
        )

    def _on_nack(self, nack: ServerGroupNack) -> None:
        self.stats.nacks += 1
        log.warning(
            "host refused a %s: %s", nack.orig_msg_type, nack.log_msg or "(no reason given)"
        )
        reason, error = classify_nack(nack)
        if reason is NackReason.MESSAGING_DISABLED:
            self._set_state(MessagingState.DISABLED)
            self._fail_waiting(error)
        elif nack.orig_msg_type == "status_query" and self._queries:
            # The host answers queries in order, so a nack is for the oldest one waiting.
            _resolve(next(iter(self._queries.values())).future, error)
        elif nack.orig_msg_type == "broadcast" and self._window is not None:
            _resolve(self._window, error)
        else:
            self.stats.unmatched_nacks += 1

    # -- state ---------------------------------------------------------------------------

    def _enabled(self) -> None:
        self._set_state(MessagingState.ENABLED)

    def _set_state(self, state: MessagingState) -> None:
        if state is self.state:
            return
        log.info("server group messaging: %s", state.value)
        self.state = state
        self._publish_host()

    def _publish_host(self) -> None:
        self._hub.publish([Topic.HOST], host_event(self.connected, self.state.value))

    def _require_channel(self) -> Channel:
        if self._channel is None:
            raise _not_connected()
        return self._channel

    def _fail_waiting(self, error: ApiError) -> None:
        for pending in self._queries.values():
            _resolve(pending.future, error)
        if self._window is not None:
            _resolve(self._window, error)


def _resolve(future: asyncio.Future[_T], outcome: _T) -> None:
    if not future.done():
        future.set_result(outcome)


def classify_nack(nack: ServerGroupNack) -> tuple[NackReason | None, ApiError]:
    """Why the host refused, and the error an application gets for it."""
    coded = nack_reason(nack.log_msg)
    reason = coded
    if reason is None and _DISABLED_TEXT.search(nack.log_msg):
        reason = NackReason.MESSAGING_DISABLED
    code, what = _NACK_ERRORS.get(
        reason, (ErrorCode.REFUSED, f"the host refused the {nack.orig_msg_type}")
    )
    # After a reason code comes the detail; without a code the whole text is the detail.
    detail = nack.log_msg.partition(":")[2] if coded is not None else nack.log_msg
    detail = detail.strip()
    return reason, ApiError(code, f"{what}: {detail}" if detail else what)


def _not_connected(
    message: str = "the host is not connected (no node agent on the other side of the port)",
) -> ApiError:
    return ApiError(ErrorCode.HOST_NOT_CONNECTED, message)
