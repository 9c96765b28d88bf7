"""Client library for applications in the guest: server group messaging and votes through
the `vmha-guest` daemon's local socket (asyncio; `broadcast_sync`/`status_sync` for
scripts that are not).

    from vmha_guest.client import GuestClient, Topic

    async with GuestClient() as client:
        await client.broadcast("primary is db-1")
        for member in (await client.status()).members:
            print(member.display_name, member.state)
        async for event in client.watch([Topic.NOTIFICATION]):
            print(event)

Every wait has a timeout (`timeout=`, default 5 s, per call), and every failure is a
`VmhaError` subclass: `DaemonNotRunning`, `MessagingDisabled`, `HostNotConnected`,
`HostNotAnswering`, `MessageTooLarge`, `InvalidMessage`, `RateLimited`, `Refused`, …
The socket is `$VMHA_GUEST_SOCKET`, else `/run/vmha/guest.sock`, unless given.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

from pydantic import ValidationError

from vmha_guest.config import DEFAULT_SOCKET_PATH
from vmha_guest.local_protocol import (
    ENV_SOCKET,
    MAX_REPLY_LINE_BYTES,
    MAX_TIMEOUT_MS,
    ErrorCode,
    Topic,
    encode_line,
)
from vmha_protocol.server_group import MemberState

__all__ = [
    "ACCEPT",
    "BroadcastEvent",
    "BroadcastResult",
    "Busy",
    "DaemonNotRunning",
    "DroppedEvent",
    "Event",
    "GuestClient",
    "HostEvent",
    "HostNotAnswering",
    "HostNotConnected",
    "HostUnavailable",
    "InvalidMessage",
    "MessageTooLarge",
    "MessagingDisabled",
    "NoticeEvent",
    "NotificationEvent",
    "RateLimited",
    "Refused",
    "StatusResult",
    "Topic",
    "VmhaError",
    "VoteDecision",
    "VoteEvent",
    "broadcast_sync",
    "default_socket_path",
    "reject",
    "status_sync",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
# The daemon answers within the timeout it is given; this covers the way back.
REPLY_GRACE_S = 1.0
DEFAULT_WATCH_TOPICS = (Topic.NOTIFICATION, Topic.BROADCAST)
# Events received but not yet taken with next_event/watch; beyond, the oldest are dropped
# and a DroppedEvent says how many.
MAX_QUEUED_EVENTS = 10_000
_T = TypeVar("_T")


def default_socket_path() -> Path:
    return Path(os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET_PATH)


# -- errors ------------------------------------------------------------------------------


class VmhaError(Exception):
    """A request that did not succeed; `code` is the local API's error code."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DaemonNotRunning(VmhaError):
    """The daemon cannot be reached (no socket, refused, no permission) or stopped answering."""

    code = "daemon-not-running"


class MessagingDisabled(VmhaError):
    code = ErrorCode.MESSAGING_DISABLED.value


class HostNotConnected(VmhaError):
    code = ErrorCode.HOST_NOT_CONNECTED.value


class HostNotAnswering(VmhaError):
    code = ErrorCode.HOST_NOT_ANSWERING.value


class HostUnavailable(HostNotAnswering):
    code = ErrorCode.UNAVAILABLE.value


class MessageTooLarge(VmhaError):
    code = ErrorCode.TOO_LARGE.value


class InvalidMessage(VmhaError):
    code = ErrorCode.INVALID_MESSAGE.value


class RateLimited(VmhaError):
    code = ErrorCode.RATE_LIMITED.value


class Refused(VmhaError):
    code = ErrorCode.REFUSED.value


class Busy(Refused):
    code = ErrorCode.BUSY.value


class UnknownVote(VmhaError):
    code = ErrorCode.UNKNOWN_VOTE.value


class InvalidRequest(VmhaError):
    code = ErrorCode.INVALID_REQUEST.value


class InternalError(VmhaError):
    code = ErrorCode.INTERNAL.value


