"""The VMGroup API (vmgroups.vmha.io/v1alpha1) as pydantic models: the one source of truth.

The CRD in `crds/` is generated from these models (`python -m vmha_operator.crdgen`), and the
operator reads and writes VMGroups through them. Field names are the API's camelCase; the
Python attributes are snake_case. Validation that a person meets in `kubectl` (enums, ranges,
cross-field rules as CEL with human messages) is declared here next to the field it guards.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from vmha_protocol.heartbeat import CorrectiveAction
from vmha_protocol.limits import HEARTBEAT_MAX_INTERVAL_MS

GROUP: Final = "vmha.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "VMGroup"
PLURAL: Final = "vmgroups"
SINGULAR: Final = "vmgroup"
SHORT_NAMES: Final = ("vmg",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# Membership: a VirtualMachine joins the group named by this label (same namespace).
GROUP_LABEL: Final = "vmha.io/group"
# Written by the node agent on the VMI on heartbeat transitions: JSON with "state" (the agent's
# state: healthy, unhealthy, failed, waiting_for_init, deregistered), "reason", "since", "node".
HEARTBEAT_ANNOTATION: Final = "vmha.io/heartbeat"
# The virtio-serial channel's socket path inside the virt-launcher pod (on the VM template,
# so every VMI carries it and the node agent need not hard-code it).
CHANNEL_PATH_ANNOTATION: Final = "vmha.io/channel-path"

# Bounds that keep CEL cost estimates finite and objects small.
MAX_GROUP_MEMBERS: Final = 1000
MAX_NAME_LENGTH: Final = 253
MAX_MESSAGE_LENGTH: Final = 32768


class Policy(enum.StrEnum):
    """Nova's server group policies."""

    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"
    SOFT_AFFINITY = "soft-affinity"
    SOFT_ANTI_AFFINITY = "soft-anti-affinity"

    @property
    def is_strict(self) -> bool:
        return self in (Policy.AFFINITY, Policy.ANTI_AFFINITY)

    @property
    def is_affinity(self) -> bool:
        return self in (Policy.AFFINITY, Policy.SOFT_AFFINITY)


class ApiModel(BaseModel):
    """Common configuration: camelCase on the wire, unknown fields ignored on read."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_enum_values=False,
    )


class HeartbeatSpec(ApiModel):
    """Heartbeat defaults for the group's members; a guest picks its interval within bounds."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minIntervalMs <= self.maxIntervalMs",
                    "message": "heartbeat.minIntervalMs must not be greater than "
                    "heartbeat.maxIntervalMs",
                }
            ]
        }
    )

    enabled: bool = Field(
        default=True,
        description="Wire the vmha channel into members so guests can register for heartbeat.",
    )
    min_interval_ms: Annotated[int, Field(ge=100, le=HEARTBEAT_MAX_INTERVAL_MS)] = Field(
        default=400,
        description="Shortest heartbeat interval a guest may ask for, in milliseconds.",
    )
    max_interval_ms: Annotated[int, Field(ge=100, le=HEARTBEAT_MAX_INTERVAL_MS)] = Field(
        default=60000,
        description="Longest heartbeat interval a guest may ask for, in milliseconds.",
    )
    missed_threshold: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3,
        description="Consecutive missed challenges that make a fault.",
    )
    corrective_action: CorrectiveAction = Field(
        default="log",
        description="What the node agent does on a fault: none, log, reboot or stop the VM.",
    )


