"""Heartbeat application layer, version 3 revision 1 (PROTOCOL.md §4)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from vmha_protocol import limits
from vmha_protocol.types import Counter, max_bytes

CorrectiveAction = Literal["none", "reboot", "stop", "log"]
Health = Literal["healthy", "unhealthy"]
EventType = Literal[
    "stop",
    "reboot",
    "suspend",
    "pause",
    "unpause",
    "resume",
    "resize_begin",
    "resize_end",
    "live_migrate_begin",
    "live_migrate_end",
    "cold_migrate_begin",
    "cold_migrate_end",
]
NotificationType = Literal["revocable", "irrevocable"]
VoteResult = Literal["accept", "reject", "complete", "timeout", "error"]

InstanceName = Annotated[str, AfterValidator(max_bytes(limits.HEARTBEAT_MAX_NAME_BYTES))]
LogMsg = Annotated[str, AfterValidator(max_bytes(limits.HEARTBEAT_MAX_LOG_BYTES))]
NoticeSecs = Annotated[int, Field(ge=0, le=limits.HEARTBEAT_MAX_NOTICE_SECS)]
Challenge32 = Annotated[int, Field(ge=0, le=limits.HEARTBEAT_MAX_CHALLENGE)]


class HeartbeatMessage(BaseModel):
    """Keys common to every heartbeat message."""

    # strict: a guest sending "3" where 3 is due is wrong, not something to coerce.
    # extra="ignore": later revisions may add keys; older receivers skip them.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    version: Literal[3] = limits.HEARTBEAT_VERSION
    revision: Annotated[int, Field(ge=1)] = limits.HEARTBEAT_REVISION
    sequence: Counter = 0
    invocation_id: Counter


class Init(HeartbeatMessage):
    """guest→host: register for heartbeating."""

    msg_type: Literal["init"] = "init"
    name: InstanceName
    heartbeat_interval_ms: Annotated[int, Field(gt=0, le=limits.HEARTBEAT_MAX_INTERVAL_MS)]
    vote_secs: NoticeSecs
    shutdown_notice_secs: NoticeSecs
    suspend_notice_secs: NoticeSecs
    resume_notice_secs: NoticeSecs
    restart_secs: NoticeSecs
    corrective_action: CorrectiveAction


class InitAck(HeartbeatMessage):
    """host→guest: registration accepted."""

    msg_type: Literal["init_ack"] = "init_ack"


class Challenge(HeartbeatMessage):
    """host→guest: are you healthy? Answer before the next challenge."""

    msg_type: Literal["challenge"] = "challenge"
    heartbeat_challenge: Challenge32


class ChallengeResponse(HeartbeatMessage):
    """guest→host: the challenge echoed back, with the guest's health."""

    msg_type: Literal["challenge_response"] = "challenge_response"
    heartbeat_response: Challenge32
    heartbeat_health: Health
    corrective_action: CorrectiveAction
    log_msg: LogMsg = ""


class ActionNotify(HeartbeatMessage):
    """host→guest: an action is coming (irrevocable) or is put to a vote (revocable)."""

    msg_type: Literal["action_notify"] = "action_notify"
    event_type: EventType
    notification_type: NotificationType
    timeout_ms: Annotated[int, Field(ge=0, le=limits.HEARTBEAT_MAX_NOTICE_SECS * 1000)]


class ActionResponse(HeartbeatMessage):
    """guest→host: the guest's vote, or that it finished preparing."""

    msg_type: Literal["action_response"] = "action_response"
    event_type: EventType
    notification_type: NotificationType
    vote_result: VoteResult
    log_msg: LogMsg = ""


class Exit(HeartbeatMessage):
    """guest→host: clean deregistration; not a fault."""

    msg_type: Literal["exit"] = "exit"
    log_msg: LogMsg = ""


class HeartbeatNack(HeartbeatMessage):
    """host→guest: the host could not process a message."""

    msg_type: Literal["nack"] = "nack"
    log_msg: LogMsg = ""


GuestHeartbeatMessage = Annotated[
    Init | ChallengeResponse | ActionResponse | Exit, Field(discriminator="msg_type")
]
HostHeartbeatMessage = Annotated[
    InitAck | Challenge | ActionNotify | HeartbeatNack, Field(discriminator="msg_type")
]
GUEST_HEARTBEAT_ADAPTER: TypeAdapter[GuestHeartbeatMessage] = TypeAdapter(GuestHeartbeatMessage)
HOST_HEARTBEAT_ADAPTER: TypeAdapter[HostHeartbeatMessage] = TypeAdapter(HostHeartbeatMessage)
