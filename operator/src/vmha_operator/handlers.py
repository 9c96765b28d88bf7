"""The kopf wiring: watches that keep VMGroups current, and the admission webhooks.

`build_registry(config)` returns a kopf registry with every handler bound to `config`;
`build_settings(config)` the matching kopf settings. Nothing here writes to objects the
operator does not own except the VM templates it places (no kopf annotations, finalizers or
per-object Events on VMs): the watch handlers are plain event handlers, and state lives in
VMGroup status.

Webhook paths (handler ids; kopf serves each at /<id>):
    mutate-virtualmachine      VirtualMachine CREATE, UPDATE        placement + channel
    validate-virtualmachine    VirtualMachine CREATE, UPDATE        joining a group
    validate-vmgroup           VMGroup UPDATE, DELETE               policy change, deletion
    validate-migration         VirtualMachineInstanceMigration CREATE

The two that validate VirtualMachines and migrations also put revocable actions to the
guest (`votes.py`): a migration of a member, an update that stops a member. That is a side
effect, skipped for dry runs (sideEffects: NoneOnDryRun).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any, Final

import kopf

from vmha_operator import admission, kube, votes
from vmha_operator.api import GROUP, GROUP_LABEL, PLURAL, VERSION, VMGroup
from vmha_operator.config import OperatorConfig
from vmha_operator.membership import apply_membership, group_of, remove_membership
from vmha_operator.reconcile import GroupReconciler

logger = logging.getLogger(__name__)

KUBEVIRT: Final = ("kubevirt.io", "v1")
VMGROUPS: Final = (GROUP, VERSION, PLURAL)
VIRTUAL_MACHINES: Final = (*KUBEVIRT, "virtualmachines")
VIRTUAL_MACHINE_INSTANCES: Final = (*KUBEVIRT, "virtualmachineinstances")
MIGRATIONS: Final = (*KUBEVIRT, "virtualmachineinstancemigrations")

MUTATE_VM: Final = "mutate-virtualmachine"
VALIDATE_VM: Final = "validate-virtualmachine"
VALIDATE_GROUP: Final = "validate-vmgroup"
VALIDATE_MIGRATION: Final = "validate-migration"
WEBHOOK_IDS: Final = (MUTATE_VM, VALIDATE_VM, VALIDATE_GROUP, VALIDATE_MIGRATION)

# The HTTP status of a refusal: kubectl shows "Error from server (Forbidden): ...".
REFUSAL_CODE: Final = 403


class Runtime:
    """What the handlers share: the config, and the API client made at startup."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self._client: kube.KubeClient | None = None
        self._reconciler: GroupReconciler | None = None
        self._votes: votes.AgentVotes | None = None

    def start(self) -> None:
        self._client = kube.KubeClient(kube.load_configuration(self.config.kubeconfig))
        self._reconciler = GroupReconciler(
            self._client, self.config.channel, instance=self.config.instance
        )
        self._votes = votes.AgentVotes(self.config.votes, self._client)

    async def stop(self) -> None:
        if self._votes is not None:
            await self._votes.close()
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> kube.KubeClient:
        if self._client is None:
            raise RuntimeError("the operator has not started")
        return self._client

    @property
    def votes(self) -> votes.AgentVotes:
        if self._votes is None:
            raise RuntimeError("the operator has not started")
        return self._votes

    @property
    def reconciler(self) -> GroupReconciler:
        if self._reconciler is None:
            raise RuntimeError("the operator has not started")
        return self._reconciler

    async def group(self, namespace: str, name: str) -> VMGroup | None:
        raw = await self.client.get(kube.VMGROUPS.path(namespace, name))
        return None if raw is None else VMGroup.from_body(raw)

    async def member_names(self, namespace: str, group: str) -> list[str]:
        vms = await self.client.list_objects(
            kube.VIRTUAL_MACHINES.path(namespace), f"{GROUP_LABEL}={group}"
        )
        return sorted(vm["metadata"]["name"] for vm in vms)


