"""The daemon's configuration: a TOML file where every key has a default.

Command-line flags override the file (see `cli.py`). Validation uses the protocol's own
field types, so a configuration that loads is one the host will accept in `init`.
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vmha_protocol import limits
from vmha_protocol.heartbeat import CorrectiveAction, InstanceName, NoticeSecs
from vmha_protocol.types import truncate_utf8

DEFAULT_CONFIG_PATH = Path("/etc/vmha/guest.toml")

LogLevel = Literal["debug", "info", "warning", "error"]
# Positive durations in milliseconds, at most a day (the protocol's longest interval).
Millis = Annotated[int, Field(gt=0, le=limits.HEARTBEAT_MAX_INTERVAL_MS)]
CHECK_TYPES = ("command", "http", "tcp", "file")


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and why."""


class _Section(BaseModel):
    # strict: "1000" where 1000 is due is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _default_name() -> str:
    return truncate_utf8(socket.gethostname(), limits.HEARTBEAT_MAX_NAME_BYTES) or "vmha-guest"


class HeartbeatConfig(_Section):
    enabled: bool = True
    name: Annotated[InstanceName, Field(min_length=1)] = Field(default_factory=_default_name)
    interval_ms: Millis = 1000
    corrective_action: CorrectiveAction = "log"
    vote_secs: NoticeSecs = 10
    shutdown_notice_secs: NoticeSecs = 10
    suspend_notice_secs: NoticeSecs = 10
    resume_notice_secs: NoticeSecs = 10
    restart_secs: NoticeSecs = 120


class _Check(_Section):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    interval_ms: Millis = 1000
    timeout_ms: Millis = 1000


class CommandCheck(_Check):
    """Passes when the command exits with status 0."""

    type: Literal["command"]
    command: Annotated[list[str], Field(min_length=1)]


class HttpCheck(_Check):
    """Passes on a status in 200..399, or exactly `expect_status` when given."""

    type: Literal["http"]
    url: str
    expect_status: Annotated[int, Field(ge=100, le=599)] | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        _ = parts.port  # raises ValueError for a port that is not a number
        return url


class TcpCheck(_Check):
    """Passes when a TCP connection to host:port is accepted."""

    type: Literal["tcp"]
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)]


class FileCheck(_Check):
    """Passes when the file exists and, with `max_age_ms`, was modified within that age."""

    type: Literal["file"]
    path: str
    max_age_ms: Millis | None = None

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        # The daemon runs with / as its working directory; a relative path is a mistake.
        if not path.startswith("/"):
            raise ValueError("must be an absolute path")
        return path


CheckConfig = Annotated[
    CommandCheck | HttpCheck | TcpCheck | FileCheck, Field(discriminator="type")
]


class GuestConfig(_Section):
    # A name under /dev/virtio-ports/ or an absolute path; None: vmha.messaging, then
    # cgcs.messaging.
    port: Annotated[str, Field(min_length=1)] | None = None
    # Which application group names to speak: vmha.* or the original cgcs.*.
    addresses: Literal["vmha", "cgcs"] = "vmha"
    log_level: LogLevel = "info"
    # Longest wait between attempts to open the port while the host is absent.
    reconnect_max_ms: Millis = 1000
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    checks: list[CheckConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_check_names(self) -> GuestConfig:
        seen: set[str] = set()
        for check in self.checks:
            if check.name in seen:
                raise ValueError(f"two checks are named {check.name!r}")
            seen.add(check.name)
        return self


def load_config(path: Path, *, must_exist: bool) -> GuestConfig:
    """Read and validate a configuration file.

    A missing file at the default path means "all defaults"; a path the user named
    (`must_exist`) has to be there.
    """
    try:
        with path.open("rb") as stream:
            raw = tomllib.load(stream)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"{path}: no such file") from None
        return GuestConfig()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], *, source: str = "configuration") -> GuestConfig:
    try:
        return GuestConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _describe(exc: ValidationError, source: str) -> str:
    problems = [
        f"{_where(error['loc'])}: {_what(error['type'], error['msg'])}"
        for error in exc.errors(include_url=False, include_input=False)
    ]
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)


def _where(loc: Sequence[int | str]) -> str:
    """('checks', 1, 'http', 'url') -> 'checks[1].url' (pydantic adds the union's tag)."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in CHECK_TYPES and i >= 2 and loc[i - 2] == "checks":
            continue
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _what(kind: str, message: str) -> str:
    if kind == "extra_forbidden":
        return "unknown key"
    return message.removeprefix("Value error, ")
