#!/usr/bin/env python3
"""Active/standby with vmha server group messaging: an example application.

Run one instance in each VM of a two-member VMGroup (with the `vmha-guest` daemon running):

    python3 active_standby.py [--instance-id UID] [--period 2] \\
        [--on-active "systemctl start myservice"] [--on-standby "systemctl stop myservice"]

It prints one line per role change (`role: active (term 3)`) and runs the hooks, if any,
with the term in $VMHA_TERM.

How the pair decides
--------------------
- Facts about members come from the platform: `status` (re-read every period) and
  `notification` events (a member's state changed). A member is *up* when its state is
  `active` and its heartbeat is not `unhealthy`; it is *down* when the platform reports it
  paused, stopped, in error, gone, or unhealthy.
- The active member holds a *claim*: `{"app": "active-standby", "term": T, "active": UID}`,
  broadcast when it takes over and again every period. The newest claim wins: the higher
  term, and on equal terms the lower instance id.
- The holder of the newest claim stays active as long as the platform reports it up (no
  preemption: a member that comes back, even with a lower id, stays standby). Without a
  live holder, the up member with the lowest instance id takes over with term + 1.

How it avoids split brain when tenant networking fails
------------------------------------------------------
- Nothing here uses the tenant network. Member states come from the Kubernetes API
  through the node agents, and claims travel over the virtio-serial port and the agents'
  own network. A failed tenant network makes neither member look down, so the standby
  does not take over: the pair stays as it was.
- A takeover needs the platform's verdict that the active is down (paused, stopped,
  failed, or its heartbeat unhealthy), never merely a missing message from the peer.
- A member that was frozen (paused VM, long stall) does not trust what it knew: when its
  loop sees a gap of more than two periods, or when the connection to the host comes
  back, it steps down to standby and waits a hold time (two periods) for the current
  claim before it may take over again. A standby without a host connection never takes
  over.

Limits (the channel is best-effort)
-----------------------------------
- Broadcasts and notifications are datagrams and can be lost. Claims are repeated and
  status is re-read every period, so a loss delays a decision by about a period.
- A frozen active that resumes acts as active until its loop notices the gap (normally
  well under a period). If two actives for that moment would hurt, fence side effects
  with the term (a storage lock or generation number that refuses older terms).
- If the platform cannot see a member (its node is cut off from the cluster), its state
  does not change and no takeover happens: the pair waits for the platform's verdict
  (consistency before availability).
- Two members that elect themselves at the same moment settle on the newest claim as
  soon as they see each other's broadcast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vmha_guest.client import (
    BroadcastEvent,
    Event,
    GuestClient,
    HostEvent,
    NotificationEvent,
    Topic,
    VmhaError,
)
from vmha_protocol.server_group import MemberState

APP = "active-standby"


# -- decisions (pure) ----------------------------------------------------------------------


def is_up(member: MemberState) -> bool:
    """The platform reports the member running and not unhealthy."""
    return member.state == "active" and member.heartbeat != "unhealthy"


@dataclass(frozen=True)
class Claim:
    term: int
    active: str  # instance_id of the member that holds the term


def newest(current: Claim | None, seen: Claim | None) -> Claim | None:
    """The claim that wins: the higher term; on equal terms the lower instance id."""
    if current is None or seen is None:
        return current or seen
    if current.term != seen.term:
        return current if current.term > seen.term else seen
    return current if current.active <= seen.active else seen


def choose_active(members: Mapping[str, MemberState], claim: Claim | None) -> str | None:
    """Who should be active: the claim's holder while it is up, else the lowest up id."""
    if claim is not None:
        holder = members.get(claim.active)
        if holder is not None and is_up(holder):
            return claim.active
    up = sorted(uid for uid, member in members.items() if is_up(member))
    return up[0] if up else None


def claim_text(claim: Claim) -> str:
    return json.dumps({"app": APP, "term": claim.term, "active": claim.active})


