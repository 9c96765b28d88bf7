"""Application group addresses of the base layer (PROTOCOL.md §3).

Guests written for the original use the `cgcs.*` names; vmha also accepts its own
`vmha.*` names and always answers on the name the guest used.
"""

from __future__ import annotations

import enum
from typing import Final


class AppGroup(enum.Enum):
    HEARTBEAT = "heartbeat"
    SERVER_GROUP = "server_group"


ORIGINAL_ADDRESSES: Final[dict[AppGroup, str]] = {
    AppGroup.HEARTBEAT: "cgcs.heartbeat",
    AppGroup.SERVER_GROUP: "cgcs.server_grp",
}
VMHA_ADDRESSES: Final[dict[AppGroup, str]] = {
    AppGroup.HEARTBEAT: "vmha.heartbeat",
    AppGroup.SERVER_GROUP: "vmha.server_group",
}
_BY_ADDRESS: Final[dict[str, AppGroup]] = {
    address: group
    for table in (ORIGINAL_ADDRESSES, VMHA_ADDRESSES)
    for group, address in table.items()
}
KNOWN_ADDRESSES: Final = frozenset(_BY_ADDRESS)


def group_of(address: str) -> AppGroup | None:
    """The application group an address names, or None when it is not one of ours."""
    return _BY_ADDRESS.get(address)


def default_address(group: AppGroup, *, original: bool = False) -> str:
    return (ORIGINAL_ADDRESSES if original else VMHA_ADDRESSES)[group]
