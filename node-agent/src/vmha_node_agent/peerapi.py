"""The agent's HTTPS API for other agents and the operator: request and answer bodies.

    POST /v1/broadcast   agent → agent     BroadcastBatch → BroadcastResult (403 if all refused)
    POST /v1/votes       operator → agent  VoteRequest → VoteAnswer

Both sides validate with these models; the receiver never trusts what a body claims
without checking it against its own view of the cluster (`routing.accept_from_peer`).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from vmha_protocol.heartbeat import EventType
from vmha_protocol.server_group import BroadcastData

BROADCAST_PATH: Final = "/v1/broadcast"
VOTES_PATH: Final = "/v1/votes"
MAX_BATCH: Final = 256
MAX_TARGETS: Final = 1000  # the VMGroup CRD's largest maxMembers

# Kubernetes object names (DNS subdomains) and uids.
Name = Annotated[str, StringConstraints(min_length=1, max_length=253)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SourceRef(_Body):
    """The VM a broadcast comes from, as the sending agent knows it."""

    namespace: Name
    name: Name
    uid: Name


class ForwardedBroadcast(_Body):
    """One guest's broadcast for the members `targets` (names in the source's namespace)."""

    source: SourceRef
    targets: Annotated[list[Name], Field(min_length=1, max_length=MAX_TARGETS)]
    data: BroadcastData


class BroadcastBatch(_Body):
    messages: Annotated[list[ForwardedBroadcast], Field(min_length=1, max_length=MAX_BATCH)]


class BroadcastResult(_Body):
    delivered: int = 0
    refused: dict[str, int] = Field(default_factory=dict)  # reason → copies


class VoteRequest(_Body):
    """The operator asks whether `event_type` may happen to VM `namespace/vm`."""

    namespace: Name
    vm: Name
    event_type: EventType
    # The most the operator can wait for the guest (its webhook has a timeout).
    timeout_ms: Annotated[int, Field(ge=0, le=30_000)] | None = None


class VoteAnswer(_Body):
    result: Literal["accept", "reject"]
    reason: str = ""
    # False: the guest was not asked (not here, not registered, takes no votes).
    asked: bool = False


class Problem(_Body):
    """The body of a refusal (403), a bad request (400) or an outage (503)."""

    error: str
    detail: str = ""
