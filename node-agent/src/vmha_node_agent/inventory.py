"""Where the agent learns which VMs run on its node, and where their channel sockets are.

A `VMSource` is an async stream of `VMAdded`/`VMRemoved` changes: static configuration here,
Kubernetes discovery in `discovery.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmha_node_agent.config import HeartbeatPolicy, StaticVM

STATIC = "static"
KUBERNETES = "kubernetes"


@dataclass(frozen=True)
class VMRef:
    """Identity of one VM on this node, as reports name it.

    `policy` (None: the agent's configured one) and the other fields excluded from
    comparison can change under a running session; a change of the others means a new
    session. `heartbeat` False: the VM is attached for server group messaging only (its
    group turned heartbeat off, or it opted out), and heartbeat messages are refused.
    """

    namespace: str
    name: str
    socket_path: Path
    uid: str = ""
    heartbeat: bool = True
    labels: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    policy: HeartbeatPolicy | None = field(default=None, compare=False)
    # Which source found it: Kubernetes reporters only speak about VMIs.
    origin: str = field(default=STATIC, compare=False)
    # Seconds within which the guest must register (it was registered before this session);
    # None: nothing is known, so a guest that never registers is not a fault.
    reregister_within_s: float | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class VMAdded:
    """A VM appeared, or its details changed: a new socket path (a new session), or only
    its policy (applied to the running session)."""

    vm: VMRef


@dataclass(frozen=True)
class VMRemoved:
    """The VM left this node or was deleted: end its session without a fault."""

    key: tuple[str, str]


InventoryChange = VMAdded | VMRemoved


class VMSource(Protocol):
    def changes(self) -> AsyncIterator[InventoryChange]: ...


class StaticVMSource:
    """VMs listed in the agent's configuration; they never change while it runs."""

    def __init__(self, vms: Iterable[StaticVM]) -> None:
        self._vms = [
            VMRef(namespace=vm.namespace, name=vm.name, socket_path=vm.socket, uid=vm.uid)
            for vm in vms
        ]

    async def changes(self) -> AsyncIterator[InventoryChange]:
        for vm in self._vms:
            yield VMAdded(vm)
        await asyncio.Event().wait()  # static: nothing more will ever change
