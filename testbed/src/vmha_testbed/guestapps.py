"""Applications in a QEMU test guest, driven through its test-control port
(`GuestVM.run`): the guest daemon's commands for scripts (`vmha-guest broadcast|status`
with `--json`), `vmha-guest watch --json` running in the background with its output in a
file, and two small programs on `vmha_guest.client` shipped into the guest
(`GUEST_PROGRAMS`, pass them as `files=` when booting): a voter that rejects revocable
actions with a reason, and a flooder that sends broadcasts as fast as the daemon takes them.

Under TCG the CLI takes 4-10 s to start (Python's imports on an emulated CPU), hence the
generous timeouts.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmha_testbed.polling import eventually
from vmha_testbed.qemu import GuestVM

CLI_TIMEOUT = 120.0
PROGRAM_DIR = "/usr/local/lib/vmha-test"
VOTER = f"{PROGRAM_DIR}/voter.py"
FLOODER = f"{PROGRAM_DIR}/flood.py"

_VOTER_SOURCE = '''\
"""Rejects every revocable action with argv[1] as the reason; logs each vote (JSON lines)
to argv[2]; prints `voting` once subscribed."""
import asyncio, json, sys
from vmha_guest.client import GuestClient, reject

async def main(reason, log_path):
    async with GuestClient(name="voter") as client:
        def vote(proposal):
            with open(log_path, "a") as log:
                log.write(json.dumps({"event_type": proposal.event_type,
                                      "timeout_ms": proposal.timeout_ms}) + "\\n")
            return reject(reason)
        await client.handle_votes(vote)
        print("voting", flush=True)
        while True:
            await client.next_event()  # until the daemon closes the connection

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''

_FLOODER_SOURCE = '''\
"""Sends argv[1] broadcasts one after the other, as fast as the daemon takes them; prints
{"sent", "rate_limited", "errors"}; exits 5 (like `vmha-guest broadcast`) if any was
refused for the rate limit."""
import asyncio, json, sys
from vmha_guest.client import GuestClient, RateLimited, VmhaError

async def main(count):
    sent, limited, errors = 0, 0, {}
    async with GuestClient(name="flood", timeout=30) as client:
        for i in range(count):
            try:
                await client.broadcast(f"flood {i}")
                sent += 1
            except RateLimited:
                limited += 1
            except VmhaError as error:
                errors[error.code] = errors.get(error.code, 0) + 1
    print(json.dumps({"sent": sent, "rate_limited": limited, "errors": errors}))
    return 5 if limited else 0

sys.exit(asyncio.run(main(int(sys.argv[1]))))
'''

GUEST_PROGRAMS: dict[str, str | bytes] = {VOTER: _VOTER_SOURCE, FLOODER: _FLOODER_SOURCE}


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among `text`'s lines (others, e.g. a half-written last line or a
    message on stderr, are skipped)."""
    objects = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                objects.append(obj)
    return objects


@dataclass(frozen=True)
class CliResult:
    """A `vmha-guest` command's exit status, its JSON output, and its other lines."""

    returncode: int
    objects: list[dict[str, Any]]
    output: str

    @property
    def error(self) -> dict[str, Any]:
        """The `error` object of a failed command's JSON output ({} if none)."""
        return next((o["error"] for o in self.objects if "error" in o), {})


def run_cli(vm: GuestVM, *args: str, timeout: float = CLI_TIMEOUT) -> CliResult:
    """`vmha-guest ARGS --json` in the guest (stdout and stderr both read)."""
    returncode, output = vm.run(shlex.join(["vmha-guest", *args, "--json"]), timeout)
    return CliResult(returncode, json_lines(output), output)


class GuestWatch:
    """`vmha-guest watch --json` running in the background in a guest; its events read
    from its output file. Start it, `wait_subscribed`, then act and `wait_for` events."""

    def __init__(
        self,
        vm: GuestVM,
        *,
        topics: Sequence[str] = ("notification", "broadcast", "host"),
        name: str = "watch",
    ) -> None:
        self.vm = vm
        self.topics = tuple(topics) if "host" in topics else (*topics, "host")
        self.path = f"/tmp/{name}.jsonl"
        self.pid: int | None = None

    def start(self, duration_s: float = 3600.0) -> GuestWatch:
        command = shlex.join([
            "vmha-guest", "watch", "--json", f"--topics={','.join(self.topics)}",
            f"--duration={duration_s:g}",
        ])  # fmt: skip
        out = self.vm.check(f"{command} > {self.path} 2> {self.path}.err & echo $!")
        self.pid = int(out.strip())
        return self

    def wait_subscribed(self, timeout: float = CLI_TIMEOUT) -> None:
        """Until the daemon took the subscription (it then sends a `host` event)."""
        eventually(
            lambda: any(e.get("event") == "host" for e in self.events()),
            f"{self.vm.name}: vmha-guest watch subscribed",
            timeout,
            poll=0.5,
        )

    def events(self) -> list[dict[str, Any]]:
        return json_lines(self.vm.check(f"cat {self.path}"))

    def wait_for(
        self,
        match: Callable[[dict[str, Any]], bool],
        what: str,
        *,
        after: int = 0,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """The first event from index `after` on that `match`es, once it is there."""
        return eventually(
            lambda: next((e for e in self.events()[after:] if match(e)), None),
            f"{self.vm.name}: {what}",
            timeout,
            poll=0.5,
        )

    def broadcasts(self, source: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()[after:]
            if e.get("event") == "broadcast" and source in (None, e.get("source_instance"))
        ]

    def notifications(self, member: str, after: int = 0) -> list[dict[str, Any]]:
        return [
            e["member"]
            for e in self.events()[after:]
            if e.get("event") == "notification" and e["member"].get("display_name") == member
        ]

    def stop(self) -> None:
        if self.pid is not None and self.vm.is_running:
            self.vm.run(f"kill {self.pid}")
        self.pid = None


class GuestVoter:
    """The voter program (`GUEST_PROGRAMS`) running in the background in a guest."""

    def __init__(self, vm: GuestVM, reason: str) -> None:
        self.vm = vm
        self.reason = reason
        self.log = "/tmp/votes.jsonl"
        self.pid: int | None = None

    def start(self, timeout: float = CLI_TIMEOUT) -> GuestVoter:
        command = shlex.join(["python3", VOTER, self.reason, self.log])
        out = self.vm.check(f"{command} > /tmp/voter.out 2>&1 & echo $!")
        self.pid = int(out.strip())
        eventually(
            lambda: "voting" in self.vm.check("cat /tmp/voter.out"),
            f"{self.vm.name}: the voter subscribed",
            timeout,
            poll=0.5,
        )
        return self

    def votes(self) -> list[dict[str, Any]]:
        return json_lines(self.vm.check(f"cat {self.log} 2>/dev/null || true"))

    def stop(self) -> None:
        if self.pid is not None and self.vm.is_running:
            self.vm.run(f"kill {self.pid}")
        self.pid = None


def flood(vm: GuestVM, count: int, timeout: float = CLI_TIMEOUT) -> tuple[int, dict[str, Any]]:
    """Run the flooder in the guest: its exit status and its summary."""
    returncode, output = vm.run(shlex.join(["python3", FLOODER, str(count)]), timeout)
    summaries = json_lines(output)
    if not summaries:
        raise AssertionError(f"{vm.name}: the flooder printed no summary: {output}")
    return returncode, summaries[-1]
