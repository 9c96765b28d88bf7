"""The active/standby example (guest/examples/active_standby.py): its decision logic as
pure functions (who is active, when a standby takes over, and when it must not), then the
example itself as a process against the daemon and a scripted host."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from vmha_protocol.server_group import (
    GuestBroadcast,
    HostBroadcast,
    MemberState,
    Notification,
    StatusQuery,
    StatusResponse,
    StatusResponseDone,
)
from vmha_testbed.guesthost import WAIT_S, Pty, guest

EXAMPLE = Path(__file__).resolve().parents[2] / "guest" / "examples" / "active_standby.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("vmha_example_active_standby", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ex = _load()
A, B = "uid-a", "uid-b"  # A has the lower instance id
HOLD_S = 4.0


def vm(uid: str, state: str = "active", heartbeat: str = "healthy") -> MemberState:
    return MemberState(instance_id=uid, display_name=uid[4:], state=state, heartbeat=heartbeat)


def pair(me: str, *members: MemberState) -> Any:
    view = ex.Pair(me, hold_s=HOLD_S)
    view.saw_members(members)
    return view


@pytest.mark.parametrize(
    ("state", "heartbeat", "up"),
    [
        ("active", "healthy", True),
        ("active", "unknown", True),  # a VM without heartbeating can still be active
        ("active", "unhealthy", False),
        ("paused", "healthy", False),
        ("stopped", "unknown", False),
        ("error", "healthy", False),
        ("unknown", "healthy", False),
    ],
)
def test_up_means_running_and_not_unhealthy(state: str, heartbeat: str, up: bool) -> None:
    assert ex.is_up(vm(A, state, heartbeat)) is up


def test_the_newest_claim_wins() -> None:
    Claim = ex.Claim
    assert ex.newest(Claim(2, B), Claim(1, A)) == Claim(2, B)
    assert ex.newest(Claim(1, A), Claim(3, B)) == Claim(3, B)
    assert ex.newest(Claim(2, B), Claim(2, A)) == Claim(2, A)  # a tie: the lower id
    assert ex.newest(None, Claim(1, B)) == Claim(1, B)
    assert ex.newest(Claim(1, B), None) == Claim(1, B)


def test_who_is_active() -> None:
    members = {A: vm(A), B: vm(B)}
    assert ex.choose_active(members, None) == A  # nobody holds a term: the lowest up id
    assert ex.choose_active(members, ex.Claim(5, B)) == B  # the holder stays: no preemption
    paused = {A: vm(A), B: vm(B, "paused")}
    assert ex.choose_active(paused, ex.Claim(5, B)) == A
    assert ex.choose_active({A: vm(A, "error"), B: vm(B, heartbeat="unhealthy")}, None) is None
    assert ex.choose_active({A: vm(A)}, ex.Claim(5, "uid-gone")) == A


def test_claims_travel_as_broadcasts() -> None:
    claim = ex.Claim(7, B)
    assert ex.parse_claim(ex.claim_text(claim)) == claim
    for other in (
        "hello",
        "[]",
        '{"app": "something-else", "term": 1, "active": "x"}',
        '{"app": "active-standby", "term": 0, "active": "x"}',
        '{"app": "active-standby", "term": true, "active": "x"}',
        '{"app": "active-standby", "term": 2, "active": ""}',
    ):
        assert ex.parse_claim(other) is None, other


def test_the_lower_id_takes_the_first_term_after_the_hold() -> None:
    a = pair(A, vm(A), vm(B))
    a.lost_track(now=0.0)  # at start: learn first
    assert a.decide(now=1.0) == ex.Decision(False, False, None)
    decision = a.decide(now=HOLD_S + 1)
    assert decision == ex.Decision(True, True, ex.Claim(1, A))
    again = a.decide(now=HOLD_S + 3)
    assert again == ex.Decision(True, False, ex.Claim(1, A))  # re-announced every round

    b = pair(B, vm(A), vm(B))
    b.saw_claim(ex.Claim(1, A))
    assert b.decide(now=100.0) == ex.Decision(False, False, None)


def test_a_tenant_network_failure_changes_nothing() -> None:
    """The peers cannot reach each other over the tenant network, but the platform still
    reports both up and claims still arrive over virtio-serial: no takeover."""
    b = pair(B, vm(A), vm(B))
    b.saw_claim(ex.Claim(1, A))
    for now in range(10, 100, 2):  # rounds pass; nothing from A but its repeated claim
        assert not b.decide(now=float(now)).active
        b.saw_claim(ex.Claim(1, A))
    # Even without A's claims, B never takes over while the platform says A is up.
    for now in range(100, 200, 2):
        assert not b.decide(now=float(now)).active


def test_takeover_when_the_platform_reports_the_active_down() -> None:
    b = pair(B, vm(A), vm(B))
    b.saw_claim(ex.Claim(1, A))
    assert not b.decide(now=10.0).active
    b.saw_member(vm(A, "paused"))  # a notification
    assert b.decide(now=12.0) == ex.Decision(True, True, ex.Claim(2, B))
    b.saw_member(vm(A, "active", heartbeat="unhealthy"))
    assert b.decide(now=14.0).active


@pytest.mark.parametrize("failure", ["stopped", "error", "unhealthy"])
def test_every_reported_failure_of_the_active_means_takeover(failure: str) -> None:
    b = pair(B, vm(A), vm(B))
    b.saw_claim(ex.Claim(3, A))
    if failure == "unhealthy":
        b.saw_member(vm(A, heartbeat="unhealthy"))
    else:
        b.saw_member(vm(A, failure))
    assert b.decide(now=10.0) == ex.Decision(True, True, ex.Claim(4, B))


def test_a_returning_member_steps_down_and_does_not_preempt() -> None:
    """A was active (term 1), was paused, B took over (term 2). A resumes: its loop sees
    the freeze, it steps down, learns B's claim, and stays standby though its id is lower."""
    a = pair(A, vm(A), vm(B))
    a.saw_claim(ex.Claim(1, A))
    assert a.decide(now=10.0).active

    assert ex.frozen((10.0, 1000.0), (10.1, 1300.0), limit_s=4.0)  # wall clock jumped
    a.lost_track(now=10.1)
    assert not a.active
    a.saw_members([vm(A), vm(B)])  # status after the resume: both up
    a.saw_claim(ex.Claim(2, B))  # B's repeated claim
    assert a.decide(now=30.0) == ex.Decision(False, False, None)

    # B goes down later: A takes over with a newer term.
    a.saw_member(vm(B, "stopped"))
    assert a.decide(now=40.0) == ex.Decision(True, True, ex.Claim(3, A))