def parse_claim(data: str) -> Claim | None:
    """A claim from a broadcast; None for anything else (other applications broadcast too)."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("app") != APP:
        return None
    term, active = obj.get("term"), obj.get("active")
    if type(term) is not int or term < 1 or not isinstance(active, str) or not active:
        return None
    return Claim(term, active)


def frozen(previous: tuple[float, float], now: tuple[float, float], limit_s: float) -> bool:
    """Whether the loop stalled: a gap over `limit_s` on the monotonic or the wall clock
    (a paused VM's monotonic clock may not advance; its wall clock jumps when corrected)."""
    return any(later - earlier > limit_s for earlier, later in zip(previous, now, strict=True))


@dataclass(frozen=True)
class Decision:
    active: bool
    changed: bool
    announce: Claim | None  # broadcast this claim now


@dataclass
class Pair:
    """One member's view of the pair and its role; `decide` says what to do next."""

    me: str
    hold_s: float
    members: dict[str, MemberState] = field(default_factory=dict)
    claim: Claim | None = None
    active: bool = False
    connected: bool = True
    hold_until: float = 0.0  # no takeover before this

    def saw_members(self, members: Iterable[MemberState]) -> None:
        self.members = {member.instance_id: member for member in members}

    def saw_member(self, member: MemberState) -> None:
        self.members[member.instance_id] = member

    def saw_claim(self, claim: Claim) -> None:
        self.claim = newest(self.claim, claim)

    def lost_track(self, now: float) -> None:
        """After a freeze or a reconnection: standby, and learn before deciding again."""
        self.active = False
        self.hold_until = now + self.hold_s

    def decide(self, now: float) -> Decision:
        was_active = self.active
        if choose_active(self.members, self.claim) != self.me:
            self.active = False
            return Decision(False, was_active, None)
        if not self.active and (now < self.hold_until or not self.connected):
            return Decision(False, False, None)  # may not take over yet
        if self.claim is None or self.claim.active != self.me:
            self.claim = Claim((self.claim.term if self.claim else 0) + 1, self.me)
        self.active = True
        return Decision(True, not was_active, self.claim)


def find_self(members: Iterable[MemberState], hostname: str) -> str | None:
    """This VM's instance id: the member whose hostname or name is this host's name."""
    for member in members:
        if hostname in (member.hostname, member.display_name):
            return member.instance_id
    return None


# -- the application (I/O) -----------------------------------------------------------------


class Application:
    def __init__(self, client: GuestClient, pair: Pair, args: argparse.Namespace) -> None:
        self.client = client
        self.pair = pair
        self.args = args

    async def run(self) -> None:
        period = self.args.period
        self.pair.lost_track(time.monotonic())  # learn the current claim first
        tick = _clocks()
        next_round = 0.0
        while True:
            remaining = next_round - time.monotonic()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    self.observe(await self.client.next_event(timeout=remaining))
                continue
            if frozen(tick, _clocks(), 2 * period):
                print("stalled: standby until the pair is known again", flush=True)
                was_active = self.pair.active
                self.pair.lost_track(time.monotonic())
                await self.apply(Decision(False, was_active, None))
            await self.refresh()
            await self.apply(self.pair.decide(time.monotonic()))
            tick = _clocks()  # the gap that counts is the wait between rounds
            next_round = tick[0] + period

    def observe(self, event: Event) -> None:
        match event:
            case NotificationEvent(member=member):
                self.pair.saw_member(member)
            case BroadcastEvent(data=data):
                if (claim := parse_claim(data)) is not None:
                    self.pair.saw_claim(claim)
            case HostEvent(connected=connected):
                if connected and not self.pair.connected:
                    self.pair.lost_track(time.monotonic())
                self.pair.connected = connected

    async def refresh(self) -> None:
        try:
            status = await self.client.status(timeout=self.args.period)
        except VmhaError as error:
            print(f"status: {error.message}", file=sys.stderr, flush=True)
            return
        self.pair.saw_members(status.members)

    async def apply(self, decision: Decision) -> None:
        if decision.changed:
            term = self.pair.claim.term if self.pair.claim else 0
            role = "active" if decision.active else "standby"
            print(f"role: {role} (term {term})", flush=True)
            hook = self.args.on_active if decision.active else self.args.on_standby
            if hook:
                await _run_hook(hook, term)
        if decision.announce is not None:
            try:
                await self.client.broadcast(claim_text(decision.announce), timeout=self.args.period)
            except VmhaError as error:
                print(f"claim not sent: {error.message}", file=sys.stderr, flush=True)


def _clocks() -> tuple[float, float]:
    return time.monotonic(), time.time()


async def _run_hook(command: str, term: int) -> None:
    env = {**os.environ, "VMHA_TERM": str(term)}
    process = await asyncio.create_subprocess_exec(*shlex.split(command), env=env)
    try:
        async with asyncio.timeout(30):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


async def main(args: argparse.Namespace) -> int:
    async with GuestClient(args.socket, name=APP) as client:
        await client.subscribe([Topic.NOTIFICATION, Topic.BROADCAST, Topic.HOST])
        me = args.instance_id
        if me is None:
            me = find_self((await client.status()).members, socket.gethostname())
        if me is None:
            print("this VM is not in the group's status; use --instance-id", file=sys.stderr)
            return 2
        print(f"instance {me}: standby until the pair is known", flush=True)
        await Application(client, Pair(me, hold_s=2 * args.period), args).run()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="active/standby pair over vmha messaging")
    parser.add_argument("--instance-id", help="this VM's instance id (default: found by hostname)")
    parser.add_argument("--period", type=float, default=2.0, help="seconds between rounds")
    parser.add_argument("--on-active", metavar="COMMAND", help="run when becoming active")
    parser.add_argument("--on-standby", metavar="COMMAND", help="run when stepping down")
    parser.add_argument("--socket", help="the vmha-guest socket")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        raise SystemExit(asyncio.run(main(parse_args())))
    except VmhaError as error:
        print(f"active_standby: {error.message}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(0) from None
