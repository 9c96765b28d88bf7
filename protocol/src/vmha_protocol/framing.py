"""Line-delimited JSON framing (PROTOCOL.md §2).

The virtio-serial port is a byte stream: a read may carry fragments of a message or
several messages. `FrameDecoder` reassembles frames and never raises on bad input;
every kind of bad input is counted in `DecoderStats` instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmha_protocol.limits import MAX_FRAME_BYTES

FRAME_DELIMITER = b"\n"


@dataclass
class DecoderStats:
    bytes: int = 0
    frames: int = 0
    empty_lines: int = 0
    garbage: int = 0
    oversize: int = 0


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's json module would accept them.
    raise ValueError(f"non-standard JSON constant {name}")


class FrameDecoder:
    """Reassembles JSON objects from a byte stream, one per line."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.stats = DecoderStats()
        self._pending = bytearray()
        # True while skipping the rest of an oversize frame up to the next newline.
        self._discarding = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Consume bytes; return every complete, well-formed JSON object they finish."""
        return [obj for line in self.lines(data) if (obj := self.parse(line)) is not None]

    def lines(self, data: bytes) -> list[bytes]:
        """Consume bytes; return every complete frame they finish, unparsed: within the
        size limit, without its delimiters and surrounding white space, not empty. Each
        goes to `parse` (or is counted with `count_frame` by a caller that parsed it)."""
        self.stats.bytes += len(data)
        lines: list[bytes] = []
        start = 0
        while (end := data.find(FRAME_DELIMITER, start)) >= 0:
            line = self._complete_line(data[start:end])
            if line is not None:
                lines.append(line)
            start = end + 1
        self._keep_partial(data[start:])
        return lines

    def parse(self, line: bytes) -> dict[str, Any] | None:
        """A frame from `lines` as a JSON object; None (counted as garbage) if it is not one."""
        parsed = _parse_object(line)
        if parsed is None:
            self.stats.garbage += 1
            return None
        self.count_frame()
        return parsed

    def count_frame(self) -> None:
        self.stats.frames += 1

    def reset(self) -> None:
        """Forget a partial frame, e.g. when the peer reconnects."""
        self._pending.clear()
        self._discarding = False

    def _keep_partial(self, chunk: bytes) -> None:
        if self._discarding or not chunk:
            return
        self._pending += chunk
        if len(self._pending) > self.max_frame_bytes:
            self._pending.clear()
            self._discarding = True
            self.stats.oversize += 1

    def _complete_line(self, tail: bytes) -> bytes | None:
        if self._discarding:
            self._discarding = False  # the oversize frame ends here; resynchronised
            return None
        line = bytes(self._pending) + tail if self._pending else tail
        self._pending.clear()
        if len(line) > self.max_frame_bytes:
            self.stats.oversize += 1
            return None
        line = line.strip()
        if not line:
            self.stats.empty_lines += 1
            return None
        return line


# Built once: json.loads with arguments would build a new decoder for every frame.
_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def _parse_object(line: bytes) -> dict[str, Any] | None:
    try:
        value = _JSON.decode(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """One frame: a newline before and after the compact JSON object.

    json.dumps escapes control characters, so the object never contains a raw newline.
    """
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return FRAME_DELIMITER + body.encode("utf-8") + FRAME_DELIMITER
