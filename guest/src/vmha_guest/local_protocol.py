"""The local API between `vmha-guest` and applications in the guest: what travels on the
unix socket. The daemon (`local_api.py`) and the client library (`client.py`) share it.

One JSON object per line, UTF-8, in both directions:

- request  `{"id": 1, "op": "status", "timeout_ms": 2000}`
- reply    `{"id": 1, "ok": true, "result": {...}}`
           `{"id": 1, "ok": false, "error": {"code": "messaging-disabled", "message": "..."}}`
- event    `{"event": "notification", "member": {...}}` (no id; only to subscribers)

Operations: `broadcast {data, timeout_ms?}`, `status {timeout_ms?}`,
`subscribe {topics, name?}` (replaces the connection's topics), and
`vote {vote_id, result, reason?}` (an answer to a `vote` event).
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from vmha_protocol.heartbeat import ActionNotify
from vmha_protocol.server_group import MemberState

ENV_SOCKET: Final = "VMHA_GUEST_SOCKET"  # the client library's default socket, if set
# A request carries at most a broadcast of 3050 bytes, which JSON escaping can at most
# double; anything longer is a mistake or an attack, and the connection is closed.
MAX_REQUEST_LINE_BYTES: Final = 64 * 1024
# A status reply lists every member (a group has at most 1000).
MAX_REPLY_LINE_BYTES: Final = 8 * 1024 * 1024
MAX_TIMEOUT_MS: Final = 600_000
MAX_CLIENT_NAME_BYTES: Final = 64
MAX_VOTE_REASON_CHARS: Final = 1024  # cut to the protocol's 224 bytes when sent


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "invalid-request"  # not a request this API understands
    TOO_LARGE = "too-large"  # a broadcast over 3050 bytes (refused here or by the host)
    INVALID_MESSAGE = "invalid-message"  # a broadcast with a newline or control character
    MESSAGING_DISABLED = "messaging-disabled"  # off for this VM's group, or in this guest
    HOST_NOT_CONNECTED = "host-not-connected"  # the port has no host on the other side
    HOST_NOT_ANSWERING = "host-not-answering"  # a query went unanswered
    UNAVAILABLE = "unavailable"  # the host cannot serve it now
    RATE_LIMITED = "rate-limited"  # the host dropped a broadcast over the VM's budget
    REFUSED = "refused"  # the host refused it for another reason
    BUSY = "busy"  # too many clients or requests at once
    UNKNOWN_VOTE = "unknown-vote"  # an answer to a vote that is over or not ours
    INTERNAL = "internal"


class Topic(enum.StrEnum):
    NOTIFICATION = "notification"  # a member's state changed
    BROADCAST = "broadcast"  # a message from another member
    VOTE = "vote"  # revocable actions to vote on (subscribers must answer), and notices
    NOTICE = "notice"  # every action notice, for information only
    HOST = "host"  # the connection to the host and the messaging state changed


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: int | Annotated[str, Field(max_length=64)]


TimeoutMs = Annotated[int, Field(ge=1, le=MAX_TIMEOUT_MS)]


class BroadcastRequest(_Request):
    op: Literal["broadcast"]
    data: str
    timeout_ms: TimeoutMs | None = None


class StatusRequest(_Request):
    op: Literal["status"]
    timeout_ms: TimeoutMs | None = None


class SubscribeRequest(_Request):
    op: Literal["subscribe"]
    topics: Annotated[list[Topic], Field(max_length=len(Topic))]
    name: Annotated[str, Field(max_length=MAX_CLIENT_NAME_BYTES)] | None = None


class VoteRequest(_Request):
    op: Literal["vote"]
    vote_id: int
    result: Literal["accept", "reject"]
    reason: Annotated[str, Field(max_length=MAX_VOTE_REASON_CHARS)] = ""


Request = Annotated[
    BroadcastRequest | StatusRequest | SubscribeRequest | VoteRequest,
    Field(discriminator="op"),
]
REQUEST_ADAPTER: TypeAdapter[Request] = TypeAdapter(Request)


class ApiError(Exception):
    """A request that failed; the reply carries `code` and `message`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_request(line: bytes) -> Request:
    """A request from one line; ApiError(INVALID_REQUEST) saying what is wrong."""
    try:
        # JSON mode: strict, yet enum values arrive as strings.
        return REQUEST_ADAPTER.validate_json(line)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise ApiError(ErrorCode.INVALID_REQUEST, f"{where}: {first['msg']}") from None


def request_id(line: bytes) -> int | str | None:
    """The id of a request that failed to parse, if one can be read (to address the error)."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def encode_line(obj: dict[str, Any]) -> bytes:
    # json.dumps escapes newlines inside strings: one object is always one line.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def ok_reply(request_id: int | str, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | str | None, error: ApiError) -> dict[str, Any]:
    return {
        "id": request_id,
        "ok": False,
        "error": {"code": error.code.value, "message": error.message},
    }


# -- events ------------------------------------------------------------------------------


def notification_event(member: MemberState) -> dict[str, Any]:
    return {"event": "notification", "member": member.model_dump(mode="json")}


def broadcast_event(source_instance: str, data: str) -> dict[str, Any]:
    return {"event": "broadcast", "source_instance": source_instance, "data": data}


def vote_event(vote_id: int, notify: ActionNotify, answer_within_ms: int) -> dict[str, Any]:
    return {
        "event": "vote",
        "vote_id": vote_id,
        "event_type": notify.event_type,
        "notification_type": notify.notification_type,
        "timeout_ms": answer_within_ms,
    }


def notice_event(notify: ActionNotify) -> dict[str, Any]:
    return {
        "event": "notice",
        "event_type": notify.event_type,
        "notification_type": notify.notification_type,
        "timeout_ms": notify.timeout_ms,
    }


def host_event(connected: bool, messaging: str) -> dict[str, Any]:
    return {"event": "host", "connected": connected, "messaging": messaging}


def dropped_event(count: int) -> dict[str, Any]:
    return {"event": "dropped", "count": count}
