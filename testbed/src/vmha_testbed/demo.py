"""The local demo: the whole of vmha on this machine.

    make demo      (or: python -m vmha_testbed.demo [--tour-only] [--interval-ms 2000] [--keep])

It builds what it needs once (the Kubernetes toolchain, the guest image; both cached), then
starts a control plane (etcd + kube-apiserver), the operator, the node agents of two nodes
(node-a, node-b) talking over mutual TLS, a local OPNFV Doctor inspector, and boots three
QEMU guests running vmha-guest as the VMs of VMGroup `web`: web-1 and web-2 on node-a,
web-3 on node-b. Each guest runs `vmha-guest watch`, standing for its application.

The screen shows the heartbeats live while a tour runs:
  1. web-1 broadcasts a message: web-2 and web-3 receive it;
  2. web-3 is paused (its VMI's Paused condition, as virt-handler sets it): the others
     are notified, and again when it runs on;
  3. web-2 hangs (its QEMU stopped with SIGSTOP): node-a's agent declares it failed — an
     Event on its VMI, a report to the Doctor inspector, a notification to the others — and
     it recovers when resumed.
Then the live view stays until Ctrl-C (with --tour-only the demo stops after the tour).
Either way everything the demo started is stopped and its temporary files are removed.
The screen is redrawn when stdout is a terminal; otherwise the demo prints plain lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vmha_testbed.agentproc import AgentProcess
from vmha_testbed.cluster import FAST_AGENT_CONFIG, LocalCluster, local_cluster
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.guestapps import GuestWatch, run_cli
from vmha_testbed.guestimage import GuestImage, build_guest_image
from vmha_testbed.inspector import InspectorServer
from vmha_testbed.promtext import Sample
from vmha_testbed.qemu import GuestVM, GuestVMError, boot_guests
from vmha_testbed.toolchain import ensure_toolchain, toolchain

T = TypeVar("T")
GROUP = "web"
PLACEMENT = {"web-1": "node-a", "web-2": "node-a", "web-3": "node-b"}
MISSED_THRESHOLD = 3
STEP_TIMEOUT = 90.0
TOUR_LINES = 18  # the tour's last lines on the screen
# A demo may run for hours: its ServiceAccount tokens last a day.
TOKEN_LIFETIME_S = 86400


def guest_config(name: str, interval_ms: int) -> str:
    return f"""
[heartbeat]
name = "{name}"
interval_ms = {interval_ms}
corrective_action = "log"
"""


# --- progress -----------------------------------------------------------------------------


async def with_progress(message: str, work: Awaitable[T], *, ticking: bool = True) -> T:
    """Run `work` while a line ticks the seconds (booting under TCG takes a while)."""
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    tty = sys.stdout.isatty() and ticking
    if not tty:
        print(f"{message} …", flush=True)
    while not task.done():
        if tty:
            print(f"\r{message} … {time.monotonic() - started:3.0f} s", end="", flush=True)
        await asyncio.wait({task}, timeout=1.0)
    result = task.result()
    print(f"{chr(13) if tty else ''}{message} … done in {time.monotonic() - started:.0f} s",
          flush=True)  # fmt: skip
    return result


# --- what the guests' applications received ---------------------------------------------------


@dataclass(frozen=True)
class Received:
    guest: str
    event: dict[str, Any]


@dataclass
class GuestApps:
    """Each guest's `vmha-guest watch` output, read in the background (never while its QEMU
    is stopped: the read would wait for it)."""

    watches: dict[str, GuestWatch]
    received: list[Received] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=dict)

    async def follow(self, name: str) -> None:
        watch = self.watches[name]
        while True:
            if watch.vm.is_running and not watch.vm.paused:
                with contextlib.suppress(GuestVMError, TimeoutError, OSError):
                    events = await asyncio.to_thread(watch.events)
                    seen = self._counts.get(name, 0)
                    for event in events[seen:]:
                        if event.get("event") != "host":
                            self.received.append(Received(name, event))
                    self._counts[name] = len(events)
            await asyncio.sleep(1.0)

    async def wait_for(
        self, match: Callable[[Received], bool], after: int, timeout: float = STEP_TIMEOUT
    ) -> Received | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((r for r in self.received[after:] if match(r)), None)
            if found is not None:
                return found
            await asyncio.sleep(0.2)
        return None


def describe_received(item: Received) -> str:
    event = item.event
    if event.get("event") == "broadcast":
        return f"{item.guest:6} ← broadcast from {event['source_instance']}: {event['data']}"
    if event.get("event") == "notification":
        m = event["member"]
        return (
            f"{item.guest:6} ← notification: {m['display_name']} state={m['state']} "
            f"heartbeat={m['heartbeat']} host={m.get('host') or '-'}"
        )
    return f"{item.guest:6} ← {event}"


# --- the live view ------------------------------------------------------------------------


def heartbeat_rows(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Per VM, from its node's agent: state, challenges, healthy answers, misses, age."""
    seen: dict[str, dict[str, Any]] = {}
    for name, labels, value in samples:
        vm = labels.get("vm")
        if vm is None:
            continue
        row = seen.setdefault(vm, {})
        if name == "vmha_heartbeat_state" and value == 1:
            row["state"] = labels["state"]
        elif name == "vmha_heartbeat_challenges_total":
            row["challenges"] = value
        elif name == "vmha_heartbeat_missed_total":
            row["missed"] = value
        elif name == "vmha_heartbeat_last_healthy_timestamp_seconds":
            row["age"] = f"{time.time() - value:.1f} s ago"
    return seen


