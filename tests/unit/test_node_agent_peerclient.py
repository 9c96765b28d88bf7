"""Copies on their way to another node's agent (peerclient.py), against a real HTTPS server
with mutual TLS on loopback: batching, bounded queues, skipping a failed peer, and that a
sender never waits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from vmha_node_agent.config import MessagingConfig
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerapi import ForwardedBroadcast, SourceRef
from vmha_node_agent.peerclient import PeerSender
from vmha_node_agent.tls import RotatingContexts
from vmha_node_agent.tokens import TokenFile
from vmha_testbed.loopback import free_port
from vmha_testbed.pki import CertificateAuthority

pytestmark = pytest.mark.timeout(60)


class Peer:
    """Another agent's endpoint: records what it receives, can be held up."""

    def __init__(self, contexts: RotatingContexts) -> None:
        self.contexts = contexts
        self.batches: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.client_certs: list[bool] = []
        self.release = asyncio.Event()
        self.release.set()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/broadcast", self._receive)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.contexts.server)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}"

    async def _receive(self, request: web.Request) -> web.Response:
        await self.release.wait()
        transport = request.transport
        self.client_certs.append(bool(transport and transport.get_extra_info("peercert")))
        self.headers.append(dict(request.headers))
        self.batches.append(json.loads(await request.read()))
        return web.json_response({"delivered": 1, "refused": {}})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def write_agent_tls(tmp_path: Path, ca_name: str = "agents") -> MessagingConfig:
    """The agents' CA, server and client certificates as files, as the chart mounts them."""
    ca = CertificateAuthority.create(ca_name)
    ca_file, _ = ca.write(tmp_path, "ca")
    cert, key = ca.issue_server_certificate(["127.0.0.1"]).write(tmp_path, "server")
    client_cert, client_key = ca.issue_client_certificate("agent").write(tmp_path, "client")
    return MessagingConfig.model_validate(
        {
            "tls": {
                "ca_file": ca_file,
                "cert_file": cert,
                "key_file": key,
                "client_cert_file": client_cert,
                "client_key_file": client_key,
            }
        }
    )


@pytest.fixture
def tls(tmp_path: Path) -> RotatingContexts:
    return RotatingContexts(write_agent_tls(tmp_path).tls)


async def test_a_renewed_ca_replaces_the_old_one_for_new_connections(tmp_path: Path) -> None:
    contexts = RotatingContexts(write_agent_tls(tmp_path, "agents-1").tls)
    peer = Peer(contexts)
    await peer.start()
    try:
        old_client = (tmp_path / "client.crt", tmp_path / "client.key")
        stale_cert = (old_client[0].read_bytes(), old_client[1].read_bytes())
        renewed = write_agent_tls(tmp_path, "agents-2")  # the same files, a new CA
        assert contexts.reload_if_changed()
        stale = tmp_path / "stale"
        stale.mkdir()
        (stale / "client.crt").write_bytes(stale_cert[0])
        (stale / "client.key").write_bytes(stale_cert[1])

        async def call(cert: Path, key: Path) -> int:
            assert renewed.tls.ca_file is not None
            context = ssl.create_default_context(cafile=str(renewed.tls.ca_file))
            context.check_hostname = False
            context.load_cert_chain(cert, key)
            async with (
                aiohttp.ClientSession() as http,
                http.post(peer.url + "/v1/broadcast", data=b"{}", ssl=context) as response,
            ):
                return response.status

        assert await call(tmp_path / "client.crt", tmp_path / "client.key") == 200
        with pytest.raises(aiohttp.ClientError):  # signed by the old CA: no longer trusted
            await call(stale / "client.crt", stale / "client.key")
    finally:
        await peer.stop()


@pytest.fixture
async def peer(tls: RotatingContexts) -> AsyncIterator[Peer]:
    p = Peer(tls)
    await p.start()
    yield p
    p.release.set()
    await p.stop()


class Sender:
    def __init__(self, tls: RotatingContexts, tmp: Path, **config: Any) -> None:
        token = tmp / "token"
        token.write_text("the-agent-token\n")
        self.metrics = AgentMetrics()
        self.endpoint: str | None = None
        self.sender = PeerSender(
            MessagingConfig.model_validate({"peer_retry_initial_s": 30.0, **config}),
            self.metrics,
            lambda node: self.endpoint if node == "node-b" else None,
            TokenFile(token),
            lambda: tls.client,
        )
        self._task = asyncio.create_task(self.sender.run())

    def send(self, data: str, targets: int = 1) -> None:
        source = SourceRef(namespace="ns", name="a1", uid="u1")
        message = ForwardedBroadcast(
            source=source, targets=[f"b{i}" for i in range(targets)], data=data
        )
        self.sender.send("node-b", message)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def sender(tls: RotatingContexts, tmp_path: Path) -> AsyncIterator[Sender]:
    s = Sender(tls, tmp_path)
    yield s
    await s.stop()


async def eventually(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_copies_go_in_order_in_batches_with_certificate_and_token(
    sender: Sender, peer: Peer
) -> None:
    sender.endpoint = peer.url
    for i in range(5):
        sender.send(f"m{i}")
    await eventually(lambda: sum(len(b["messages"]) for b in peer.batches) == 5)
    data = [m["data"] for batch in peer.batches for m in batch["messages"]]
    assert data == [f"m{i}" for i in range(5)]
    assert len(peer.batches) < 5  # queued copies leave together
    assert all(peer.client_certs)
    assert peer.headers[0]["Authorization"] == "Bearer the-agent-token"
    assert sender.metric("vmha_peer_requests_total", result="ok") == len(peer.batches)
    assert sender.metric("vmha_peer_queue_length") == 0.0


async def test_a_full_queue_drops_new_copies_and_the_sender_never_waits(
    tls: RotatingContexts, tmp_path: Path, peer: Peer
) -> None:
    sender = Sender(tls, tmp_path, peer_queue_size=2)
    try:
        sender.endpoint = peer.url
        peer.release.clear()  # the other agent is slow
        for i in range(3):
            sender.send(f"m{i}", targets=2)  # returns at once
        assert sender.metric("vmha_messaging_dropped_total", reason="queue_full") == 2.0
        peer.release.set()
        await eventually(lambda: sum(len(b["messages"]) for b in peer.batches) == 2)
    finally:
        await sender.stop()


async def test_a_failed_peer_is_skipped_until_its_agent_moves(sender: Sender, peer: Peer) -> None:
    sender.endpoint = f"https://127.0.0.1:{free_port()}"  # nobody listens
    sender.send("lost", targets=3)
    await eventually(
        lambda: sender.metric("vmha_messaging_dropped_total", reason="peer_unreachable") == 3
    )
    assert sender.metric("vmha_peer_requests_total", result="unreachable") == 1.0
    # Skipped: dropped at once, no request.
    sender.send("also lost")
    assert sender.metric("vmha_messaging_dropped_total", reason="peer_unreachable") == 4.0
    await asyncio.sleep(0.2)
    assert sender.metric("vmha_peer_requests_total", result="unreachable") == 1.0
    # The node's agent is back at a new endpoint (its new Lease): copies flow again.
    sender.endpoint = peer.url
    sender.send("found")
    await eventually(lambda: len(peer.batches) == 1)
    assert peer.batches[0]["messages"][0]["data"] == "found"


async def test_copies_for_a_node_without_a_live_agent_are_dropped(sender: Sender) -> None:
    sender.endpoint = None
    sender.send("nobody", targets=2)
    await eventually(lambda: sender.metric("vmha_messaging_dropped_total", reason="peer_down") == 2)
    assert not sender.sender.peer_up("node-b")
