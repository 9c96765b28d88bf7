"""Server group application layer, version 1; nack version 2 (PROTOCOL.md §5)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from vmha_protocol import limits
from vmha_protocol.types import Counter, max_bytes, no_control_characters

BroadcastData = Annotated[
    str,
    AfterValidator(max_bytes(limits.MAX_BROADCAST_BYTES)),
    AfterValidator(no_control_characters),
]
SourceInstance = Annotated[str, AfterValidator(max_bytes(limits.MAX_SOURCE_INSTANCE_BYTES))]
SgLogMsg = Annotated[str, AfterValidator(max_bytes(limits.SERVER_GROUP_MAX_LOG_BYTES))]
HeartbeatSummary = Literal["healthy", "unhealthy", "unknown"]


class MemberState(BaseModel):
    """One group member's state, shaped like Nova's instance notification payload.

    `state`/`vm_state`, `power_state` and `task_state` carry Nova's vocabulary so that
    applications written for the original keep working; `namespace`, `phase`, `ready`
    and `heartbeat` add what KubeVirt knows. extra="allow": guests keep keys that a
    newer host adds.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    instance_id: str
    display_name: str
    hostname: str = ""
    state: str = "unknown"
    vm_state: str = "unknown"
    power_state: str = "nostate"
    task_state: str | None = None
    host: str | None = None
    node: str | None = None
    launched_at: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    namespace: str = ""
    phase: str = ""
    ready: bool = False
    heartbeat: HeartbeatSummary = "unknown"


class ServerGroupMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    version: Literal[1] = limits.SERVER_GROUP_VERSION


class StatusQuery(ServerGroupMessage):
    """guest→host: the state of every member, the asking VM included."""

    msg_type: Literal["status_query"] = "status_query"
    seq: Counter


class GuestBroadcast(ServerGroupMessage):
    """guest→host: a datagram for every other member of the group."""

    msg_type: Literal["broadcast"] = "broadcast"
    data: BroadcastData


class StatusResponse(ServerGroupMessage):
    """host→guest: one member's state; one message per member."""

    msg_type: Literal["status_response"] = "status_response"
    seq: Counter
    data: MemberState


class StatusResponseDone(ServerGroupMessage):
    """host→guest: the end of a status response."""

    msg_type: Literal["status_response_done"] = "status_response_done"
    seq: Counter


class Notification(ServerGroupMessage):
    """host→guest: a member's state changed."""

    msg_type: Literal["notification"] = "notification"
    data: MemberState


class HostBroadcast(ServerGroupMessage):
    """host→guest: a datagram from another member, with its opaque sender address."""

    msg_type: Literal["broadcast"] = "broadcast"
    source_instance: SourceInstance
    data: BroadcastData


class ServerGroupNack(BaseModel):
    """host→guest: the host could not process a message (version 2 of nack)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    version: Literal[2] = limits.SERVER_GROUP_NACK_VERSION
    msg_type: Literal["nack"] = "nack"
    orig_msg_type: str
    log_msg: SgLogMsg = ""


GuestServerGroupMessage = Annotated[StatusQuery | GuestBroadcast, Field(discriminator="msg_type")]
HostServerGroupMessage = Annotated[
    StatusResponse | StatusResponseDone | Notification | HostBroadcast | ServerGroupNack,
    Field(discriminator="msg_type"),
]
GUEST_SERVER_GROUP_ADAPTER: TypeAdapter[GuestServerGroupMessage] = TypeAdapter(
    GuestServerGroupMessage
)
HOST_SERVER_GROUP_ADAPTER: TypeAdapter[HostServerGroupMessage] = TypeAdapter(HostServerGroupMessage)
