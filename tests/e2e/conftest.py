"""End-to-end tier: real QEMU guests (TCG unless VMHA_QEMU_KVM=1). Every test here is `e2e`.

Fixtures for any e2e test:
- `guest_image` (session): the cached kernel + initramfs (`vmha_testbed.guestimage`).
- `boot_guests` (function): `boot_guests([config_a, config_b], names=[...])` starts one guest
  per guest-daemon TOML config (None = no config file) at once, waits until all are ready and
  returns their `GuestVM`s; they are stopped when the test ends. `channel_sockets=[...]`
  places each guest's messaging socket (e.g. where a node agent looks for it).

The control plane fixtures (`control_plane`, `namespace`) come from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmha_testbed.guestimage import GuestImage, build_guest_image
from vmha_testbed.qemu import BootGuests, GuestVM, boot_guests

E2E_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest_image()


@pytest.fixture(name="boot_guests")
def boot_guests_fixture(guest_image: GuestImage, tmp_path: Path) -> Iterator[BootGuests]:
    started: list[GuestVM] = []

    def boot(configs: Sequence[str | None], **options: Any) -> list[GuestVM]:
        """`boot_guests` with the image and a directory of its own (see `BootGuests`)."""
        guests = boot_guests(guest_image, tmp_path / f"boot-{len(started)}", configs, **options)
        started.extend(guests)
        return guests

    yield boot
    for guest in started:
        guest.close()
