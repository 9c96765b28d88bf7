"""`make demo` as a newcomer runs it: the whole tour, then Ctrl-C, and nothing left behind.

The demo runs as its own process (`python -m vmha_testbed.demo`, stdout not a terminal, so
it prints plain lines): its own control plane, operator, two agents and three QEMU guests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmha_testbed.toolchain import ensure_toolchain

pytestmark = pytest.mark.timeout(900)

TOUR_TIMEOUT = 600.0


class Output:
    """The demo's output lines, collected by a thread as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self._process.poll() is None, "the demo exited:\n" + self.text
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s:\n{self.text}"
            time.sleep(0.5)

    def join(self) -> None:
        self._thread.join(30)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_demo_tours_the_system_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    ensure_toolchain()  # before the clock starts: the first build takes minutes
    process = subprocess.Popen(
        [sys.executable, "-m", "vmha_testbed.demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    output = Output(process)
    try:
        output.wait_for("Tour done.", TOUR_TIMEOUT)
        output.wait_for("Now try", 30)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output.join()
    text = output.text
    print(text)
    for step in (
        r"Booting 3 QEMU guests .* done",
        r"web-2 +← broadcast from demo-\w+/web-1: hello from web-1",
        r"web-3 +← broadcast from demo-\w+/web-1: hello from web-1",
        r"web-1 +← notification: web-3 state=paused .*host=node-b",
        r"web-2 +← notification: web-3 state=active",
        r"web-2 +Warning HeartbeatFailed: .*3 consecutive challenges unanswered",
        r"Doctor: .* web-2 +down failed",
        r"web-1 +← notification: web-2 state=active heartbeat=unhealthy host=node-a",
        r"web-2 +Normal +HeartbeatRecovered",
        r"Doctor: .* web-2 +up +healthy",
        r"Stopped; nothing left running\.",
    ):
        assert re.search(step, text), step
    # Every QEMU it named is gone, and its temporary files with it.
    [listed] = [line for line in output.lines if "Now try" in line]
    pids = [int(pid) for pid in re.findall(r"web-\d (\d+)", listed)]
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)
    assert list(tmp_path.iterdir()) == []
