"""A simulated guest: listens on a unix socket like QEMU's virtio-serial chardev and speaks
the guest side of the heartbeat protocol, without a VM.

For the node agent's unit tests and benchmarks, where booting hundreds of QEMU guests is not
possible. The end-to-end tier uses real guests (`vmha_testbed.qemu`) instead.

Server group messaging: `send_broadcast`, `send_status_query` (or `query_status`, which
waits for the whole answer), and what the host sent is kept in `received`
(`notifications()`, `broadcasts()`, `nacks()`). Revocable actions are voted on with
`vote_result` (None: never answer) and `vote_log_msg`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmha_protocol import (
    FrameDecoder,
    HostMessage,
    ProtocolError,
    decode_from_host,
    encode,
    encode_frame,
)
from vmha_protocol.heartbeat import (
    ActionNotify,
    ActionResponse,
    Challenge,
    ChallengeResponse,
    CorrectiveAction,
    Exit,
    Init,
    InitAck,
    VoteResult,
)
from vmha_protocol.server_group import (
    GuestBroadcast,
    HostBroadcast,
    MemberState,
    Notification,
    ServerGroupNack,
    StatusQuery,
    StatusResponse,
    StatusResponseDone,
)

_invocations = itertools.count(1)


class Behaviour(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    SILENT = "silent"  # a hung guest: reads, never answers


class SimulatedGuest:
    def __init__(
        self,
        socket_path: Path,
        *,
        name: str = "sim",
        interval_ms: int = 1000,
        address: str = "vmha.heartbeat",
        corrective_action: CorrectiveAction = "log",
        register: bool = True,
        lean: bool = False,
        vote_secs: int = 5,
        server_group_address: str = "vmha.server_group",
    ) -> None:
        self.socket_path = socket_path
        self.name = name
        self.interval_ms = interval_ms
        self.address = address
        self.corrective_action: CorrectiveAction = corrective_action
        self.register = register
        # Lean: answer challenges without validating or recording anything, so a benchmark
        # with hundreds of guests measures the agent rather than the simulator.
        self.lean = lean
        self.vote_secs = vote_secs
        self.server_group_address = server_group_address
        # How to vote on a revocable action (None: never answer), and why.
        self.vote_result: VoteResult | None = "accept"
        self.vote_log_msg = ""
        self._seq = 0
        self.behaviour = Behaviour.HEALTHY
        self.log_msg = ""
        self.invocation_id = 0
        self.received: list[HostMessage] = []
        self.received_on: list[str] = []  # the group address each message came on
        self.errors: list[ProtocolError] = []
        self.on_challenge: Callable[[Challenge], None] | None = None
        # Called with every message from the host as it arrives (e.g. to time it).
        self.on_message: Callable[[HostMessage], None] | None = None
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._changed = asyncio.Condition()
        self.connections = 0

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def send(self, message: BaseModel, address: str | None = None) -> None:
        self.send_raw(encode(address or self.address, message))

    def send_raw(self, data: bytes) -> None:
        if self._writer is None:
            raise RuntimeError("no host connected")
        self._writer.write(data)

    def send_init(self) -> None:
        self.invocation_id = next(_invocations)
        self.send(
            Init(
                invocation_id=self.invocation_id,
                name=self.name,
                heartbeat_interval_ms=self.interval_ms,
                vote_secs=self.vote_secs,
                shutdown_notice_secs=5,
                suspend_notice_secs=5,
                resume_notice_secs=5,
                restart_secs=30,
                corrective_action=self.corrective_action,
            )
        )

    def send_exit(self, log_msg: str = "bye") -> None:
        self.send(Exit(invocation_id=self.invocation_id, log_msg=log_msg))

    # -- server group messaging ------------------------------------------------------------

    def send_broadcast(self, data: str) -> None:
        self.send(GuestBroadcast(data=data), self.server_group_address)

    def send_status_query(self) -> int:
        """Ask for every member's state; returns the query's seq."""
        self._seq += 1
        self.send(StatusQuery(seq=self._seq), self.server_group_address)
        return self._seq

    async def query_status(self, timeout: float = 10.0) -> list[MemberState]:
        """The members' states, once `status_response_done` for a new query came."""
        seq = self.send_status_query()
        await self.wait_for(lambda g: g.status_done(seq), timeout)
        return self.status(seq)

    def status_done(self, seq: int) -> bool:
        return any(isinstance(m, StatusResponseDone) and m.seq == seq for m in self.received)

    def status(self, seq: int) -> list[MemberState]:
        return [m.data for m in self.received if isinstance(m, StatusResponse) and m.seq == seq]

    def notifications(self) -> list[MemberState]:
        return [m.data for m in self.received if isinstance(m, Notification)]

    def broadcasts(self) -> list[HostBroadcast]:
        return [m for m in self.received if isinstance(m, HostBroadcast)]

    def nacks(self) -> list[ServerGroupNack]:
        return [m for m in self.received if isinstance(m, ServerGroupNack)]

    def action_notifies(self) -> list[ActionNotify]:
        return [m for m in self.received if isinstance(m, ActionNotify)]

    async def wait_for(
        self, predicate: Callable[[SimulatedGuest], bool], timeout: float = 10.0
    ) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    def count(self, kind: type[BaseModel]) -> int:
        return sum(isinstance(m, kind) for m in self.received)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connected:  # QEMU's chardev serves one client at a time
            writer.close()
            return
        self._writer = writer
        self.connections += 1
        decoder = FrameDecoder()
        if self.register:
            self.send_init()
        try:
            while data := await reader.read(65536):
                for obj in decoder.feed(data):
                    await self._handle(obj)
        except ConnectionError:
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            await self._notify()

    async def _handle(self, obj: dict[str, Any]) -> None:
        if self.lean:
            data = obj.get("data")
            if isinstance(data, dict) and data.get("msg_type") == "challenge":
                self._answer_lean(data)
            return
        try:
            inbound = decode_from_host(obj)
        except ProtocolError as error:
            self.errors.append(error)
            return
        message = inbound.message
        if self.on_message is not None:
            self.on_message(message)
        self.received.append(message)
        self.received_on.append(inbound.address)
        if isinstance(message, Challenge):
            self._answer(message)
        elif isinstance(message, ActionNotify) and message.notification_type == "revocable":
            self._vote(message)
        await self._notify()

    def _vote(self, notify: ActionNotify) -> None:
        if self.vote_result is None:
            return
        self.send(
            ActionResponse(
                invocation_id=notify.invocation_id,
                event_type=notify.event_type,
                notification_type="revocable",
                vote_result=self.vote_result,
                log_msg=self.vote_log_msg,
            )
        )

    def _answer(self, challenge: Challenge) -> None:
        if self.on_challenge is not None:
            self.on_challenge(challenge)
        if self.behaviour is Behaviour.SILENT:
            return
        self.send(
            ChallengeResponse(
                invocation_id=challenge.invocation_id,
                heartbeat_response=challenge.heartbeat_challenge,
                heartbeat_health=self.behaviour.value,
                corrective_action=self.corrective_action,
                log_msg=self.log_msg,
            )
        )

    def _answer_lean(self, data: dict[str, Any]) -> None:
        if self.behaviour is Behaviour.SILENT or self._writer is None:
            return
        # The bytes `encode` writes for the ChallengeResponse, as the guest daemon sends it.
        body = {
            "version": 3, "revision": 1, "sequence": 0,
            "invocation_id": data["invocation_id"], "msg_type": "challenge_response",
            "heartbeat_response": data["heartbeat_challenge"],
            "heartbeat_health": self.behaviour.value, "corrective_action": self.corrective_action,
            "log_msg": self.log_msg,
        }  # fmt: skip
        envelope = {"version": 1, "source_addr": self.address, "dest_addr": self.address}
        self._writer.write(encode_frame(envelope | {"data": body}))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def acked(guest: SimulatedGuest) -> bool:
    return any(
        isinstance(m, InitAck) and m.invocation_id == guest.invocation_id for m in guest.received
    )
