"""Child processes of the testbed (etcd, kube-apiserver, QEMU, node agents, the operator)
that never outlive it.

Each child runs in its own session, so a Ctrl-C at the terminal reaches only the test runner
or the demo, which then stops its children in order. If the parent dies without doing so —
even by SIGKILL — the kernel kills the child (PR_SET_PDEATHSIG). That signal fires when the
*thread* that forked the child ends, so every child is forked from one spawner thread that
lives as long as the process, whichever thread or executor asks for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO

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
