"""Constrained field types shared by the application layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator, Field

from vmha_protocol import limits


def max_bytes(limit: int) -> Callable[[str], str]:
    """Validator: limits in the protocol are in bytes of UTF-8, not characters."""

    def check(value: str) -> str:
        size = len(value.encode("utf-8"))
        if size > limit:
            raise ValueError(f"is {size} bytes, longer than {limit}")
        return value

    return check


def no_control_characters(value: str) -> str:
    """Validator for text that travels verbatim between guests.

    A tab is harmless; other C0 controls would be escaped to six bytes each on the wire
    and could push a legal-sized broadcast past the frame limit.
    """
    if any((ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F for ch in value):
        raise ValueError("contains a control character")
    return value


Counter = Annotated[int, Field(ge=0, le=limits.MAX_COUNTER)]
ShortStr = Annotated[str, AfterValidator(max_bytes(limits.HEARTBEAT_MAX_VALUE_BYTES))]


def truncate_utf8(text: str, limit: int) -> str:
    """Cut text to at most `limit` UTF-8 bytes without splitting a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")
