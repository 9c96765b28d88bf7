"""A local OPNFV Doctor inspector endpoint: records what monitors `PUT /events`.

A real HTTP server on loopback for tests and the demo; it can require a token and can be
told to fail, to exercise the agent's retries.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


class InspectorServer:
    def __init__(self, token: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.events: list[dict[str, Any]] = []
        self.requests = 0
        self.fail_with: int | None = None  # answer every request with this status
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/events", self._put_events)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for_events(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.events) >= count)
        return self.events

    async def _put_events(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.fail_with is not None:
            return web.Response(status=self.fail_with, text="failing on purpose")
        if self.token is not None and request.headers.get("X-Auth-Token") != self.token:
            return web.Response(status=401, text="bad token")
        try:
            body = json.loads(await request.text())
        except ValueError:
            return web.Response(status=400, text="not JSON")
        if not isinstance(body, list) or not all(_is_event(e) for e in body):
            return web.Response(status=400, text="expected a list of events")
        async with self._changed:
            self.events.extend(body)
            self._changed.notify_all()
        return web.Response(status=200)


def _is_event(event: object) -> bool:
    if not isinstance(event, dict):
        return False
    details = event.get("details")
    return (
        all(isinstance(event.get(key), str) for key in ("id", "time", "type"))
        and isinstance(details, dict)
        and all(
            isinstance(details.get(key), str)
            for key in ("hostname", "status", "monitor", "monitor_event_id")
        )
    )