class VMGroupSpec(ApiModel):
    """What a platform team asks for: a Nova server group for KubeVirt VirtualMachines."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxPerNode) || self.policy == 'anti-affinity'",
                    "message": "maxPerNode applies only to policy anti-affinity "
                    "(Nova's max_server_per_host)",
                },
                {
                    "rule": "!self.bestEffort || self.policy in ['affinity', 'anti-affinity']",
                    "message": "bestEffort applies only to the strict policies affinity and "
                    "anti-affinity; the soft policies are best effort already",
                },
                {
                    "rule": "!has(self.maxPerNode) || !has(self.maxMembers) "
                    "|| self.maxPerNode <= self.maxMembers",
                    "message": "maxPerNode must not be greater than maxMembers",
                },
            ]
        }
    )

    policy: Policy = Field(
        description="Placement policy, Nova's names: affinity (all members on one node), "
        "anti-affinity (members on different nodes), soft-affinity, soft-anti-affinity "
        "(preferred, never blocks scheduling).",
    )
    max_members: Annotated[int, Field(ge=1, le=MAX_GROUP_MEMBERS)] | None = Field(
        default=None,
        description="Most VirtualMachines the group accepts; a VM beyond it is refused "
        "(the original's group size). Unset: no limit.",
    )
    max_per_node: Annotated[int, Field(ge=1, le=MAX_GROUP_MEMBERS)] | None = Field(
        default=None,
        description="Most members on one node, policy anti-affinity only (Nova's "
        "max_server_per_host). Unset: 1.",
    )
    best_effort: bool = Field(
        default=False,
        description="Strict policies only: place and migrate members even when the policy "
        "cannot be honoured, and report it in the PolicySatisfied condition instead of "
        "refusing (the original's best-effort flag).",
    )
    messaging: bool = Field(
        default=True,
        description="Server group messaging between members' guests (status, notifications, "
        "broadcast) over the vmha virtio-serial channel.",
    )
    heartbeat: HeartbeatSpec = Field(
        default_factory=HeartbeatSpec,
        description="Guest heartbeat defaults for the members.",
        # The whole object as default: the apiserver checks a default against the CEL rules
        # before it would fill in nested defaults, so {} would not do.
        json_schema_extra={"default": HeartbeatSpec().model_dump(mode="json", by_alias=True)},
    )

    @property
    def needs_channel(self) -> bool:
        """Members need the vmha virtio-serial channel for messaging or heartbeat."""
        return self.messaging or self.heartbeat.enabled

    @property
    def node_limit(self) -> int | None:
        """Most members allowed on one node under this policy; None when unbounded."""
        if self.policy is Policy.ANTI_AFFINITY:
            return self.max_per_node or 1
        if self.policy is Policy.SOFT_ANTI_AFFINITY:
            return 1
        return None


# unknown: no agent report, or a guest that is not (or no longer) registered.
HeartbeatState = Literal["healthy", "unhealthy", "failed", "unknown"]
ConditionStatus = Literal["True", "False", "Unknown"]

Name = Annotated[str, Field(max_length=MAX_NAME_LENGTH)]


class Member(ApiModel):
    """One member as the operator last saw it, from its VirtualMachine and VMI."""

    vm: Name = Field(description="Name of the member VirtualMachine.")
    node: Name | None = Field(default=None, description="Node running the member's VMI.")
    phase: Annotated[str, Field(max_length=64)] = Field(
        description="The VMI's phase (Pending, Scheduling, Scheduled, Running, Succeeded, "
        "Failed, Unknown), or Stopped when the VM has no VMI.",
    )
    ready: bool = Field(default=False, description="The VMI is Running and Ready.")
    heartbeat: HeartbeatState = Field(
        default="unknown",
        description="Last heartbeat state the node agent reported (VMI annotation "
        "vmha.io/heartbeat).",
    )
    since: datetime | None = Field(
        default=None, description="When the member entered its current phase."
    )


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: Annotated[str, Field(max_length=316)] = Field(description="Ready or PolicySatisfied.")
    status: ConditionStatus
    reason: Annotated[str, Field(max_length=1024)] = Field(default="")
    message: Annotated[str, Field(max_length=MAX_MESSAGE_LENGTH)] = Field(default="")
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class VMGroupStatus(ApiModel):
    """What the operator observed, derived entirely from the API (restarts lose nothing)."""

    observed_generation: int | None = Field(
        default=None, description="The spec generation this status describes."
    )
    member_count: int = Field(default=0, description="Number of member VirtualMachines.")
    ready_members: int = Field(default=0, description="Members whose VMI is Running and Ready.")
    members: Annotated[list[Member], Field(max_length=MAX_GROUP_MEMBERS)] = Field(
        default_factory=list,
        description="Members, sorted by VM name.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["vm"]},
    )
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(
        default_factory=list,
        description="Ready: every member is Running and Ready and none reports an unhealthy "
        "heartbeat. PolicySatisfied: the actual placement honours the policy; the message "
        "names the offending node.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectMeta(ApiModel):
    """The parts of metadata the operator reads."""

    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class VMGroup(ApiModel):
    """A VMGroup object as read from the API."""

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: VMGroupSpec
    status: VMGroupStatus = Field(default_factory=VMGroupStatus)

    @classmethod
    def from_body(cls, body: Any) -> VMGroup:
        """Parse an API object (dict or kopf body)."""
        return cls.model_validate(dict(body))

    def reference(self) -> dict[str, Any]:
        """An object reference for Events and owner references."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.metadata.name,
            "namespace": self.metadata.namespace,
            "uid": self.metadata.uid,
        }


# Printer columns for `kubectl get vmgroups`.
PRINTER_COLUMNS: Final[list[dict[str, Any]]] = [
    {"name": "Policy", "type": "string", "jsonPath": ".spec.policy"},
    {"name": "Members", "type": "integer", "jsonPath": ".status.memberCount"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyMembers"},
    {
        "name": "Satisfied",
        "type": "string",
        "priority": 1,
        "jsonPath": '.status.conditions[?(@.type=="PolicySatisfied")].status',
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
