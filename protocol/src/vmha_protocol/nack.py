"""Why the host refused a message: a reason code at the start of a nack's `log_msg`.

PROTOCOL.md leaves a nack's text free. vmha starts it with a code from `NackReason` and a
colon (`"messaging-disabled: server group messaging is off for group web"`), so the guest
daemon can act on the reason (register again, tell an application that messaging is off)
while the text still reads well in a log. A guest built for the original simply logs it.
"""

from __future__ import annotations

import enum

from vmha_protocol.types import truncate_utf8


class NackReason(enum.StrEnum):
    NOT_REGISTERED = "not-registered"  # heartbeat: send init first
    UNKNOWN_INVOCATION = "unknown-invocation"  # heartbeat: a stale registration
    INVALID = "invalid"  # the message broke the protocol's rules
    MESSAGING_DISABLED = "messaging-disabled"  # server group messaging is off for this VM
    RATE_LIMITED = "rate-limited"  # over the VM's budget; dropped
    TOO_LARGE = "too-large"  # over a size limit
    UNAVAILABLE = "unavailable"  # the host cannot serve it right now; try later

    @property
    def asks_to_register(self) -> bool:
        return self in (NackReason.NOT_REGISTERED, NackReason.UNKNOWN_INVOCATION)


def nack_text(reason: NackReason, detail: str, limit: int) -> str:
    """The `log_msg` of a nack, cut to `limit` bytes."""
    return truncate_utf8(f"{reason.value}: {detail}", limit)


def nack_reason(log_msg: str) -> NackReason | None:
    """The reason code a vmha host put at the start of `log_msg`, if any."""
    code, separator, _ = log_msg.partition(":")
    if not separator:
        return None
    try:
        return NackReason(code.strip())
    except ValueError:
        return None
