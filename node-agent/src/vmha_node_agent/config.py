"""Node agent configuration: a YAML file, every key with a default."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeartbeatPolicy(_Section):
    """Bounds the agent puts on what guests ask for, and when a silence becomes a fault."""

    min_interval_ms: Annotated[int, Field(ge=10)] = 100
    max_interval_ms: Annotated[int, Field(ge=10)] = 60_000
    missed_threshold: Annotated[int, Field(ge=1, le=100)] = 3

    @model_validator(mode="after")
    def _ordered(self) -> HeartbeatPolicy:
        if self.min_interval_ms > self.max_interval_ms:
            raise ValueError("min_interval_ms is greater than max_interval_ms")
        return self

    def clamp_interval_ms(self, requested_ms: int) -> int:
        return max(self.min_interval_ms, min(self.max_interval_ms, requested_ms))


class GuestLimits(_Section):
    """Per-VM limits on untrusted guest input (PROTOCOL.md §2: frames are at most 8 KiB)."""

    frames_per_second: Annotated[float, Field(gt=0)] = 50.0
    frame_burst: Annotated[int, Field(ge=1)] = 100
    bytes_per_second: Annotated[int, Field(ge=8192)] = 256 * 1024
    # Writes queued towards a guest that does not read (paused, hung): beyond this we drop.
    max_write_buffer_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024


class ChannelPolicy(_Section):
    reconnect_initial_s: Annotated[float, Field(gt=0)] = 0.1
    reconnect_max_s: Annotated[float, Field(gt=0)] = 5.0


class DoctorConfig(_Section):
    """OPNFV Doctor inspector; reporting is off when `url` is empty."""

    url: str | None = None
    token: str | None = None
    token_file: Path | None = None
    queue_size: Annotated[int, Field(ge=1)] = 1000
    batch_size: Annotated[int, Field(ge=1)] = 50
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    retry_initial_s: Annotated[float, Field(gt=0)] = 0.5
    retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    event_type: str = "vmha.guest.heartbeat"
    # On shutdown, how long to keep trying to deliver what is still queued.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 5.0

    def auth_token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return self.token


class MetricsConfig(_Section):
    address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9810


class StaticVM(_Section):
    """A VM given by configuration (no Kubernetes): its identity and channel socket."""

    name: str
    namespace: str = "default"
    socket: Path
    uid: str = ""


class AgentConfig(_Section):
    node_name: str = Field(
        default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname()
    )
    heartbeat: HeartbeatPolicy = HeartbeatPolicy()
    guest_limits: GuestLimits = GuestLimits()
    channel: ChannelPolicy = ChannelPolicy()
    doctor: DoctorConfig = DoctorConfig()
    metrics: MetricsConfig = MetricsConfig()
    vms: list[StaticVM] = []


class ConfigError(Exception):
    pass


def load_config(path: Path | None) -> AgentConfig:
    """Read and validate the YAML file; a missing path means all defaults."""
    if path is None:
        return AgentConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_errors(exc)}") from None


def _first_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
