"""Corrective actions on a heartbeat fault, through KubeVirt's API.

Once per fault (a fault lasts from entering `unhealthy` or `failed` until recovery, a new
registration, deregistration or the VM leaving), for VMs found in Kubernetes:

- `none`: nothing. `log`: a `CorrectiveAction` Event (the fault's own Event and the Doctor
  report are already on their way).
- `reboot`: delete the VMI (its VirtualMachine's run strategy makes a new one).
- `stop`: set the owning VirtualMachine's `spec.runStrategy` to `Halted` (KubeVirt then
  stops the VMI); a VMI without a VirtualMachine is deleted.

A disruptive action first passes the limits (`corrective.ActionLimiter`), then the VMI is
read again: one being deleted, migrating, gone or moved to another node is left alone (an
Event says why). A guest that registered is then told (`action_notify`, irrevocable, with
the notice it asked for in `init`, capped at `corrective_actions.max_notice_s`), and the
agent waits that long or until the guest answers `complete`; then it checks the VMI once
more and acts. Every outcome is counted in `vmha_corrective_actions_total`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from vmha_node_agent.backoff import Backoff
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.corrective import DISRUPTIVE, ActionLimiter, narrow
from vmha_node_agent.events import EventRecorder, EventSpec, Regarding
from vmha_node_agent.heartbeat import Transition
from vmha_node_agent.inventory import KUBERNETES, VMRef
from vmha_node_agent.kubeapi import MERGE_PATCH, VMIS, VMS, KubeApi, KubeError
from vmha_node_agent.kubevirt import (
    Key,
    is_deleting,
    migration_in_progress,
    node_of,
    owner_vm,
    uid_of,
)
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.session import Notice, VMSession
from vmha_protocol.heartbeat import CorrectiveAction, EventType

log = logging.getLogger(__name__)

TAKEN = "CorrectiveAction"
SKIPPED = "CorrectiveActionSkipped"
FAILED = "CorrectiveActionFailed"


class _Skip(Exception):
    def __init__(self, outcome: str, why: str) -> None:
        super().__init__(why)
        self.outcome = outcome


class CorrectiveActor:
    """TransitionSink deciding on actions, and the service that carries them out."""

    def __init__(
        self,
        api: KubeApi,
        config: AgentConfig,
        metrics: AgentMetrics,
        events: EventRecorder,
        sessions: Mapping[Key, VMSession],
    ) -> None:
        self._api = api
        self._config = config
        self._limits = config.corrective_actions
        self._node = config.node_name
        self._metrics = metrics
        self._events = events
        self._sessions = sessions
        self._limiter = ActionLimiter(
            self._limits.per_vm_interval_s,
            self._limits.per_node_limit,
            self._limits.per_node_window_s,
        )
        self._in_fault: set[Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- TransitionSink ----------------------------------------------------------------

    def report(self, vm: VMRef, change: Transition) -> None:
        if vm.origin != KUBERNETES or not vm.uid:
            return
        if not change.is_fault:
            self._in_fault.discard(vm.key)
            return
        if vm.key in self._in_fault:
            return  # the same fault, e.g. unhealthy → failed: acted on already
        self._in_fault.add(vm.key)
        configured = (vm.policy or self._config.heartbeat).corrective_action
        guest = change.registration.corrective_action if change.registration else None
        action = narrow(configured, guest)
        if action == "none":
            return
        cause = f"heartbeat {change.current.value} ({change.detail})"
        if action not in DISRUPTIVE:
            self._say(vm, TAKEN, action, f"{cause}: logged; no action on the VM")
            self._count(action, "taken")
            return
        limit = self._limiter.take(vm.key)
        if limit is not None:
            limits = self._limits
            why = (
                f"at most one action per VM in {limits.per_vm_interval_s:g} s"
                if limit == "vm"
                else f"at most {limits.per_node_limit} actions on node {self._node} "
                f"in {limits.per_node_window_s:g} s"
            )
            self._say(vm, SKIPPED, action, f"{cause}: {action} not taken, rate limit: {why}")
            self._count(action, f"skipped_rate_limit_{limit}")
            return
        task = asyncio.get_running_loop().create_task(
            self._carry_out(vm, action, cause), name=f"{action} {vm}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("corrective action %s failed", task.get_name(), exc_info=task.exception())

    # -- service -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- carrying out ------------------------------------------------------------------

    async def _carry_out(self, vm: VMRef, action: CorrectiveAction, cause: str) -> None:
        try:
            await self._check(vm)
            notice = await self._notify(vm, action)
            vmi = await self._check(vm)
            what = await self._execute(vm, action, vmi)
        except _Skip as skip:
            self._say(vm, SKIPPED, action, f"{cause}: {action} not taken: {skip}")
            self._count(action, skip.outcome)
            return
        except KubeError as error:
            self._say(vm, FAILED, action, f"{cause}: {action} failed: {error}")
            self._count(action, "failed")
            log.error("%s: %s failed: %s", vm, action, error, extra=_fields(vm))
            return
        self._say(vm, TAKEN, action, f"{cause}: {what}{_describe(notice)}")
        self._count(action, "taken")
        log.warning("%s: corrective action %s: %s", vm, action, what, extra=_fields(vm))

    async def _check(self, vm: VMRef) -> Mapping[str, Any]:
        """The VMI as it is now, if an action may still touch it."""
        try:
            vmi: Mapping[str, Any] = await self._retrying(
                lambda: self._api.request("get", VMIS, _vmi_path(vm))
            )
        except KubeError as error:
            if error.not_found:
                raise _Skip("skipped_gone", "the VMI is gone") from None
            raise
        if uid_of(vmi) != vm.uid:
            raise _Skip("skipped_gone", "the VMI was replaced")
        if is_deleting(vmi):
            raise _Skip("skipped_deleting", "the VMI is being deleted")
        if migration_in_progress(vmi) is not None:
            raise _Skip("skipped_migrating", "the VMI is being migrated")
        if node_of(vmi) != self._node:
            raise _Skip("skipped_gone", f"the VMI moved to {node_of(vmi)}")
        return vmi

    async def _notify(self, vm: VMRef, action: CorrectiveAction) -> Notice:
        session = self._sessions.get(vm.key)
        if session is None or session.vm.uid != vm.uid or action not in DISRUPTIVE:
            return Notice(sent=False)
        # reboot and stop are heartbeat event types too.
        return await session.give_notice(cast(EventType, action), self._limits.max_notice_s)

    async def _execute(self, vm: VMRef, action: CorrectiveAction, vmi: Mapping[str, Any]) -> str:
        owner = owner_vm(vmi)
        if action == "stop" and owner is not None:
            name, uid = owner
            # `running` (the older switch) may not be set together with a run strategy.
            body: dict[str, Any] = {"spec": {"runStrategy": "Halted", "running": None}}
            if uid:
                body["metadata"] = {"uid": uid}  # a precondition: not a new VM of that name
            await self._retrying(
                lambda: self._api.request(
                    "patch", VMS, VMS.path(vm.namespace, name), body=body, content_type=MERGE_PATCH
                )
            )
            return f"VirtualMachine {name} set to runStrategy Halted"
        delete = {"preconditions": {"uid": vm.uid}}
        await self._retrying(lambda: self._api.request("delete", VMIS, _vmi_path(vm), body=delete))
        if action == "stop":
            return "VMI deleted (no VirtualMachine owns it)"
        return "VMI deleted; its VirtualMachine starts a new one"

    async def _retrying(self, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """An API call retried on transient errors for `corrective_actions.retry_for_s`."""
        kube = self._config.kubernetes
        backoff = Backoff(kube.retry_initial_s, kube.retry_max_s)
        deadline = time.monotonic() + self._limits.retry_for_s
        while True:
            try:
                return await attempt()
            except KubeError as error:
                if not error.transient or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(backoff.next())

    def _say(self, vm: VMRef, reason: str, action: CorrectiveAction, note: str) -> None:
        self._events.record(Regarding.vmi(vm), EventSpec("Warning", reason, action.title(), note))

    def _count(self, action: str, outcome: str) -> None:
        self._metrics.corrective_actions.labels(action, outcome).inc()


def _vmi_path(vm: VMRef) -> str:
    return VMIS.path(vm.namespace, vm.name)


def _describe(notice: Notice) -> str:
    if not notice.sent:
        return ""
    if notice.completed:
        return f" (guest notified; ready after {notice.waited_s:.1f} s)"
    return f" (guest notified {notice.notice_s:g} s before)"


def _fields(vm: VMRef) -> dict[str, str]:
    return {"namespace": vm.namespace, "vm": vm.name}