_ERRORS: dict[str, type[VmhaError]] = {
    cls.code: cls
    for cls in (
        MessagingDisabled,
        HostNotConnected,
        HostNotAnswering,
        HostUnavailable,
        MessageTooLarge,
        InvalidMessage,
        RateLimited,
        Refused,
        Busy,
        UnknownVote,
        InvalidRequest,
        InternalError,
    )
}


def error_from_reply(error: Any) -> VmhaError:
    if not isinstance(error, dict):
        return InternalError(f"malformed error from the daemon: {error!r}")
    code, message = str(error.get("code")), str(error.get("message") or "")
    return _ERRORS.get(code, VmhaError)(message or code)


# -- results and events ------------------------------------------------------------------


@dataclass(frozen=True)
class BroadcastResult:
    bytes: int  # no nack came back within the daemon's window


@dataclass(frozen=True)
class StatusResult:
    members: tuple[MemberState, ...]  # every member of the group, this VM included
    truncated: bool = False
    seq: int = 0


@dataclass(frozen=True)
class NotificationEvent:
    member: MemberState  # the member whose state changed


@dataclass(frozen=True)
class BroadcastEvent:
    source_instance: str
    data: str


@dataclass(frozen=True)
class VoteEvent:
    """A revocable action put to this application; answer within `timeout_ms`."""

    vote_id: int
    event_type: str
    notification_type: str
    timeout_ms: int


@dataclass(frozen=True)
class NoticeEvent:
    """An action notice for information (irrevocable, or a vote put to others)."""

    event_type: str
    notification_type: str
    timeout_ms: int


@dataclass(frozen=True)
class HostEvent:
    connected: bool
    messaging: str  # unknown | enabled | disabled


@dataclass(frozen=True)
class DroppedEvent:
    count: int  # events the daemon dropped because this client read too slowly


Event = NotificationEvent | BroadcastEvent | VoteEvent | NoticeEvent | HostEvent | DroppedEvent


def parse_event(obj: dict[str, Any]) -> Event | None:
    """The event in a line from the daemon; None for a kind this library does not know."""
    try:
        match obj.get("event"):
            case "notification":
                return NotificationEvent(MemberState.model_validate(obj["member"]))
            case "broadcast":
                return BroadcastEvent(str(obj["source_instance"]), str(obj["data"]))
            case "vote":
                return VoteEvent(
                    int(obj["vote_id"]),
                    str(obj["event_type"]),
                    str(obj["notification_type"]),
                    int(obj["timeout_ms"]),
                )
            case "notice":
                return NoticeEvent(
                    str(obj["event_type"]), str(obj["notification_type"]), int(obj["timeout_ms"])
                )
            case "host":
                return HostEvent(bool(obj["connected"]), str(obj["messaging"]))
            case "dropped":
                return DroppedEvent(int(obj["count"]))
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        log.warning("ignored a malformed event from the daemon: %s", exc)
    return None


@dataclass(frozen=True)
class VoteDecision:
    accept: bool
    reason: str = ""


ACCEPT = VoteDecision(True)


def reject(reason: str) -> VoteDecision:
    """Object to the action; `reason` reaches the platform (the first 224 bytes)."""
    return VoteDecision(False, reason)


VoteHandler = Callable[[VoteEvent], VoteDecision | Awaitable[VoteDecision]]


# -- the client --------------------------------------------------------------------------