def agent_samples(agent: AgentProcess) -> list[Sample]:
    """The agent's samples; none while it is down (the screen shows what there is)."""
    if not agent.running:
        return []
    try:
        return agent.samples()
    except (OSError, RuntimeError):
        return []


@dataclass
class Demo:
    cluster: LocalCluster
    guests: dict[str, GuestVM]
    apps: GuestApps
    inspector: InspectorServer
    interval_ms: int
    tour: list[str] = field(default_factory=list)
    tty: bool = field(default_factory=sys.stdout.isatty)

    def say(self, line: str) -> None:
        """A line of the tour's narration (printed at once without a terminal)."""
        self.tour.append(line)
        if not self.tty:
            print(line, flush=True)

    # -- the screen --

    async def screen(self) -> list[str]:
        kubevirt = self.cluster.kubevirt
        samples = [
            sample
            for agent in self.cluster.agents.values()
            for sample in await asyncio.to_thread(agent_samples, agent)
        ]
        rows = heartbeat_rows(samples)
        events = await asyncio.to_thread(kubevirt.events)
        group = await asyncio.to_thread(kubevirt.group_status, GROUP)
        lines = [
            f"vmha demo {time.strftime('%H:%M:%S')} — VMGroup {GROUP} in namespace "
            f"{self.cluster.namespace}: operator, node agents of node-a and node-b, three QEMU "
            "guests   (Ctrl-C stops everything)",
            "",
            f"{'VM':6} {'node':6} {'QEMU pid':>14}  {'heartbeat':12} {'challenges':>10} "
            f"{'missed':>6}  {'last healthy':14} group status (operator)",
        ]
        members = {m["vm"]: m for m in group.get("members", [])}
        for name, guest in self.guests.items():
            row, member = rows.get(name, {}), members.get(name, {})
            pid = f"{guest.pid}{' (stopped)' if guest.paused else ''}" if guest.is_running else "-"
            shown = f"{member.get('phase', '-')} {member.get('heartbeat', '-')}"
            lines.append(
                f"{name:6} {PLACEMENT[name]:6} {pid:>14}  {row.get('state', '-'):12} "
                f"{row.get('challenges', 0):>10.0f} {row.get('missed', 0):>6.0f}  "
                f"{row.get('age', '-'):14} {shown}"
            )
        conditions: list[dict[str, Any]] = group.get("conditions", [])
        ready = next((c for c in conditions if c["type"] == "Ready"), {})
        lines += [f"{'':6} Ready={ready.get('status', '?')} ({ready.get('reason', '-')})", ""]
        lines.append("What the applications in the guests received (vmha-guest watch):")
        lines += [f"  {describe_received(r)}" for r in self.apps.received[-6:]] or ["  -"]
        lines += ["", "Events on the VMIs (the node agents'):"]
        lines += [f"  {describe_event(e)}" for e in sorted(events, key=event_time)[-5:]] or ["  -"]
        lines += ["", f"Doctor inspector at {self.inspector.url}: "
                  f"{len(self.inspector.events)} report(s)"]  # fmt: skip
        lines += [f"  {describe_report(e)}" for e in self.inspector.events[-3:]]
        lines += ["", "Tour:", *(f"  {line}" for line in self.tour[-TOUR_LINES:])]
        return lines

    async def draw(self) -> None:
        """Redraw the screen (a terminal only)."""
        width = shutil.get_terminal_size().columns
        try:
            screen = await self.screen()
        except Exception as error:  # the demo goes on; say what is missing
            screen = [f"(the live view failed: {error!r})", "", *self.tour[-TOUR_LINES:]]
        print("\x1b[H\x1b[2J" + "\n".join(line[:width] for line in screen), flush=True)

    async def show_live(self) -> None:
        while True:
            if self.tty:
                await self.draw()
                await asyncio.sleep(1.0)
            else:
                await asyncio.sleep(10.0)
                samples = [
                    s
                    for agent in self.cluster.agents.values()
                    for s in await asyncio.to_thread(agent_samples, agent)
                ]
                rows = heartbeat_rows(samples)
                states = ", ".join(
                    f"{name} {rows.get(name, {}).get('state', '-')} "
                    f"({rows.get(name, {}).get('challenges', 0):.0f} challenges)"
                    for name in self.guests
                )
                print(f"heartbeats: {states}", flush=True)

    # -- the tour --

    async def run_tour(self) -> None:
        await self.broadcast()
        await self.pause()
        await self.hang()
        self.say("Tour done.")

    async def broadcast(self) -> None:
        message = "hello from web-1"
        self.say(f'1. web-1 broadcasts: vmha-guest broadcast "{message}" (in the guest)')
        mark = len(self.apps.received)
        result = await asyncio.to_thread(run_cli, self.guests["web-1"], "broadcast", message)
        self.say(f"   exit {result.returncode}: {result.objects}")
        for name in ("web-2", "web-3"):
            await self.heard(name, mark, event="broadcast", data=message)

    async def pause(self) -> None:
        kubevirt = self.cluster.kubevirt
        self.say("2. web-3 is paused: its VMI gets the Paused condition, as virt-handler sets it")
        for paused, state in ((True, "paused"), (False, "active")):
            mark = len(self.apps.received)
            await asyncio.to_thread(kubevirt.set_paused, "web-3", paused)
            if not paused:
                self.say("   … and runs on again (the condition cleared)")
            for name in ("web-1", "web-2"):
                await self.heard(name, mark, display_name="web-3", state=state)
            await asyncio.sleep(3.0)

    async def hang(self) -> None:
        guest, kubevirt = self.guests["web-2"], self.cluster.kubevirt
        bound = self.interval_ms * (MISSED_THRESHOLD + 1) / 1000
        self.say(
            f"3. web-2 hangs: its QEMU (pid {guest.pid}) is stopped (SIGSTOP); node-a's agent "
            f"should declare it failed within {bound:.0f} s"
        )
        mark, reports = len(self.apps.received), len(self.inspector.events)
        started = time.monotonic()
        await asyncio.to_thread(guest.pause)
        try:
            failed = await self.wait(lambda: kubevirt.events("web-2", "HeartbeatFailed"))
            if failed:
                self.say(
                    f"   after {time.monotonic() - started:.1f} s: {describe_event(failed[0])}"
                )
            report = await self.wait(lambda: self.report("web-2", "down", reports))
            self.say(f"   Doctor: {describe_report(report)}" if report else "   Doctor: no report")
            for name in ("web-1", "web-3"):
                await self.heard(name, mark, display_name="web-2", heartbeat="unhealthy")
        finally:
            await asyncio.to_thread(guest.resume)
        self.say("   … web-2's QEMU resumed (SIGCONT)")
        recovered = await self.wait(lambda: kubevirt.events("web-2", "HeartbeatRecovered"))
        if recovered:
            self.say(f"   {describe_event(recovered[0])}")
        report = await self.wait(lambda: self.report("web-2", "up", reports))
        self.say(f"   Doctor: {describe_report(report)}" if report else "   Doctor: no report")

    async def heard(
        self, guest: str, mark: int, event: str = "notification", **fields: str
    ) -> None:
        """Wait until `guest`'s application received the event (a notification about a
        member with these `fields`, or a broadcast with them); narrate it."""

        def match(item: Received) -> bool:
            about = item.event.get("member", item.event) if event == "notification" else item.event
            return (
                item.guest == guest
                and item.event.get("event") == event
                and all(about.get(key) == value for key, value in fields.items())
            )

        got = await self.apps.wait_for(match, mark)
        self.say(f"   {describe_received(got)}" if got else f"   {guest}: nothing arrived")

    def report(self, vm: str, status: str, after: int) -> dict[str, Any] | None:
        return next(
            (
                e
                for e in self.inspector.events[after:]
                if e["details"]["vm"] == vm and e["details"]["status"] == status
            ),
            None,
        )

    async def wait(self, check: Callable[[], T | None], timeout: float = STEP_TIMEOUT) -> T | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await asyncio.to_thread(check)
            if found:
                return found
            await asyncio.sleep(0.5)
        return None


