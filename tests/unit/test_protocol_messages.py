"""Envelope and application layers: typed models, limits, errors a caller can nack."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from vmha_protocol import (
    AppGroup,
    FrameDecoder,
    Inbound,
    ProtocolError,
    decode_canonical_heartbeat,
    decode_from_guest,
    decode_from_host,
    encode,
)
from vmha_protocol.addresses import KNOWN_ADDRESSES, default_address
from vmha_protocol.heartbeat import (
    ActionNotify,
    ActionResponse,
    Challenge,
    ChallengeResponse,
    Exit,
    HeartbeatNack,
    Init,
    InitAck,
)
from vmha_protocol.limits import MAX_BROADCAST_BYTES, MAX_FRAME_BYTES
from vmha_protocol.nack import NackReason, nack_reason, nack_text
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

INIT = Init(
    invocation_id=7,
    name="vm-1",
    heartbeat_interval_ms=1000,
    vote_secs=10,
    shutdown_notice_secs=5,
    suspend_notice_secs=5,
    resume_notice_secs=5,
    restart_secs=60,
    corrective_action="reboot",
)
MEMBER = MemberState(instance_id="uid-1", display_name="vm-1", state="paused", node="node-a")

GUEST_HEARTBEAT: list[BaseModel] = [
    INIT,
    ChallengeResponse(
        invocation_id=7,
        heartbeat_response=123,
        heartbeat_health="healthy",
        corrective_action="log",
        log_msg="all good",
    ),
    ActionResponse(
        invocation_id=7,
        event_type="live_migrate_begin",
        notification_type="revocable",
        vote_result="reject",
        log_msg="busy",
    ),
    Exit(invocation_id=7, log_msg="bye"),
]
HOST_HEARTBEAT: list[BaseModel] = [
    InitAck(invocation_id=7),
    Challenge(invocation_id=7, heartbeat_challenge=2**32 - 1),
    ActionNotify(
        invocation_id=7, event_type="stop", notification_type="irrevocable", timeout_ms=5000
    ),
    HeartbeatNack(invocation_id=7, log_msg="no"),
]
GUEST_SERVER_GROUP: list[BaseModel] = [StatusQuery(seq=3), GuestBroadcast(data="hello")]
HOST_SERVER_GROUP: list[BaseModel] = [
    StatusResponse(seq=3, data=MEMBER),
    StatusResponseDone(seq=3),
    Notification(data=MEMBER),
    HostBroadcast(source_instance="ns/vm-2", data="hello"),
    ServerGroupNack(orig_msg_type="broadcast", log_msg="messaging is off"),
]


def wire(message: BaseModel, address: str) -> dict[str, Any]:
    [obj] = FrameDecoder().feed(encode(address, message))
    return obj


def envelope(address: str, data: Any) -> dict[str, Any]:
    return {"version": 1, "source_addr": address, "dest_addr": address, "data": data}


@pytest.mark.parametrize("original", [False, True], ids=["vmha", "cgcs"])
@pytest.mark.parametrize("message", GUEST_HEARTBEAT + GUEST_SERVER_GROUP, ids=repr)
def test_guest_messages_round_trip(message: BaseModel, original: bool) -> None:
    group = AppGroup.HEARTBEAT if message in GUEST_HEARTBEAT else AppGroup.SERVER_GROUP
    address = default_address(group, original=original)
    inbound = decode_from_guest(wire(message, address))
    assert inbound.group is group
    assert inbound.address == address
    assert inbound.message == message


@pytest.mark.parametrize("message", HOST_HEARTBEAT + HOST_SERVER_GROUP, ids=repr)
def test_host_messages_round_trip(message: BaseModel) -> None:
    group = AppGroup.HEARTBEAT if message in HOST_HEARTBEAT else AppGroup.SERVER_GROUP
    inbound = decode_from_host(wire(message, default_address(group, original=True)))
    assert inbound.message == message


def test_both_address_families_are_known() -> None:
    assert {
        "cgcs.heartbeat",
        "cgcs.server_grp",
        "vmha.heartbeat",
        "vmha.server_group",
    } == KNOWN_ADDRESSES


def test_a_message_of_the_other_direction_is_refused() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_from_guest(wire(Challenge(invocation_id=1, heartbeat_challenge=1), "vmha.heartbeat"))
    assert caught.value.nackable
    assert caught.value.msg_type == "challenge"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(name="x" * 65), "name"),
        (lambda d: d.update(name="é" * 33), "66 bytes"),  # 33 characters, 66 bytes
        (lambda d: d.update(corrective_action="unknown"), "corrective_action"),
        (lambda d: d.update(heartbeat_interval_ms="1000"), "heartbeat_interval_ms"),
        (lambda d: d.update(heartbeat_interval_ms=0), "heartbeat_interval_ms"),
        (lambda d: d.update(vote_secs=True), "vote_secs"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.pop("restart_secs"), "restart_secs"),
        (lambda d: d.update(msg_type="hello"), "msg_type"),
        (lambda d: d.update(invocation_id=-1), "invocation_id"),
    ],
)
def test_invalid_heartbeat_fields_give_a_nackable_error(mutate: Any, expected: str) -> None:
    data = INIT.model_dump()
    mutate(data)
    with pytest.raises(ProtocolError) as caught:
        decode_from_guest(envelope("cgcs.heartbeat", data))
    error = caught.value
    assert expected in str(error)
    assert error.nackable and error.group is AppGroup.HEARTBEAT
    assert error.address == "cgcs.heartbeat"
    if isinstance(data.get("invocation_id"), int) and data["invocation_id"] >= 0:
        assert error.invocation_id == data["invocation_id"]


def test_log_message_limit_is_in_bytes() -> None:
    data = GUEST_HEARTBEAT[1].model_dump() | {"log_msg": "x" * 224}
    assert decode_from_guest(envelope("vmha.heartbeat", data)).message.log_msg == "x" * 224  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="log_msg"):
        decode_from_guest(envelope("vmha.heartbeat", data | {"log_msg": "x" * 225}))


def test_heartbeat_message_size_bounds() -> None:
    with pytest.raises(ProtocolError, match=r"outside 32\.\.1056"):
        decode_from_guest(envelope("vmha.heartbeat", {"msg_type": "exit"}))
    padded = INIT.model_dump() | {"future_key": "y" * 1000}
    with pytest.raises(ProtocolError, match=r"outside 32\.\.1056"):
        decode_from_guest(envelope("vmha.heartbeat", padded))


def test_unknown_extra_keys_are_ignored() -> None:
    data = INIT.model_dump() | {"added_in_revision_2": 1}
    assert decode_from_guest(envelope("vmha.heartbeat", data)).message == INIT


def test_broadcast_limit_and_content() -> None:
    largest = "x" * MAX_BROADCAST_BYTES
    frame = encode("vmha.server_group", GuestBroadcast(data=largest))
    assert len(frame) < MAX_FRAME_BYTES
    assert decode_from_guest(wire(GuestBroadcast(data=largest), "cgcs.server_grp")).message
    too_big = envelope(
        "cgcs.server_grp", {"version": 1, "msg_type": "broadcast", "data": largest + "x"}
    )
    with pytest.raises(ProtocolError, match="3051 bytes"):
        decode_from_guest(too_big)
    control = envelope("cgcs.server_grp", {"version": 1, "msg_type": "broadcast", "data": "a\x00b"})
    with pytest.raises(ProtocolError, match="control character"):
        decode_from_guest(control)


def test_worst_case_legal_broadcast_fits_in_a_frame() -> None:
    # Characters that JSON escapes to two bytes, plus the longest source address.
    worst = HostBroadcast(source_instance="s" * 253, data='"' * MAX_BROADCAST_BYTES)
    assert len(encode("vmha.server_group", worst)) <= MAX_FRAME_BYTES


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"version": 2, "dest_addr": "vmha.heartbeat", "data": {}}, "base layer version"),
        ({"version": True, "dest_addr": "vmha.heartbeat", "data": {}}, "base layer version"),
        ({"version": 1, "data": {}}, "dest_addr"),
        ({"version": 1, "dest_addr": "x" * 40, "data": {}}, "dest_addr"),
        ({"version": 1, "dest_addr": "vmha.nothing", "data": {}}, "unknown application group"),
    ],
)
def test_envelope_errors_are_not_nackable(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as caught:
        decode_from_guest(obj)
    assert not caught.value.nackable


def test_missing_data_is_nackable_on_a_known_group() -> None:
    with pytest.raises(ProtocolError, match="data") as caught:
        decode_from_guest({"version": 1, "dest_addr": "cgcs.server_grp", "data": [1]})
    assert caught.value.nackable and caught.value.group is AppGroup.SERVER_GROUP


def test_member_state_keeps_unknown_keys_for_guests() -> None:
    data = MEMBER.model_dump() | {"added_later": "x"}
    note = envelope("vmha.server_group", {"version": 1, "msg_type": "notification", "data": data})
    message = decode_from_host(note).message
    assert isinstance(message, Notification)
    assert message.data.model_extra == {"added_later": "x"}
    assert message.data.state == "paused" and message.data.display_name == "vm-1"


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_any = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=10,
)
heartbeat_keys = st.sampled_from(
    [*Init.model_fields, *ChallengeResponse.model_fields, "msg_type", "data", "seq"]
)


@given(
    st.sampled_from([*sorted(KNOWN_ADDRESSES), "bogus"]),
    st.dictionaries(heartbeat_keys, json_any, max_size=12),
)
def test_arbitrary_data_either_decodes_or_raises_protocol_error(
    address: str, data: dict[str, Any]
) -> None:
    obj = json.loads(json.dumps(envelope(address, data)))
    for decode in (decode_from_guest, decode_from_host):
        with contextlib.suppress(ProtocolError):
            decode(obj)


@given(json_any)
def test_arbitrary_envelopes_only_raise_protocol_error(value: Any) -> None:
    obj = (
        value
        if isinstance(value, dict)
        else {"version": 1, "dest_addr": "vmha.heartbeat", "data": value}
    )
    with contextlib.suppress(ProtocolError):
        decode_from_guest(obj)


@pytest.mark.parametrize("reason", list(NackReason))
def test_nack_reason_round_trips_through_log_msg(reason: NackReason) -> None:
    text = nack_text(reason, "details: with a colon", limit=224)
    assert nack_reason(text) is reason
    assert text.startswith(reason.value + ": ")


def test_nack_text_is_cut_to_the_limit_and_foreign_text_has_no_reason() -> None:
    assert len(nack_text(NackReason.INVALID, "é" * 300, limit=224).encode()) <= 224
    assert nack_reason("could not parse message") is None
    assert nack_reason("bogus-code: x") is None
    assert NackReason.NOT_REGISTERED.asks_to_register
    assert not NackReason.RATE_LIMITED.asks_to_register


# --- the one-pass path for canonical heartbeat frames -----------------------------------


def decoded_by_parsing(line: bytes) -> Inbound[Any] | ProtocolError | None:
    """What the general path makes of a frame: None if it is not a JSON object."""
    objects = FrameDecoder().feed(line + b"\n")
    if not objects:
        return None
    try:
        return decode_from_guest(objects[0])
    except ProtocolError as error:
        return error


@pytest.mark.parametrize("original", [False, True], ids=["vmha", "cgcs"])
@pytest.mark.parametrize("message", GUEST_HEARTBEAT, ids=repr)
def test_canonical_heartbeat_frames_take_the_one_pass_path(
    message: BaseModel, original: bool
) -> None:
    line = encode(default_address(AppGroup.HEARTBEAT, original=original), message).strip()
    fast = decode_canonical_heartbeat(line)
    assert fast is not None
    assert fast == decoded_by_parsing(line)


@pytest.mark.parametrize(
    "line",
    [
        # the same message with other formatting, key order or extra keys
        b'{"version":1,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat", "data":'
        b'{"invocation_id":7,"msg_type":"exit"}}',
        b'{"version":1,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat","data":'
        b'{"msg_type":"exit","version":3,"revision":1,"sequence":0,"invocation_id":7,'
        b'"log_msg":""}}',
        b'{"version":1,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat","data":'
        b'{"version":3,"revision":1,"sequence":0,"invocation_id":7,"msg_type":"exit",'
        b'"log_msg":"","later":NaN}}',
        # a boolean version, an escaped character, a server group frame, invalid messages
        b'{"version":true,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat","data":'
        b'{"version":3,"revision":1,"sequence":0,"invocation_id":7,"msg_type":"exit",'
        b'"log_msg":""}}',
        b'{"version":1,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat","data":'
        b'{"version":3,"revision":1,"sequence":0,"invocation_id":7,"msg_type":"exit",'
        b'"log_msg":"\\u0062ye"}}',
        encode("vmha.server_group", StatusQuery(seq=3)).strip(),
        b'{"version":1,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat","data":'
        b'{"version":3,"revision":1,"sequence":0,"invocation_id":-1,"msg_type":"exit",'
        b'"log_msg":""}}',
        b'{"version":1,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat","data":'
        b'{"version":3,"revision":1,"sequence":0,"invocation_id":7,"msg_type":"exit",'
        b'"log_msg":"' + b"\\u0001" * 200 + b'"}}',
    ],
)
def test_other_frames_are_left_to_the_general_path(line: bytes) -> None:
    assert decode_canonical_heartbeat(line) is None


guest_heartbeat_messages = st.one_of(
    st.builds(
        ChallengeResponse,
        invocation_id=st.integers(0, 2**40),
        sequence=st.integers(0, 2**40),
        heartbeat_response=st.integers(0, 2**32 - 1),
        heartbeat_health=st.sampled_from(["healthy", "unhealthy"]),
        corrective_action=st.sampled_from(["none", "reboot", "stop", "log"]),
        log_msg=st.text(max_size=50),
    ),
    st.builds(Exit, invocation_id=st.integers(0, 2**40), log_msg=st.text(max_size=50)),
)


@given(guest_heartbeat_messages, st.sampled_from(sorted(KNOWN_ADDRESSES)))
def test_the_one_pass_path_agrees_with_the_general_path(message: BaseModel, address: str) -> None:
    line = encode(address, message).strip()
    general = decoded_by_parsing(line)
    # Every heartbeat message `encode` writes, and only those the general path accepts.
    expected = (
        general if isinstance(general, Inbound) and general.group is AppGroup.HEARTBEAT else None
    )
    assert decode_canonical_heartbeat(line) == expected


@given(st.binary(max_size=300) | json_any.map(lambda v: json.dumps(v).encode()))
def test_the_one_pass_path_takes_no_frame_the_general_path_decodes_otherwise(
    line: bytes,
) -> None:
    fast = decode_canonical_heartbeat(line.strip())
    if fast is not None:
        assert fast == decoded_by_parsing(line.strip())
