"""Base layer (PROTOCOL.md §3): the envelope, and decoding into typed messages.

`decode_from_guest` is what the node agent applies to every frame a guest sends;
`decode_from_host` is the guest daemon's mirror. Both raise `ProtocolError` and
nothing else.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Generic, NamedTuple, TypeVar

import pydantic_core
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from vmha_protocol import limits
from vmha_protocol.addresses import KNOWN_ADDRESSES, AppGroup, group_of
from vmha_protocol.errors import ProtocolError
from vmha_protocol.heartbeat import (
    GUEST_HEARTBEAT_ADAPTER,
    HOST_HEARTBEAT_ADAPTER,
    GuestHeartbeatMessage,
    HostHeartbeatMessage,
)
from vmha_protocol.server_group import (
    GUEST_SERVER_GROUP_ADAPTER,
    HOST_SERVER_GROUP_ADAPTER,
    GuestServerGroupMessage,
    HostServerGroupMessage,
)
from vmha_protocol.types import max_bytes

M = TypeVar("M")

GuestMessage = GuestHeartbeatMessage | GuestServerGroupMessage
HostMessage = HostHeartbeatMessage | HostServerGroupMessage


class Inbound(NamedTuple, Generic[M]):
    """A decoded message and the group address its sender used (to answer on it).

    A named tuple: one is made per frame received, at a third of a frozen dataclass's cost."""

    group: AppGroup
    address: str
    message: M


def decode_from_guest(obj: dict[str, Any]) -> Inbound[GuestMessage]:
    return _decode(
        obj,
        {
            AppGroup.HEARTBEAT: GUEST_HEARTBEAT_ADAPTER,
            AppGroup.SERVER_GROUP: GUEST_SERVER_GROUP_ADAPTER,
        },
    )


class _HeartbeatEnvelope(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    dest_addr: str
    data: GuestHeartbeatMessage


_HEARTBEAT_ENVELOPE = TypeAdapter(_HeartbeatEnvelope)


def decode_canonical_heartbeat(line: bytes) -> Inbound[GuestMessage] | None:
    """A guest's heartbeat frame decoded in one pass from its bytes, or None: then parse the
    frame and call `decode_from_guest`, which decides every case with full diagnostics.

    The agent decodes a challenge response per guest per interval; parsing JSON in Python
    and then validating the objects costs about twice this. The result is only taken when
    `line` is exactly the compact encoding of the message it validated to (what `encode`
    writes, all keys set, in order): such a frame parses to the same object on either path,
    so the answer is the one `decode_from_guest` would give.
    """
    if not line.startswith(_HEARTBEAT_PREFIXES):  # cheap: most other frames end here
        return None
    try:
        envelope = _HEARTBEAT_ENVELOPE.validate_json(line)
    except ValidationError:
        return None
    address, message = envelope.dest_addr, envelope.data
    if group_of(address) is not AppGroup.HEARTBEAT:
        return None
    body = message.__pydantic_serializer__.to_json(message, exclude_unset=True)
    if not limits.HEARTBEAT_MIN_MSG_BYTES <= len(body) <= limits.HEARTBEAT_MAX_MSG_BYTES:
        return None
    # The frame arrives without the delimiter that starts the encoding.
    if line != b"".join((_envelope_prefix(address)[1:], body, b"}")):
        return None
    return Inbound(group=AppGroup.HEARTBEAT, address=address, message=message)


def decode_from_host(obj: dict[str, Any]) -> Inbound[HostMessage]:
    return _decode(
        obj,
        {
            AppGroup.HEARTBEAT: HOST_HEARTBEAT_ADAPTER,
            AppGroup.SERVER_GROUP: HOST_SERVER_GROUP_ADAPTER,
        },
    )


def encode(address: str, message: BaseModel) -> bytes:
    """Frame an application message in the envelope for `address` (both directions).

    Equivalent to `encode_frame` of the envelope dict, but serialises the message with
    pydantic's compiled serializer: this runs for every challenge the agent sends.
    """
    return b"".join((_envelope_prefix(address), message.model_dump_json().encode("utf-8"), b"}\n"))


@functools.lru_cache(maxsize=64)
def _envelope_prefix(address: str) -> bytes:
    quoted = json.dumps(address, ensure_ascii=False)
    return (
        f'\n{{"version":{limits.BASE_VERSION},"source_addr":{quoted},"dest_addr":{quoted},"data":'
    ).encode()


_check_address = max_bytes(limits.HEARTBEAT_MAX_VALUE_BYTES)


def _decode(obj: dict[str, Any], adapters: dict[AppGroup, TypeAdapter[Any]]) -> Inbound[Any]:
    address, data = _open_envelope(obj)
    group = group_of(address)
    if group is None:
        raise ProtocolError(f"unknown application group {address!r}")
    msg_type = data.get("msg_type")
    invocation_id = data.get("invocation_id")

    def error(reason: str) -> ProtocolError:
        # As much context as could be read, so the caller can address a nack.
        return ProtocolError(
            reason,
            group=group,
            address=address,
            msg_type=msg_type if isinstance(msg_type, str) else None,
            invocation_id=invocation_id if type(invocation_id) is int else None,
        )

    if group is AppGroup.HEARTBEAT:
        size = len(pydantic_core.to_json(data))
        if not limits.HEARTBEAT_MIN_MSG_BYTES <= size <= limits.HEARTBEAT_MAX_MSG_BYTES:
            raise error(
                f"heartbeat message of {size} bytes outside "
                f"{limits.HEARTBEAT_MIN_MSG_BYTES}..{limits.HEARTBEAT_MAX_MSG_BYTES}"
            )
    try:
        message = adapters[group].validate_python(data)
    except ValidationError as exc:
        raise error(_describe(exc)) from None
    return Inbound(group=group, address=address, message=message)


def _open_envelope(obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    version = obj.get("version")
    if version != limits.BASE_VERSION or isinstance(version, bool):
        raise ProtocolError(f"unsupported base layer version {version!r}")
    dest = obj.get("dest_addr")
    if not isinstance(dest, str):
        raise ProtocolError("dest_addr missing or not a string")
    try:
        _check_address(dest)
    except ValueError as exc:
        raise ProtocolError(f"dest_addr {exc}") from None
    data = obj.get("data")
    if not isinstance(data, dict):
        raise ProtocolError("data missing or not an object", group=group_of(dest), address=dest)
    return dest, data


def _describe(exc: ValidationError) -> str:
    """A one-line reason from pydantic's errors, short enough for a nack's log_msg."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


# How a canonical heartbeat frame starts (without its leading delimiter), per address.
_HEARTBEAT_PREFIXES = tuple(
    _envelope_prefix(address)[1:]
    for address in KNOWN_ADDRESSES
    if group_of(address) is AppGroup.HEARTBEAT
)
