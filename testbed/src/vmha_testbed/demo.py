"""The local demo: two QEMU guests running vmha-guest, wired to a node agent, heartbeats live.

    make demo            (or: python -m vmha_testbed.demo)

It builds (or reuses) the guest image, boots two guests under software emulation, starts a
node agent and a local Doctor inspector, and then shows every second what the agent sees and
what reached the inspector. Try, in another terminal (the screen shows the PIDs):
    kill -STOP <qemu pid>   hang a guest: `failed` after interval * (threshold + 1)
    kill -CONT <qemu pid>   it recovers
Ctrl-C stops everything the demo started and removes its temporary files.
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
from collections import defaultdict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from vmha_testbed.agentproc import NodeAgentProcess, Sample
from vmha_testbed.guestimage import build_guest_image
from vmha_testbed.inspector import InspectorServer
from vmha_testbed.qemu import GuestVM, boot_guests

T = TypeVar("T")
GUESTS = ("demo-a", "demo-b")
NAMESPACE = "demo"
MISSED_THRESHOLD = 3


def guest_config(name: str, interval_ms: int) -> str:
    return f"""
[heartbeat]
name = "{name}"
interval_ms = {interval_ms}
corrective_action = "log"
"""


async def with_progress(message: str, work: Awaitable[T]) -> T:
    """Run `work` while a line ticks the seconds (booting under TCG takes a while)."""
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    tty = sys.stdout.isatty()
    while not task.done():
        if tty:
            print(f"\r{message} … {time.monotonic() - started:3.0f} s", end="", flush=True)
        await asyncio.wait({task}, timeout=1.0)
    result = task.result()
    print(f"\r{message} … done in {time.monotonic() - started:.0f} s", flush=True)
    return result


def vm_rows(samples: list[Sample], guests: list[GuestVM]) -> list[str]:
    seen: dict[str, dict[str, Any]] = defaultdict(dict)
    for name, labels, value in samples:
        found = dict(labels)
        vm = found.get("vm")
        if vm is None:
            continue
        if name == "vmha_heartbeat_state" and value == 1:
            seen[vm]["state"] = found["state"]
        elif name == "vmha_heartbeat_responses_total" and found.get("health") == "healthy":
            seen[vm]["healthy"] = value
        elif name == "vmha_heartbeat_challenges_total":
            seen[vm]["challenges"] = value
        elif name == "vmha_heartbeat_missed_total":
            seen[vm]["missed"] = value
        elif name == "vmha_heartbeat_last_healthy_timestamp_seconds":
            seen[vm]["age"] = f"{time.time() - value:.1f} s ago"
    rows = [
        f"{'VM':8} {'QEMU pid':>9}  {'heartbeat':17} {'challenges':>10} {'healthy':>8} "
        f"{'missed':>7}  last healthy"
    ]
    for guest in guests:
        row = seen.get(guest.name, {})
        pid = f"{guest.pid}{' (stopped)' if guest.paused else ''}" if guest.is_running else "gone"
        rows.append(
            f"{guest.name:8} {pid:>9}  {row.get('state', '-'):17} "
            f"{row.get('challenges', 0):>10.0f} {row.get('healthy', 0):>8.0f} "
            f"{row.get('missed', 0):>7.0f}  {row.get('age', '-')}"
        )
    return rows


def doctor_rows(inspector: InspectorServer, last: int = 6) -> list[str]:
    rows = []
    for event in inspector.events[-last:]:
        details = event["details"]
        rows.append(
            f"  {event['time']}  {details['vm']:8} {details['status']:4} "
            f"{details['heartbeat_state']:10} {details['message']}"
        )
    return rows or ["  (none yet)"]


async def show_live(
    agent: NodeAgentProcess, inspector: InspectorServer, guests: list[GuestVM], interval_ms: int
) -> None:
    tty = sys.stdout.isatty()
    bound = interval_ms * (MISSED_THRESHOLD + 1) / 1000
    while True:
        screen = [
            "vmha demo — node agent view (Ctrl-C stops everything)",
            "",
            *vm_rows(await agent.samples(), guests),
            "",
            f"Doctor inspector at {inspector.url} received {len(inspector.events)} report(s):",
            *doctor_rows(inspector),
            "",
            f"Hang a guest: kill -STOP <pid> (detected within {bound:.0f} s); "
            "resume: kill -CONT <pid>",
            f"Agent log: {agent.log_path}   metrics: {agent.url}/metrics",
        ]
        if tty:
            print("\x1b[H\x1b[2J" + "\n".join(screen), flush=True)
        else:
            print("\n".join(screen[2 : 3 + len(guests)]), flush=True)
        await asyncio.sleep(1.0 if tty else 5.0)


async def run(workdir: Path, interval_ms: int) -> None:
    image = await with_progress(
        "Guest image (Debian kernel + busybox + python + vmha-guest; cached after the first run)",
        asyncio.to_thread(build_guest_image),
    )
    guests = await with_progress(
        f"Booting {len(GUESTS)} QEMU guests under software emulation",
        asyncio.to_thread(
            boot_guests,
            image,
            workdir / "guests",
            [guest_config(name, interval_ms) for name in GUESTS],
            names=list(GUESTS),
        ),
    )
    inspector = InspectorServer()
    agent = NodeAgentProcess(
        {
            "node_name": "demo-node",
            "heartbeat": {"min_interval_ms": 100, "missed_threshold": MISSED_THRESHOLD},
            "doctor": {"url": "", "retry_initial_s": 0.2},
            "vms": [
                {"name": g.name, "namespace": NAMESPACE, "socket": str(g.channel_socket)}
                for g in guests
            ],
        },
        workdir / "agent",
    )
    try:
        await inspector.start()
        agent.config["doctor"]["url"] = inspector.url
        await agent.start()
        await show_live(agent, inspector, guests, interval_ms)
    finally:
        print("\nStopping: node agent, inspector, guests …", flush=True)
        await agent.stop()
        await inspector.stop()
        for guest in guests:
            await asyncio.to_thread(guest.close)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmha-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-ms", type=int, default=1000, help="guest heartbeat interval")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vmha-demo-"))

    async def main_task() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run(workdir, args.interval_ms)

    try:
        asyncio.run(main_task())
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("Stopped; nothing left running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