def test_an_active_that_sees_a_newer_claim_steps_down() -> None:
    a = pair(A, vm(A), vm(B))
    a.saw_claim(ex.Claim(1, A))
    assert a.decide(now=10.0).active
    a.saw_claim(ex.Claim(2, B))  # both elected themselves during a partition of the platform
    assert a.decide(now=12.0) == ex.Decision(False, True, None)


def test_a_standby_without_the_host_never_takes_over() -> None:
    b = pair(B, vm(A, "paused"), vm(B))
    b.connected = False
    assert not b.decide(now=100.0).active
    b.connected = True
    assert b.decide(now=102.0).active


def test_an_active_keeps_its_role_while_the_host_is_away() -> None:
    a = pair(A, vm(A), vm(B))
    assert a.decide(now=10.0).active
    a.connected = False  # it cannot learn otherwise; the platform cannot elect B either
    assert a.decide(now=12.0) == ex.Decision(True, False, ex.Claim(1, A))


def test_a_member_missing_from_status_is_never_active() -> None:
    lost = pair("uid-c", vm(A, "paused"), vm(B, "paused"))
    assert lost.decide(now=100.0) == ex.Decision(False, False, None)


def test_freeze_detection() -> None:
    assert not ex.frozen((0.0, 100.0), (2.0, 102.0), limit_s=4.0)
    assert ex.frozen((0.0, 100.0), (5.0, 105.0), limit_s=4.0)
    assert ex.frozen((0.0, 100.0), (1.0, 160.0), limit_s=4.0)  # monotonic stood still


def test_finding_this_vm_in_the_status() -> None:
    members = [vm(A), MemberState(instance_id=B, display_name="db-2", hostname="db-2.local")]
    assert ex.find_self(members, "db-2.local") == B
    assert ex.find_self(members, "a") == A  # by display name
    assert ex.find_self(members, "elsewhere") is None


# -- the example as a process, against the daemon and a scripted host -----------------------


class AutoHost:
    """Answers every status query with the current members; keeps what is broadcast."""

    def __init__(self, g: Any, members: dict[str, MemberState]) -> None:
        self.g = g
        self.members = members
        self.broadcasts: asyncio.Queue[str] = asyncio.Queue()
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            inbound = await self.g.host.receive(timeout=3600)
            match inbound.message:
                case StatusQuery(seq=seq):
                    for member in self.members.values():
                        self.g.send(StatusResponse(seq=seq, data=member))
                    self.g.send(StatusResponseDone(seq=seq))
                case GuestBroadcast(data=data):
                    self.broadcasts.put_nowait(data)

    async def claim(self) -> Any:
        async with asyncio.timeout(WAIT_S):
            while (claim := ex.parse_claim(await self.broadcasts.get())) is None:
                pass
        return claim

    def stop(self) -> None:
        self._task.cancel()


@pytest.mark.timeout(120)
async def test_the_example_runs_the_pair(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        host = AutoHost(g, {A: vm(A), B: vm(B)})
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            *("--instance-id", A, "--period", "0.3", "--socket", str(g.sock)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None

        async def line() -> str:
            async with asyncio.timeout(WAIT_S * 2):
                return (await process.stdout.readline()).decode().strip()  # type: ignore[union-attr]

        try:
            assert await line() == f"instance {A}: standby until the pair is known"
            assert await line() == "role: active (term 1)"  # after the hold: the lower id
            assert await host.claim() == ex.Claim(1, A)

            g.send(HostBroadcast(source_instance=B, data=ex.claim_text(ex.Claim(5, B))))
            assert await line() == "role: standby (term 5)"  # a newer claim: step down

            host.members[B] = vm(B, "paused")
            g.send(Notification(data=host.members[B]))
            assert await line() == "role: active (term 6)"  # the platform says B is down
            while (claim := await host.claim()) != ex.Claim(6, A):
                assert claim == ex.Claim(1, A)  # a claim sent before it stepped down
        finally:
            host.stop()
            process.terminate()
            async with asyncio.timeout(WAIT_S):
                _, stderr = await process.communicate()
        assert b"Traceback" not in stderr, stderr.decode()