def _enforce(verdict: admission.Verdict, warnings: list[str]) -> None:
    warnings.extend(verdict.warnings)
    if not verdict.allowed:
        raise kopf.AdmissionError(verdict.message, code=REFUSAL_CODE)


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def _object_name(body: Mapping[str, Any]) -> str:
    meta = _meta(body)
    return str(meta.get("name") or f"{meta.get('generateName', '')}<generated>")


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """A kopf registry with all vmha handlers bound to `config`."""
    registry = kopf.OperatorRegistry()
    runtime = Runtime(config)
    _register_lifecycle(registry, runtime)
    _register_watches(registry, runtime)
    _register_admission(registry, runtime)
    return registry


def _register_lifecycle(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    @kopf.on.login(id="login", registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(runtime.config.kubeconfig)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(**_: Any) -> None:
        runtime.start()  # in the event loop: the client's session belongs to it

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        await runtime.stop()


def connection_info(kubeconfig: str | None) -> kopf.ConnectionInfo:
    """kopf's credentials from the same source as our own client's."""
    configuration = kube.load_configuration(kubeconfig)
    header = configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").partition(" ")
    if not token:
        scheme, token = "Bearer", scheme
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        scheme=scheme if token else None,
        token=token or None,
        certificate_path=configuration.cert_file or None,
        private_key_path=configuration.key_file or None,
    )


def _register_watches(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    # The id is also the keyword under which kopf hands the index to other handlers.
    @kopf.index(*VMGROUPS, id="listed_members", registry=registry)
    def listed_members(
        *, namespace: str | None, name: str, status: kopf.Status, **_: Any
    ) -> dict[tuple[str, str], str]:
        """(namespace, vm) → group, for VMs that a group's status lists: a VM that loses its
        label still leads to the group it left."""
        members = status.get("members") or []
        return {(namespace or "", str(m.get("vm"))): name for m in members}

    async def reconcile_groups_of(
        body: Mapping[str, Any], namespace: str, name: str, index: kopf.Index[Any, str]
    ) -> None:
        groups = set(index.get((namespace, name), []))
        labelled = group_of(body)
        if labelled:
            groups.add(labelled)
        for group in sorted(groups):
            await runtime.reconciler.request(namespace, group)

    @kopf.on.event(*VMGROUPS, id="vmgroup-changed", registry=registry)
    async def vmgroup_changed(*, namespace: str | None, name: str, **_: Any) -> None:
        await runtime.reconciler.request(namespace or "", name)

    @kopf.on.event(*VIRTUAL_MACHINES, id="vm-changed", registry=registry)
    async def vm_changed(
        *, body: kopf.Body, namespace: str | None, name: str, **kwargs: Any
    ) -> None:
        await reconcile_groups_of(body, namespace or "", name, kwargs["listed_members"])

    @kopf.on.event(*VIRTUAL_MACHINE_INSTANCES, id="vmi-changed", registry=registry)
    async def vmi_changed(
        *, body: kopf.Body, namespace: str | None, name: str, **kwargs: Any
    ) -> None:
        await reconcile_groups_of(body, namespace or "", name, kwargs["listed_members"])


def _register_admission(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    config = runtime.config

    @kopf.on.mutate(
        *VIRTUAL_MACHINES, id=MUTATE_VM, operations=["CREATE", "UPDATE"], registry=registry
    )
    async def mutate_virtualmachine(*, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        namespace = _meta(body).get("namespace")
        if not config.covers(namespace):
            return
        group_name = group_of(body)
        if group_name is None:
            patch.fns.append(functools.partial(remove_membership, settings=config.channel))
            return
        group = await runtime.group(str(namespace), group_name)
        if group is None:
            return  # validate-virtualmachine refuses joining a group that does not exist
        patch.fns.append(
            functools.partial(
                apply_membership, group=group_name, spec=group.spec, settings=config.channel
            )
        )

    @kopf.on.validate(
        *VIRTUAL_MACHINES,
        id=VALIDATE_VM,
        operations=["CREATE", "UPDATE"],
        side_effects=True,
        registry=registry,
    )
    async def validate_virtualmachine(
        *, body: kopf.Body, warnings: list[str], dryrun: bool, **kwargs: Any
    ) -> None:
        old: kopf.Body | None = kwargs.get("old")
        namespace = str(_meta(body).get("namespace") or "")
        group_name = group_of(body)
        if not config.covers(namespace) or group_name is None:
            return
        if old is None or group_of(old) != group_name:  # joining
            verdict = admission.join(
                vm=_object_name(body),
                namespace=namespace,
                group_name=group_name,
                group=await runtime.group(namespace, group_name),
                members=await runtime.member_names(namespace, group_name),
            )
            _enforce(verdict, warnings)
        elif (
            votes.stops(old, body)
            and not dryrun
            and not votes.by_node_agent(kwargs.get("userinfo"), config.votes.agent_namespace)
        ):
            name = _object_name(body)
            await _vote(
                runtime,
                "VirtualMachine",
                namespace=namespace,
                name=name,
                event_type=votes.STOP,
                warnings=warnings,
            )

    @kopf.on.validate(
        *VMGROUPS, id=VALIDATE_GROUP, operations=["UPDATE", "DELETE"], registry=registry
    )
    async def validate_vmgroup(*, body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
        old: kopf.Body | None = kwargs.get("old")
        new: kopf.Body | None = kwargs.get("new")
        operation = kwargs.get("operation")
        namespace = str(_meta(body).get("namespace") or "")
        if not config.covers(namespace):
            return
        name = _object_name(body)
        members = await runtime.member_names(namespace, name)
        if operation == "DELETE":
            verdict = admission.delete_group(group_name=name, members=members)
        elif old is not None and new is not None:
            verdict = admission.update_group(
                old=VMGroup.from_body(old), new=VMGroup.from_body(new), members=members
            )
        else:
            return
        _enforce(verdict, warnings)

    @kopf.on.validate(
        *MIGRATIONS,
        id=VALIDATE_MIGRATION,
        operations=["CREATE"],
        side_effects=True,
        registry=registry,
    )
    async def validate_migration(
        *, body: kopf.Body, warnings: list[str], dryrun: bool, **_: Any
    ) -> None:
        namespace = str(_meta(body).get("namespace") or "")
        vmi_name = (body.get("spec") or {}).get("vmiName")
        if not config.covers(namespace) or not vmi_name:
            return
        group_name = await _group_of_instance(runtime, namespace, str(vmi_name))
        group = await runtime.group(namespace, group_name) if group_name else None
        _enforce(admission.migrate(vmi=str(vmi_name), group=group), warnings)
        if group is not None and not dryrun:
            await _vote(
                runtime,
                "VirtualMachineInstance",
                namespace=namespace,
                name=str(vmi_name),
                event_type=votes.MIGRATE,
                warnings=warnings,
            )


async def _vote(
    runtime: Runtime,
    kind: str,
    *,
    namespace: str,
    name: str,
    event_type: str,
    warnings: list[str],
) -> None:
    """Put a revocable action on a running member to its guest; refuse on `reject`."""
    if not runtime.config.votes.enabled:
        return
    vmi = await runtime.client.get(kube.VIRTUAL_MACHINE_INSTANCES.path(namespace, name))
    node = votes.running_node(vmi)
    if node is None:
        return  # nothing runs: no guest to ask
    ballot = await runtime.votes.ask(namespace, name, node, event_type)
    logger.info("vote on %s of %s/%s (node %s): %s %s", event_type, namespace, name, node,
                ballot.result, ballot.reason)  # fmt: skip
    if ballot.result == "reject":
        verdict = admission.vote_refused(
            kind=kind, name=name, event_type=event_type, reason=ballot.reason
        )
        _enforce(verdict, warnings)
    if not ballot.reached:
        warnings.append(admission.vote_not_asked(kind=kind, name=name, reason=ballot.reason))


async def _group_of_instance(runtime: Runtime, namespace: str, vmi_name: str) -> str | None:
    """The VMI's group label, else its VM's (a VMI started before the VM joined lacks it)."""
    client = runtime.client
    vmi = await client.get(kube.VIRTUAL_MACHINE_INSTANCES.path(namespace, vmi_name))
    if vmi is not None and group_of(vmi):
        return group_of(vmi)
    vm = await client.get(kube.VIRTUAL_MACHINES.path(namespace, vmi_name))
    return group_of(vm) if vm is not None else None


def build_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    """kopf settings: the webhook server, no per-object kopf Events, quiet persistence."""
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    hook = config.webhook
    settings.admission.server = kopf.WebhookServer(
        addr=hook.listen_address,
        port=hook.port or None,
        host=hook.host or hook.listen_address,
        certfile=hook.cert_file,
        pkeyfile=hook.key_file,
        cafile=hook.ca_file,
    )
    settings.admission.managed = hook.managed
    return settings
