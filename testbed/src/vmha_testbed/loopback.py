"""Loopback networking of the testbed's servers: free ports to give them, and the probes that
say whether one answers yet (plain HTTP GET and TCP connect, with short timeouts)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import urllib.error
import urllib.request

PROBE_TIMEOUT = 5.0


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports free right now (another process may still take one before
    the server binds it)."""
    with contextlib.ExitStack() as held:  # held together, so that the ports differ
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    [port] = free_ports(1)
    return port


def http_get(
    url: str, *, context: ssl.SSLContext | None = None, timeout: float = PROBE_TIMEOUT
) -> tuple[int, str]:
    """GET `url`: (status, body), also for an error status; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode(errors="replace")


class HttpProbe:
    """Called: whether GET `url` answers 200 now. `last` keeps what it answered otherwise,
    for the message when it never does."""

    def __init__(
        self, url: str, *, context: ssl.SSLContext | None = None, timeout: float = PROBE_TIMEOUT
    ) -> None:
        self.url = url
        self.context = context
        self.timeout = timeout
        self.last = "no answer yet"

    def __call__(self) -> bool:
        try:
            status, body = http_get(self.url, context=self.context, timeout=self.timeout)
        except OSError as error:  # not listening yet, or a TLS handshake refused
            self.last = str(error)
            return False
        self.last = f"HTTP {status}: {body[:2000]}"
        return status == 200


def http_ok(url: str, *, context: ssl.SSLContext | None = None) -> bool:
    return HttpProbe(url, context=context)()


def accepts(port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout):
        return True
    return False
