"""The node agent: follows its VM sources and keeps one session per VM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from aiohttp import web

from vmha_node_agent import web as endpoints
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.doctor import DoctorReporter
from vmha_node_agent.inventory import InventoryChange, VMAdded, VMRemoved, VMSource
from vmha_node_agent.members import GroupDirectory
from vmha_node_agent.messenger import GroupMessenger
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.reporting import LogSink, Reporters, TransitionSink
from vmha_node_agent.session import VMSession

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]


class Service(Protocol):
    """Something that runs alongside the sessions (a watch, a delivery queue)."""

    async def run(self) -> None: ...


@runtime_checkable
class Drainable(Protocol):
    """A service with queued work worth delivering at shutdown."""

    async def drain(self, timeout_s: float) -> None: ...


class NodeAgent:
    def __init__(
        self,
        config: AgentConfig,
        sources: Sequence[VMSource],
        *,
        metrics: AgentMetrics | None = None,
        sinks: Sequence[TransitionSink] = (),
        services: Sequence[Service] = (),
        sessions: dict[SessionKey, VMSession] | None = None,
        ready: Callable[[], bool] = lambda: True,
        messenger: GroupMessenger | None = None,
    ) -> None:
        """`sessions`: the dict to keep sessions in, for components that need to reach a
        VM's session (corrective actions give the guest notice through it, the messenger
        writes to guests through it). `messenger`: the server group layer (default: one
        that knows no groups, so every guest gets `messaging-disabled`)."""
        self.config = config
        self.metrics = metrics or AgentMetrics()
        self._sources = list(sources)
        self._services = list(services)
        self._ready = ready
        self.doctor = (
            DoctorReporter(config.doctor, config.node_name, self.metrics)
            if config.doctor.url
            else None
        )
        all_sinks: list[TransitionSink] = [LogSink(), *sinks]
        if self.doctor is not None:
            all_sinks.append(self.doctor)
        self.reporters = Reporters(all_sinks)
        self.sessions: dict[SessionKey, VMSession] = {} if sessions is None else sessions
        self.messenger = messenger or GroupMessenger(
            config, self.metrics, GroupDirectory(), self.sessions
        )
        self.metrics_port: int | None = None
        self._runner: web.AppRunner | None = None

    async def run(self) -> None:
        """Run until cancelled; on cancellation, close every session cleanly."""
        self._runner = await endpoints.serve(
            endpoints.make_app(self.metrics.registry, ready=self._ready),
            self.config.metrics.address,
            self.config.metrics.port,
        )
        self.metrics_port = endpoints.bound_port(self._runner)
        log.info(
            "node agent for %s serving metrics on %s:%d",
            self.config.node_name, self.config.metrics.address, self.metrics_port,
        )  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tasks:
                for source in self._sources:
                    tasks.create_task(self._follow(source))
                for service in self._services:
                    tasks.create_task(service.run(), name=type(service).__name__)
                if self.doctor is not None:
                    tasks.create_task(self.doctor.run())
        finally:
            await self._shutdown()

    async def _follow(self, source: VMSource) -> None:
        async for change in source.changes():
            await self.apply(change)

    async def apply(self, change: InventoryChange) -> None:
        match change:
            case VMAdded(vm):
                existing = self.sessions.get(vm.key)
                if existing is not None and existing.vm == vm:
                    existing.update(vm)  # same VM and socket; maybe a new policy
                    return
                if existing is not None:  # e.g. a new socket path after a restart
                    await self._end(vm.key, vm_removed=False)
                session = VMSession(vm, self.config, self.metrics, self.reporters, self.messenger)
                self.sessions[vm.key] = session
                session.start()
                log.info(
                    "%s: session started on %s",
                    vm,
                    vm.socket_path,
                    extra={"namespace": vm.namespace, "vm": vm.name},
                )
            case VMRemoved(key):
                await self._end(key, vm_removed=True)

    async def _end(self, key: SessionKey, *, vm_removed: bool) -> None:
        session = self.sessions.pop(key, None)
        if session is None:
            return
        await session.stop(vm_removed=vm_removed)
        self.metrics.forget(session.vm)
        log.info("%s: session ended", session.vm, extra={"namespace": key[0], "vm": key[1]})

    async def _shutdown(self) -> None:
        await self.messenger.close()
        for key in list(self.sessions):
            await self._end(key, vm_removed=False)
        # Queued reports still worth delivering: in parallel, each within its own bound.
        pending = [
            service.drain(self.config.kubernetes.drain_timeout_s)
            for service in self._services
            if isinstance(service, Drainable)
        ]
        if self.doctor is not None:
            pending.append(self.doctor.drain(self.config.doctor.drain_timeout_s))
        await asyncio.gather(*pending, return_exceptions=True)
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
