"""A simulated guest: listens on a unix socket like QEMU's virtio-serial chardev and speaks
the guest side of the heartbeat protocol, without a VM.

For the node agent's unit tests and benchmarks, where booting hundreds of QEMU guests is not
possible. The end-to-end tier uses real guests (`vmha_testbed.qemu`) instead.
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
    Challenge,
    ChallengeResponse,
    CorrectiveAction,
    Exit,
    Init,
    InitAck,
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
        self.behaviour = Behaviour.HEALTHY
        self.log_msg = ""
        self.invocation_id = 0
        self.received: list[HostMessage] = []
        self.errors: list[ProtocolError] = []
        self.on_challenge: Callable[[Challenge], None] | None = None
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
                vote_secs=5,
                shutdown_notice_secs=5,
                suspend_notice_secs=5,
                resume_notice_secs=5,
                restart_secs=30,
                corrective_action=self.corrective_action,
            )
        )

    def send_exit(self, log_msg: str = "bye") -> None:
        self.send(Exit(invocation_id=self.invocation_id, log_msg=log_msg))

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
            message = decode_from_host(obj).message
        except ProtocolError as error:
            self.errors.append(error)
            return
        self.received.append(message)
        if isinstance(message, Challenge):
            self._answer(message)
        await self._notify()

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
        body = {
            "version": 3, "revision": 1, "sequence": 0, "msg_type": "challenge_response",
            "invocation_id": data["invocation_id"],
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
