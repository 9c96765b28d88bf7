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
    BeforeValidator,
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
DEFAULT_SOCKET_PATH = "/run/vmha/guest.sock"
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

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


def _octal_mode(value: object) -> object:
    """`mode = 0o660` (a TOML integer) or `mode = "0660"` (how people write modes)."""
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError('must be an octal file mode such as "0660"') from None
    return value


def _group_text(value: object) -> object:
    """`group = 1000` and `group = "1000"` mean the same gid."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    return value


class ServerGroupConfig(_Section):
    enabled: bool = True
    # After a broadcast, how long to wait for the host's nack before reporting "sent"
    # (the protocol has no acknowledgement). Broadcasts go out one window at a time.
    nack_window_ms: Annotated[int, Field(ge=0, le=10_000)] = 300
    # How long a status query may take when the application does not say.
    status_timeout_ms: Annotated[int, Field(gt=0, le=600_000)] = 5000
    # Members kept from one status response; the rest are dropped and the answer is
    # flagged as truncated (a VMGroup has at most 1000 members).
    max_members: Annotated[int, Field(ge=1, le=100_000)] = 1024


class LocalApiConfig(_Section):
    """The unix socket that applications in the guest use (see `local_api.py`)."""

    enabled: bool = True
    socket: str = DEFAULT_SOCKET_PATH
    mode: Annotated[int, BeforeValidator(_octal_mode), Field(ge=0, le=0o777)] = 0o660
    # Group owning the socket (a name or a number); default: the daemon's own group.
    group: Annotated[str, BeforeValidator(_group_text)] | None = None
    max_clients: Annotated[int, Field(ge=1, le=4096)] = 64
    # Events queued for one application that does not read; beyond, the oldest are
    # dropped (and counted), so a slow application never holds the daemon up.
    max_queued_events: Annotated[int, Field(ge=1, le=100_000)] = 256

    @field_validator("socket")
    @classmethod
    def _socket_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must be an absolute path")
        if len(path.encode()) > MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"is longer than {MAX_SOCKET_PATH_BYTES} bytes (a unix socket limit)")
        return path

    @field_validator("group")
    @classmethod
    def _group_named(cls, group: str | None) -> str | None:
        if group is not None and not group.strip():
            raise ValueError("must name a group")
        return group


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
    server_group: ServerGroupConfig = Field(default_factory=ServerGroupConfig)
    local_api: LocalApiConfig = Field(default_factory=LocalApiConfig)
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