class GuestClient:
    """One connection to the daemon; requests may run concurrently on it."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.timeout = timeout
        self.name = name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: connection ended
        self._missed = 0
        self._topics: frozenset[Topic] = frozenset()
        self._vote_handler: VoteHandler | None = None
        self._voting: set[asyncio.Task[None]] = set()
        self._ended: VmhaError | None = None
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        where = self.socket_path
        try:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(where), limit=MAX_REPLY_LINE_BYTES
                )
        except FileNotFoundError:
            raise DaemonNotRunning(f"no socket at {where}: is vmha-guest running?") from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(f"nothing listens on {where}: is vmha-guest running?") from None
        except PermissionError:
            raise DaemonNotRunning(
                f"permission denied on {where}: the socket's group (local_api.group) may be needed"
            ) from None
        except TimeoutError:
            raise DaemonNotRunning(f"the daemon did not accept a connection on {where}") from None
        except OSError as exc:
            raise DaemonNotRunning(f"cannot connect to {where}: {exc.strerror or exc}") from None
        self._reading = asyncio.create_task(self._read_loop(), name="vmha-guest client reader")

    async def close(self) -> None:
        for task in (self._reading, *self._voting):
            if task is not None:
                task.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._end(DaemonNotRunning("the connection to the daemon is closed"))

    # -- operations ----------------------------------------------------------------------

    async def broadcast(self, data: str, *, timeout: float | None = None) -> BroadcastResult:
        """Send `data` (at most 3050 bytes of UTF-8, one line) to every other member."""
        result = await self._request({"op": "broadcast", "data": data}, timeout)
        return BroadcastResult(int(result.get("bytes", 0)))

    async def status(self, *, timeout: float | None = None) -> StatusResult:
        """The state of every member of the group, this VM included."""
        result = await self._request({"op": "status"}, timeout)
        try:
            members = tuple(MemberState.model_validate(m) for m in result["members"])
        except (KeyError, TypeError, ValidationError) as exc:
            raise InternalError(f"malformed status from the daemon: {exc}") from None
        return StatusResult(members, bool(result.get("truncated")), int(result.get("seq", 0)))

    async def subscribe(self, topics: Iterable[Topic | str]) -> None:
        """Receive events of these topics (replaces the previous subscription)."""
        wanted = frozenset(Topic(topic) for topic in topics)
        if self._vote_handler is not None:
            wanted |= {Topic.VOTE}
        request: dict[str, Any] = {"op": "subscribe", "topics": sorted(wanted)}
        if self.name:
            request["name"] = self.name
        await self._request(request, None, with_timeout=False)
        self._topics = wanted

    async def next_event(self, *, timeout: float | None = None) -> Event:
        """The next event of the subscribed topics; TimeoutError if none comes in time."""
        if self._missed:
            missed, self._missed = self._missed, 0
            return DroppedEvent(missed)
        async with asyncio.timeout(timeout):
            item = await self._events.get()
        if item is None:
            self._events.put_nowait(None)  # for the next caller too
            raise self._ended or DaemonNotRunning("the daemon closed the connection")
        return item

    async def watch(
        self, topics: Iterable[Topic | str] = DEFAULT_WATCH_TOPICS
    ) -> AsyncIterator[Event]:
        """Subscribe, then yield events as they come, until the connection ends
        (DaemonNotRunning) or the caller stops iterating."""
        await self.subscribe(topics)
        while True:
            yield await self.next_event()

    async def votes(self, handler: VoteHandler) -> None:
        """Answer every vote with `handler` until the connection ends (then raises
        DaemonNotRunning); see `handle_votes`."""
        await self.handle_votes(handler)
        await self._closed.wait()
        raise self._ended or DaemonNotRunning("the daemon closed the connection")

    async def handle_votes(self, handler: VoteHandler) -> None:
        """From now on, answer votes with `handler` (plain or async; it has the vote's
        `timeout_ms`), alongside whatever else this connection does. A handler that fails
        counts as accept; a late one as no answer, which the daemon counts as accept."""
        self._vote_handler = handler
        await self.subscribe(self._topics)

    async def answer_vote(self, vote_id: int, decision: VoteDecision) -> None:
        await self._request(
            {
                "op": "vote",
                "vote_id": vote_id,
                "result": "accept" if decision.accept else "reject",
                "reason": decision.reason[:1024],
            },
            None,
            with_timeout=False,
        )

    # -- plumbing ------------------------------------------------------------------------

    async def _request(
        self, payload: dict[str, Any], timeout: float | None, *, with_timeout: bool = True
    ) -> dict[str, Any]:
        if self._ended is not None:
            raise self._ended
        if self._writer is None:
            raise DaemonNotRunning("not connected: call connect() first")
        timeout_s = self.timeout if timeout is None else timeout
        ident = next(self._ids)
        message = {"id": ident, **payload}
        if with_timeout:
            message["timeout_ms"] = max(1, min(round(timeout_s * 1000), MAX_TIMEOUT_MS))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ident] = future
        try:
            async with asyncio.timeout(timeout_s + REPLY_GRACE_S):
                self._writer.write(encode_line(message))
                await self._writer.drain()
                reply = await future
        except TimeoutError:
            raise DaemonNotRunning(
                f"the daemon did not answer within {timeout_s + REPLY_GRACE_S:g} s"
            ) from None
        except ConnectionError as exc:
            raise DaemonNotRunning(f"lost the connection to the daemon: {exc}") from None
        finally:
            self._replies.pop(ident, None)
        if reply.get("ok") is True:
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        raise error_from_reply(reply.get("error"))

    async def _read_loop(self) -> None:
        assert self._reader is not None
        refusal: VmhaError | None = None  # the daemon refused the connection as a whole
        ending: VmhaError = DaemonNotRunning("the daemon closed the connection")
        try:
            while line := await self._reader.readline():
                refusal = self._dispatch(line) or refusal
        except (ConnectionError, ValueError) as exc:
            ending = DaemonNotRunning(f"lost the connection to the daemon: {exc}")
        finally:
            self._end(refusal or ending)

    def _dispatch(self, line: bytes) -> VmhaError | None:
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("ignored a line from the daemon that is not JSON")
            return None
        if not isinstance(obj, dict):
            return None
        if "event" in obj:
            event = parse_event(obj)
            if isinstance(event, VoteEvent) and self._vote_handler is not None:
                self._start_vote(self._vote_handler, event)
            elif event is not None:
                self._queue_event(event)
            return None
        ident = obj.get("id")
        future = self._replies.get(ident) if isinstance(ident, int) else None
        if future is not None and not future.done():
            future.set_result(obj)
        elif ident is None and obj.get("ok") is False:
            # Refused as a whole (too many clients): the daemon closes the connection.
            return error_from_reply(obj.get("error"))
        return None

    def _queue_event(self, event: Event) -> None:
        if self._events.qsize() >= MAX_QUEUED_EVENTS:
            self._events.get_nowait()
            self._missed += 1
        self._events.put_nowait(event)

    def _start_vote(self, handler: VoteHandler, event: VoteEvent) -> None:
        task = asyncio.create_task(self._vote(handler, event))
        self._voting.add(task)
        task.add_done_callback(self._voting.discard)

    async def _vote(self, handler: VoteHandler, event: VoteEvent) -> None:
        try:
            async with asyncio.timeout(event.timeout_ms / 1000):
                decision = await _maybe_await(handler(event))
        except TimeoutError:
            log.warning("vote %d (%s): the handler was too late", event.vote_id, event.event_type)
            return
        except Exception:
            log.exception("vote %d (%s): the handler failed", event.vote_id, event.event_type)
            decision = ACCEPT
        with contextlib.suppress(VmhaError):
            await self.answer_vote(event.vote_id, decision)

    def _end(self, error: VmhaError) -> None:
        if self._ended is not None:
            return
        self._ended = error
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
        self._events.put_nowait(None)
        self._closed.set()


async def _maybe_await(value: _T | Awaitable[_T]) -> _T:
    if inspect.isawaitable(value):
        return await value
    return value


# -- for scripts without an event loop ---------------------------------------------------


def broadcast_sync(
    data: str,
    *,
    socket_path: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> BroadcastResult:
    async def run() -> BroadcastResult:
        async with GuestClient(socket_path, timeout=timeout) as client:
            return await client.broadcast(data)

    return asyncio.run(run())


def status_sync(
    *, socket_path: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> StatusResult:
    async def run() -> StatusResult:
        async with GuestClient(socket_path, timeout=timeout) as client:
            return await client.status()

    return asyncio.run(run())