def event_time(event: dict[str, Any]) -> str:
    series = event.get("series") or {}
    return str(series.get("lastObservedTime") or event.get("eventTime") or "")


def describe_event(event: dict[str, Any]) -> str:
    count = (event.get("series") or {}).get("count")
    times = f" (x{count})" if count else ""
    return (
        f"{event_time(event)[11:19]} {event['regarding']['name']:6} {event['type']:7} "
        f"{event['reason']}{times}: {event.get('note', '')}"
    )


def describe_report(report: dict[str, Any]) -> str:
    details = report["details"]
    return (
        f"{report['time'][11:19]} {details['vm']:6} {details['status']:4} "
        f"{details['heartbeat_state']:9} {details['message']}"
    )


# --- setting it up ------------------------------------------------------------------------


async def start_guests(
    cluster: LocalCluster, image: GuestImage, workdir: Path, interval_ms: int
) -> list[GuestVM]:
    kubevirt = cluster.kubevirt
    await asyncio.to_thread(
        kubevirt.create_group,
        GROUP,
        heartbeat={"missedThreshold": MISSED_THRESHOLD, "correctiveAction": "log"},
    )
    # The VMs are admitted by the operator.
    members = await asyncio.to_thread(kubevirt.start_members, GROUP, PLACEMENT)
    return await with_progress(
        f"Booting {len(members)} QEMU guests under software emulation",
        asyncio.to_thread(
            boot_guests,
            image,
            workdir / "guests",
            [guest_config(m.name, interval_ms) for m in members],
            names=[m.name for m in members],
            channel_sockets=[m.socket for m in members],
        ),
    )


