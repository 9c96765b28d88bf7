"""Logging to stderr, one line per event, with a level.

Under systemd (stderr connected to the journal, per $JOURNAL_STREAM) each line starts
with a syslog priority prefix such as `<4>`, which journald turns into the entry's
level, and carries no timestamp (journald adds its own).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        # A traceback spans several lines; prefix each so journald keeps the level.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    if _is_journal(stream):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd gave us ($JOURNAL_STREAM=dev:ino)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"
