"""Which corrective action a fault calls for, and whether the limits allow it. No I/O.

The VMGroup (or the agent's configuration, or the VM's annotation) sets the action; the
guest's own `corrective_action` (in `init`, and in every challenge response) may only
narrow it, by this order:

    none  <  log  <  reboot = stop

`stop` and `reboot` are equally disruptive and not interchangeable: a guest asking for
`stop` in a `reboot` group gets `reboot`, and the other way round.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Final, Literal

from vmha_protocol.heartbeat import CorrectiveAction

SEVERITY: Final[dict[CorrectiveAction, int]] = {"none": 0, "log": 1, "reboot": 2, "stop": 2}
DISRUPTIVE: Final[frozenset[CorrectiveAction]] = frozenset({"reboot", "stop"})

Limit = Literal["vm", "node"]


def narrow(configured: CorrectiveAction, guest: CorrectiveAction | None) -> CorrectiveAction:
    """The action to take: the guest's request when it is milder, else the configured one."""
    if guest is not None and SEVERITY[guest] < SEVERITY[configured]:
        return guest
    return configured


class ActionLimiter:
    """At most one disruptive action per VM per `per_vm_interval_s`, and at most
    `per_node_limit` on the node in any `per_node_window_s`: a storm of faults must not
    stop a whole node's VMs."""

    def __init__(
        self,
        per_vm_interval_s: float,
        per_node_limit: int,
        per_node_window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_vm_interval_s = per_vm_interval_s
        self._per_node_limit = per_node_limit
        self._per_node_window_s = per_node_window_s
        self._clock = clock
        self._last_per_vm: dict[Hashable, float] = {}
        self._recent: deque[float] = deque()

    def take(self, vm: Hashable) -> Limit | None:
        """Record an action on `vm` if the limits allow it; else say which limit holds."""
        now = self._clock()
        while self._recent and now - self._recent[0] >= self._per_node_window_s:
            self._recent.popleft()
        last = self._last_per_vm.get(vm)
        if last is not None and now - last < self._per_vm_interval_s:
            return "vm"
        if len(self._recent) >= self._per_node_limit:
            return "node"
        self._last_per_vm[vm] = now
        self._recent.append(now)
        self._forget_old(now)
        return None

    def _forget_old(self, now: float) -> None:
        stale = [vm for vm, at in self._last_per_vm.items() if now - at >= self._per_vm_interval_s]
        for vm in stale:
            del self._last_per_vm[vm]
