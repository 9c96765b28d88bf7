"""Typed errors for invalid input; a caller turns them into a `nack` where it can."""

from __future__ import annotations

from dataclasses import dataclass

from vmha_protocol.addresses import AppGroup


@dataclass(eq=False)  # exceptions compare by identity; pytest sets attributes
class ProtocolError(Exception):
    """A message that cannot be processed.

    `group` and `msg_type` are set as far as the message could be understood, so the
    receiver knows whether (and on which application layer) a `nack` can be sent back.
    `address` is the group address the sender used, to answer on the same name.
    """

    reason: str
    group: AppGroup | None = None
    address: str | None = None
    msg_type: str | None = None
    invocation_id: int | None = None

    def __str__(self) -> str:
        where = f"{self.address or '?'}/{self.msg_type or '?'}"
        return f"{where}: {self.reason}"

    @property
    def nackable(self) -> bool:
        """True when the application layer is known, so a nack can be addressed."""
        return self.group is not None and self.address is not None
