"""Health: every configured check on its own schedule, and the latest verdict on demand.

Each check runs in its own task: run (bounded by its timeout), record the result, sleep
its interval, repeat. A challenge never waits for a check; it reads `report()`, which
uses the latest results:

- a run that exceeds its timeout is cancelled and counts as failed;
- a run still going longer than its timeout (plus a small allowance for scheduling) is
  stuck and counts as failed, whatever the last result was — a probe that ignores its
  cancellation, or a blocked loop. A check that is merely late to start its next run is
  not stuck: after the VM was paused the guest's clock jumps ahead, and the first challenge
  after the resume may be answered before the check had its turn;
- before its first result a check counts as passing ("no result yet"): there is no
  evidence of a fault yet, and reporting unhealthy at every boot would raise a fault for
  every VM that starts. The stuck rule bounds this: a first run that never finishes
  counts as failed after its timeout.

Health is all checks passing; no checks means healthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmha_guest.checks import CheckResult, Probe, make_probe
from vmha_guest.config import CheckConfig
from vmha_protocol import limits
from vmha_protocol.types import truncate_utf8

log = logging.getLogger(__name__)

# Event-loop lag we tolerate before calling a check stuck.
STUCK_ALLOWANCE_S = 0.5

Clock = Callable[[], float]


@dataclass(frozen=True)
class HealthReport:
    failing: tuple[tuple[str, str], ...] = ()  # (check name, reason)

    @property
    def healthy(self) -> bool:
        return not self.failing

    def log_msg(self, limit: int = limits.HEARTBEAT_MAX_LOG_BYTES) -> str:
        """The failing checks, with reasons if they fit in `limit` bytes, else names only."""
        if self.healthy:
            return ""
        detailed = "failing: " + "; ".join(f"{name} ({why})" for name, why in self.failing)
        if len(detailed.encode("utf-8")) <= limit:
            return detailed
        return truncate_utf8("failing: " + ", ".join(name for name, _ in self.failing), limit)


class CheckRunner:
    """One check, run on its own schedule."""

    def __init__(self, check: CheckConfig, probe: Probe, clock: Clock = time.monotonic) -> None:
        self.check = check
        self._probe = probe
        self._clock = clock
        self._timeout_s = check.timeout_ms / 1000
        self._interval_s = check.interval_ms / 1000
        self._stuck_after_s = self._timeout_s + STUCK_ALLOWANCE_S
        self._latest: CheckResult | None = None
        self._running_since: float | None = None  # when the run in progress started
        self._reported_stuck = False

    @property
    def name(self) -> str:
        return self.check.name

    async def run(self) -> None:
        task = asyncio.current_task()
        while True:
            self._running_since = self._clock()
            self._record(await self.run_once())
            if task is not None and task.cancelling():
                # A probe swallowed our cancellation; it must not keep the runner alive.
                raise asyncio.CancelledError
            await asyncio.sleep(self._interval_s)

    async def run_once(self) -> CheckResult:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._probe()
        except TimeoutError:
            return CheckResult(False, f"timed out after {self.check.timeout_ms} ms")
        except Exception as exc:  # a broken probe is a failing check, not a dead task
            log.exception("check %s: probe failed", self.name)
            return CheckResult(False, f"check error: {exc}")

    def current(self) -> CheckResult:
        """The result that counts now."""
        running_s = 0.0 if self._running_since is None else self._clock() - self._running_since
        if running_s > self._stuck_after_s:
            if not self._reported_stuck:
                self._reported_stuck = True
                log.warning("check %s: stuck, running for %.1f s", self.name, running_s)
            return CheckResult(False, f"stuck: running for {running_s:.0f} s")
        return self._latest or CheckResult(True, "no result yet")

    def _record(self, result: CheckResult) -> None:
        previous, self._latest = self._latest, result
        self._running_since = None
        self._reported_stuck = False
        if previous is None or previous.ok != result.ok:
            if result.ok:
                log.info("check %s: passing (%s)", self.name, result.detail)
            else:
                log.warning("check %s: failing (%s)", self.name, result.detail)


class HealthMonitor:
    """Runs every check in its own task and answers `report()` from their latest results."""

    def __init__(
        self,
        checks: Sequence[CheckConfig],
        *,
        probe_factory: Callable[[CheckConfig], Probe] = make_probe,
        clock: Clock = time.monotonic,
    ) -> None:
        self.runners = [CheckRunner(check, probe_factory(check), clock) for check in checks]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(runner.run(), name=f"check {runner.name}")
            for runner in self.runners
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def report(self) -> HealthReport:
        failing = []
        for runner in self.runners:
            result = runner.current()
            if not result.ok:
                failing.append((runner.name, result.detail))
        return HealthReport(tuple(failing))