async def start_watches(cluster: LocalCluster, guests: list[GuestVM]) -> dict[str, GuestWatch]:
    def registered() -> None:
        for guest in guests:
            cluster.kubevirt.wait_heartbeat(guest.name, "healthy", timeout=STEP_TIMEOUT)

    await with_progress("Guests registering with their node's agent", asyncio.to_thread(registered))
    watches = {guest.name: GuestWatch(guest) for guest in guests}

    async def subscribed(watch: GuestWatch) -> None:
        await asyncio.to_thread(watch.start)
        await asyncio.to_thread(watch.wait_subscribed)

    await with_progress(
        "Starting `vmha-guest watch` in each guest (their applications)",
        asyncio.gather(*(subscribed(w) for w in watches.values())),
    )
    return watches


async def run(args: argparse.Namespace, workdir: Path) -> None:
    tools = toolchain()
    if tools.missing():
        print("Building the Kubernetes toolchain (first run only; about 10 minutes):", flush=True)
    tools = await with_progress(
        "Kubernetes toolchain (kube-apiserver, kubectl, helm; cached)",
        asyncio.to_thread(ensure_toolchain),
        ticking=not tools.missing(),  # the build prints its own progress
    )
    image = await with_progress(
        "Guest image (Debian kernel + busybox + Python + vmha-guest; cached after the first run)",
        asyncio.to_thread(build_guest_image),
    )
    inspector = InspectorServer()
    await inspector.start()
    with contextlib.ExitStack() as stack:
        try:
            control_plane = await with_progress(
                "Control plane (etcd + kube-apiserver)",
                asyncio.to_thread(stack.enter_context, ControlPlane(tools=tools)),
            )
            config = {
                **FAST_AGENT_CONFIG,
                "heartbeat": {"min_interval_ms": 100, "missed_threshold": MISSED_THRESHOLD},
                "doctor": {"url": inspector.url, "retry_initial_s": 0.2},
                "events": {"series_update_s": 1.0},
            }
            cluster = await with_progress(
                "Operator and node agents of node-a and node-b (mutual TLS, pod-bound tokens)",
                asyncio.to_thread(
                    stack.enter_context,
                    local_cluster(
                        control_plane,
                        workdir=workdir,
                        agent_config=config,
                        namespace_prefix="demo-",
                        token_lifetime_s=TOKEN_LIFETIME_S,
                    ),
                ),
            )
            booted = await start_guests(cluster, image, workdir, args.interval_ms)
            for guest in booted:
                stack.callback(guest.close)
            watches = await start_watches(cluster, booted)
            await show(cluster, {g.name: g for g in booted}, watches, inspector, args)
        finally:
            print("\nStopping: guests, node agents, operator, control plane …", flush=True)
            await asyncio.to_thread(stack.close)
            await inspector.stop()


