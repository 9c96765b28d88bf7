"""Where heartbeat transitions go: every sink sees every transition of every VM.

Sinks that also implement `MissSink` see each missed challenge (the Kubernetes Event sink
aggregates them into a series); the others only see state changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from vmha_node_agent.heartbeat import Transition
from vmha_node_agent.inventory import VMRef

log = logging.getLogger("vmha.heartbeat")


class TransitionSink(Protocol):
    def report(self, vm: VMRef, change: Transition) -> None: ...


@runtime_checkable
class MissSink(Protocol):
    def challenge_missed(self, vm: VMRef, consecutive: int) -> None: ...


class SessionSink(TransitionSink, MissSink, Protocol):
    """What a session reports to."""


class Reporters:
    """Fan-out to every configured sink; one failing sink never stops the others."""

    def __init__(self, sinks: Iterable[TransitionSink]) -> None:
        self._sinks = list(sinks)
        self._miss_sinks = [sink for sink in self._sinks if isinstance(sink, MissSink)]

    def report(self, vm: VMRef, change: Transition) -> None:
        for sink in self._sinks:
            try:
                sink.report(vm, change)
            except Exception:
                log.exception("reporting sink %s failed", type(sink).__name__)

    def challenge_missed(self, vm: VMRef, consecutive: int) -> None:
        for sink in self._miss_sinks:
            try:
                sink.challenge_missed(vm, consecutive)
            except Exception:
                log.exception("reporting sink %s failed", type(sink).__name__)


class LogSink:
    def report(self, vm: VMRef, change: Transition) -> None:
        level = logging.WARNING if change.is_fault else logging.INFO
        log.log(
            level,
            "%s: %s → %s (%s)",
            vm,
            change.previous,
            change.current,
            change.reason,
            extra={
                "namespace": vm.namespace,
                "vm": vm.name,
                "previous": change.previous.value,
                "state": change.current.value,
                "reason": change.reason.value,
                "detail": change.detail,
                "fault": change.is_fault,
            },
        )
