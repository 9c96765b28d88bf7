"""Child processes of the testbed (etcd, kube-apiserver, QEMU, node agents, the operator)
that never outlive it.

Each child runs in its own session, so a Ctrl-C at the terminal reaches only the test runner
or the demo, which then stops its children in order. If the parent dies without doing so —
even by SIGKILL — the kernel kills the child (PR_SET_PDEATHSIG). That signal fires when the
*thread* that forked the child ends, so every child is forked from one spawner thread that
lives as long as the process, whichever thread or executor asks for it.

`Child` is one such child with its output in a log file: the runners of etcd,
kube-apiserver, Prometheus, the node agent and the operator are built on it, and wait for
their child to be ready with `Child.wait_until`. Each runner is a `Runner`: `start()` and
`stop()`, or a `with` block.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Self

_PR_SET_PDEATHSIG = 1
# Loaded up front: the child of fork() must not dlopen (another thread may hold its lock).
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_LIBC.prctl.restype = ctypes.c_int


def spawn(
    argv: Sequence[str],
    *,
    output: IO[bytes] | int | None = None,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | int | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr to `output`; it dies with this process."""
    return _spawner().submit(_fork, list(argv), output, env, stdin).result()


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after `timeout`; no-op once it exited."""
    if process.poll() is not None:
        return
    _signal_group(process, signal.SIGCONT)  # a stopped process does not act on SIGTERM
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child leads its own session, so its group id is its pid; it is not reaped yet
    # (we are its only waiter), so the id cannot belong to anyone else.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@functools.cache
def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmha-spawner")


def _fork(
    argv: list[str],
    output: IO[bytes] | int | None,
    env: Mapping[str, str] | None,
    stdin: IO[bytes] | int | None,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        env=dict(env) if env is not None else None,
        start_new_session=True,
        # Only prctl can set a parent-death signal; the function makes two plain syscalls.
        preexec_fn=functools.partial(_die_with_parent, os.getpid()),  # noqa: PLW1509
    )


def _die_with_parent(parent_pid: int) -> None:
    """In the child before exec: get SIGKILL when the parent dies, even by SIGKILL."""
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class ChildError(RuntimeError):
    """A child exited, or a condition did not come true in time, while waiting for it. The
    message ends with the last lines of the child's log; `reason` is the message without."""

    def __init__(self, reason: str, log_tail: str) -> None:
        super().__init__(f"{reason}; the end of its log:\n{log_tail}")
        self.reason = reason


class Child:
    """A child process (see `spawn`) named `name` whose output is appended to `log_path`."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The latest process's id (also after it ended); None before the first start."""
        return self.process.pid if self.process is not None else None

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = spawn(argv, output=log, env=env)

    def wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float, *, poll: float = 0.2
    ) -> None:
        """Call `condition()` until it is true while the child runs. ChildError if the child
        exits first or `timeout` seconds pass (`what` names the condition)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.running:
                status = self.process.returncode if self.process is not None else None
                raise ChildError(f"{self.name} exited with status {status}", self.log_tail())
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name}: {what} not within {timeout:.0f} s", self.log_tail())
            time.sleep(poll)

    def stop(self, timeout: float = 15.0) -> int | None:
        """`stop` the process (a no-op once it ended); its exit status, None if never started."""
        if self.process is None:
            return None
        stop(self.process, timeout)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Runner(abc.ABC):
    """Runs children: `start()` returns it once they are ready, `stop()` ends them; a `with`
    block does both."""

    @abc.abstractmethod
    def start(self) -> Self: ...

    @abc.abstractmethod
    def stop(self) -> object: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