async def show(
    cluster: LocalCluster,
    guests: dict[str, GuestVM],
    watches: dict[str, GuestWatch],
    inspector: InspectorServer,
    args: argparse.Namespace,
) -> None:
    apps = GuestApps(watches)
    demo = Demo(cluster, guests, apps, inspector, args.interval_ms)
    background = [asyncio.create_task(apps.follow(name)) for name in guests]
    background.append(asyncio.create_task(demo.show_live()))
    try:
        await demo.run_tour()
        if args.tour_only:
            if demo.tty:
                await demo.draw()  # the tour's end stays on the screen
            return
        pids = ", ".join(f"{name} {guest.pid}" for name, guest in guests.items())
        demo.say(f"Now try, in another terminal: kill -STOP <QEMU pid> (then -CONT); {pids}")
        demo.say(
            f"or kubectl: KUBECONFIG={cluster.control_plane.kubeconfig_path} "
            f"{cluster.control_plane.tools.kubectl} -n {cluster.namespace} get vmgroups,vmis"
        )
        await asyncio.Event().wait()  # until Ctrl-C
    finally:
        for task in background:
            task.cancel()
        for outcome in await asyncio.gather(*background, return_exceptions=True):
            if isinstance(outcome, Exception):
                print(f"a background task of the demo failed: {outcome!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmha-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--interval-ms", type=int, default=2000, help="guest heartbeat interval (default 2000)"
    )
    parser.add_argument("--tour-only", action="store_true", help="stop after the tour")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vmha-demo-"))
    interrupted = False

    async def main_task() -> None:
        nonlocal interrupted
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await run(args, workdir)
        except asyncio.CancelledError:
            interrupted = True

    try:
        asyncio.run(main_task())
    finally:
        if args.keep:
            print(f"Logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("Stopped; nothing left running." if interrupted else "Done; nothing left running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
