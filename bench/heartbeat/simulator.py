"""The guest side of the heartbeat benchmark: N simulated guests in one process.

Each guest listens on its own unix socket, as QEMU does. The driver talks to this process
over stdin/stdout, one JSON object per line:
  → {"stall": ["g7", ...]}   ← {"stalled": {"g7": <unix time>, ...}}
  → {"resume": ["g7", ...]}  ← {"resumed": [...]}
  → {"quit": true}
It prints {"ready": true} once every socket is listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from vmha_testbed.simguest import Behaviour, SimulatedGuest


async def serve(directory: Path, count: int, interval_ms: int) -> None:
    guests = {
        f"g{i}": SimulatedGuest(
            directory / f"g{i}.sock", name=f"g{i}", interval_ms=interval_ms, lean=True
        )
        for i in range(count)
    }
    for guest in guests.values():
        await guest.start()
    reply({"ready": True})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        if "stall" in command:
            stalled = {}
            for name in command["stall"]:
                guests[name].behaviour = Behaviour.SILENT
                stalled[name] = time.time()
            reply({"stalled": stalled})
        elif "resume" in command:
            for name in command["resume"]:
                guests[name].behaviour = Behaviour.HEALTHY
            reply({"resumed": command["resume"]})
        elif command.get("quit"):
            break
    for guest in guests.values():
        await guest.close()


def reply(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval-ms", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.dir, args.count, args.interval_ms))


if __name__ == "__main__":
    main()
