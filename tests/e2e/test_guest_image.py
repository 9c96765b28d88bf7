"""The QEMU test guest itself: image cache, boot, test-control port, virtio-serial, lifecycle."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmha_testbed.guestimage import (
    SOURCE_DISTRIBUTIONS,
    GuestImage,
    GuestInputs,
    build_guest_image,
    source_root,
)
from vmha_testbed.polling import eventually
from vmha_testbed.qemu import BootGuests

pytestmark = pytest.mark.timeout(900)

# Starts a guest and then waits to be interrupted or killed (argv: image dir, work dir).
GUEST_OWNER = """
import sys, time
from pathlib import Path
from vmha_testbed.guestimage import GuestImage
from vmha_testbed.qemu import GuestVM
with GuestVM(GuestImage.load(Path(sys.argv[1])), "owned", workdir=Path(sys.argv[2])) as vm:
    print(vm.pid, flush=True)
    time.sleep(600)
"""


def test_second_build_reuses_the_cached_image(guest_image: GuestImage) -> None:
    manifest = guest_image.directory / "image.json"
    built = manifest.stat().st_mtime_ns
    assert build_guest_image() == guest_image
    assert manifest.stat().st_mtime_ns == built
    assert guest_image.kernel.stat().st_size > 1_000_000
    assert guest_image.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip


def test_cache_key_changes_with_the_guest_sources_only(tmp_path: Path) -> None:
    repository = source_root()
    key = GuestInputs.collect(repository, None).key
    copy = tmp_path / "repo"
    for distribution in SOURCE_DISTRIBUTIONS:
        shutil.copytree(
            repository / distribution,
            copy / distribution,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
        )
    assert GuestInputs.collect(copy, None).key == key  # the path is not an input
    module = copy / "guest" / "src" / "vmha_guest" / "__init__.py"
    module.write_text(module.read_text() + "\n# changed\n")
    assert GuestInputs.collect(copy, None).key != key


def test_concurrent_builds_build_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmha_testbed.guestimage")
    for name, age_days in (("stale-image", 10), ("recent-image", 1)):
        marker = tmp_path / name / "last-used"
        marker.parent.mkdir()
        marker.touch()
        then = time.time() - age_days * 86400
        os.utime(marker, (then, then))
    images: list[GuestImage] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            images.append(build_guest_image(cache_dir=tmp_path))
        except BaseException as error:
            errors.append(error)

    builders = [threading.Thread(target=build) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert errors == []
    assert len(images) == 2 and images[0] == images[1]
    assert len([r for r in caplog.records if "built in" in r.getMessage()]) == 1
    # Published by rename, no staging left behind, images unused for days pruned.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [images[0].key, "recent-image"]
    )
    assert list(tmp_path.glob(".build-*")) == []


def test_guest_boots_with_its_config_and_runs_commands(boot_guests: BootGuests) -> None:
    config = 'port = "cgcs.messaging"\n\n[heartbeat]\nname = "alpha"\n'
    (vm,) = boot_guests([config], names=["alpha"], port_name="cgcs.messaging")
    assert vm.check("hostname") == "alpha\n"
    assert vm.check("cat /etc/vmha/guest.toml") == config
    assert vm.check("ls /dev/virtio-ports").split() == ["cgcs.messaging", "vmha.testctl"]
    assert vm.run("echo out; echo err >&2; exit 3") == (3, "out\nerr\n")
    lookalike = "@@VMHA-TESTCTL END 1 0"
    assert vm.check(f"echo '{lookalike}'") == lookalike + "\n"
    assert vm.check("for i in 1 2 3; do\n  echo $i\ndone") == "1\n2\n3\n"
    assert vm.check("seq 1 20000") == "".join(f"{i}\n" for i in range(1, 20001))
    assert vm.run("sleep 60", timeout=2)[0] == 137  # killed by the guest-side timeout


def test_guest_python_has_vmha_guest_precompiled(boot_guests: BootGuests) -> None:
    (vm,) = boot_guests([None])
    imports = "import vmha_guest, vmha_protocol, pydantic, serial, serial_asyncio, asyncio"
    verbose = vm.check(f"python3 -v -c '{imports}' 2>&1", timeout=180)
    loaded = [line for line in verbose.splitlines() if line.startswith("# code object from")]
    assert loaded != []
    assert [line for line in loaded if ".pyc" not in line] == []  # nothing compiled at boot
    vm.check("/etc/init.d/vmha-guest stop", timeout=60)
    assert vm.run("/etc/init.d/vmha-guest status") == (3, "vmha-guest is not running\n")
    assert "vmha-guest started" in vm.check("cat /var/log/vmha-guest.log")


def test_messaging_port_carries_bytes_both_ways(boot_guests: BootGuests) -> None:
    (vm,) = boot_guests([None])
    vm.check("/etc/init.d/vmha-guest stop", timeout=60)  # the port has a single opener
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.connect(str(vm.channel_socket))
        vm.check("echo hello-from-guest > /dev/virtio-ports/vmha.messaging", timeout=60)
        assert b"hello-from-guest\n" in read_until(host, b"hello-from-guest\n", timeout=60)
        host.sendall(b"hello-from-host\n")
        received = vm.check("head -n 1 /dev/virtio-ports/vmha.messaging", timeout=60)
        assert received == "hello-from-host\n"


def test_two_guests_pause_resume_and_kill(boot_guests: BootGuests) -> None:
    first, second = boot_guests([None, None], names=["vm-a", "vm-b"])
    assert first.pid is not None
    first.pause()
    assert process_state(first.pid) == "T"
    with pytest.raises(TimeoutError):
        first.run("echo frozen", timeout=1, grace=3)
    assert second.check("echo alive") == "alive\n"
    first.resume()
    assert first.check("echo thawed") == "thawed\n"  # the late answer to "frozen" is skipped
    first.kill()
    assert first.returncode == -signal.SIGKILL
    assert second.check("echo still-alive") == "still-alive\n"


def test_qemu_dies_with_the_process_that_started_it(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    owner, qemu_pid = start_guest_owner(guest_image, tmp_path)
    owner.kill()  # SIGKILL: no cleanup code runs in the owner
    owner.wait(timeout=30)
    eventually(lambda: process_state(qemu_pid) in ("", "Z"), "QEMU gone", timeout=30)


def test_ctrl_c_stops_qemu(guest_image: GuestImage, tmp_path: Path) -> None:
    owner, qemu_pid = start_guest_owner(guest_image, tmp_path)
    # What a terminal does on Ctrl-C: SIGINT to the foreground process group.
    os.killpg(owner.pid, signal.SIGINT)
    assert owner.wait(timeout=60) != 0
    eventually(lambda: process_state(qemu_pid) in ("", "Z"), "QEMU gone", timeout=30)


def start_guest_owner(image: GuestImage, workdir: Path) -> tuple[subprocess.Popen[str], int]:
    owner = subprocess.Popen(
        [sys.executable, "-c", GUEST_OWNER, str(image.directory), str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert owner.stdout is not None
    qemu_pid = int(owner.stdout.readline())
    assert process_state(qemu_pid) not in ("", "Z")
    return owner, qemu_pid


def read_until(sock: socket.socket, expected: bytes, timeout: float) -> bytes:
    received = b""
    deadline = time.monotonic() + timeout
    while expected not in received:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("" once the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rpartition(")")[2].split()[0]
