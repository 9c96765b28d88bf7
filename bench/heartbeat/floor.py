"""The floor under the heartbeat benchmark's CPU figure: what asyncio alone costs.

The same traffic as the agent at N guests x interval — per guest, a timer, one challenge
frame written, one response frame read, over a unix stream socket — with no protocol, state
machine or metrics: an echo partner in another process answers each frame. Measured twice:
reading with a plain `asyncio.Protocol` as the agent does (asyncio then receives into a
fresh 256 KiB object per read), and with an `asyncio.BufferedProtocol` that reads into one
small buffer.

    python -m bench.heartbeat.floor [--count 500] [--interval-ms 100] [--window-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import selectors
import socket
import time

from vmha_protocol import AppGroup, default_address, encode
from vmha_protocol.heartbeat import Challenge, ChallengeResponse

ADDRESS = default_address(AppGroup.HEARTBEAT, original=False)
CHALLENGE = encode(ADDRESS, Challenge(invocation_id=1, heartbeat_challenge=2**31, sequence=1))
RESPONSE = encode(
    ADDRESS,
    ChallengeResponse(
        invocation_id=1,
        heartbeat_response=2**31,
        heartbeat_health="healthy",
        corrective_action="none",
        sequence=1,
    ),
)


def echo(sockets: list[socket.socket]) -> None:
    """The guests' side: answer every read with one response frame, until the peer closes."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            guest: socket.socket = key.fileobj  # type: ignore[assignment]
            if not guest.recv(4096):
                return
            guest.send(RESPONSE)


class _Sink(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


class _BufferedSink(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self._buffer = bytearray(4096)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        bytes(self._buffer[:nbytes])  # what a consumer would copy out


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(count: int, interval_s: float, window_s: float, buffered: bool) -> float:
    """This process's CPU, as a fraction of one core, while challenging `count` echoes."""
    protocol: type[asyncio.BaseProtocol] = _BufferedSink if buffered else _Sink
    loop = asyncio.get_running_loop()
    pairs = [socket.socketpair() for _ in range(count)]
    partner = multiprocessing.Process(target=echo, args=([guest for _, guest in pairs],))
    partner.start()
    transports = []
    running = True
    for host, _ in pairs:
        transport, _ = await loop.create_unix_connection(protocol, sock=host)
        transports.append(transport)

    def challenge(transport: asyncio.WriteTransport, when: float) -> None:
        if not running:
            return
        transport.write(CHALLENGE)
        loop.call_at(when + interval_s, challenge, transport, when + interval_s)

    start = loop.time()
    for index, transport in enumerate(transports):  # spread over the interval, as the agent
        first = start + index * interval_s / count
        loop.call_at(first, challenge, transport, first)
    try:
        await asyncio.sleep(max(2.0, 3 * interval_s))  # warm-up
        cpu_before, wall_before = cpu_seconds(), time.monotonic()
        await asyncio.sleep(window_s)
        return (cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    finally:
        running = False
        for transport in transports:
            transport.abort()
        partner.join(10)
        partner.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--interval-ms", type=int, default=100)
    parser.add_argument("--window-s", type=float, default=20.0)
    args = parser.parse_args()
    pairs_per_s = args.count * 1000 / args.interval_ms
    for buffered in (False, True):
        share = asyncio.run(measure(args.count, args.interval_ms / 1000, args.window_s, buffered))
        print(
            f"asyncio floor ({'BufferedProtocol' if buffered else 'Protocol'}), "
            f"{args.count} guests x {args.interval_ms} ms: "
            f"{100 * share:.1f} % of one core, {1e6 * share / pairs_per_s:.1f} µs per pair"
        )


if __name__ == "__main__":
    main()
