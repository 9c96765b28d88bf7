"""Configuration: the documented example loads; mistakes are reported clearly."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmha_guest.cli import build_parser, config_from_args
from vmha_guest.config import (
    CommandCheck,
    ConfigError,
    FileCheck,
    GuestConfig,
    HttpCheck,
    TcpCheck,
    load_config,
    parse_config,
)

EXAMPLE = """
port = "vmha.messaging"

[heartbeat]
enabled = true
name = "demo-vm-1"
interval_ms = 1000
corrective_action = "log"
vote_secs = 10
shutdown_notice_secs = 10
suspend_notice_secs = 10
resume_notice_secs = 10
restart_secs = 120

[[checks]]
name = "app-alive"
type = "file"
path = "/run/app/alive"
max_age_ms = 10000
interval_ms = 1000
timeout_ms = 500

[[checks]]
name = "ready-flag"
type = "command"
command = ["/bin/test", "-e", "/run/vmha-test/healthy"]

[[checks]]
name = "web"
type = "http"
url = "http://127.0.0.1:8080/healthz"

[[checks]]
name = "db"
type = "tcp"
host = "127.0.0.1"
port = 5432
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guest.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, EXAMPLE), must_exist=True)
    assert config.port == "vmha.messaging"
    assert config.heartbeat.name == "demo-vm-1"
    assert [type(check) for check in config.checks] == [
        FileCheck,
        CommandCheck,
        HttpCheck,
        TcpCheck,
    ]
    file_check, command, http, tcp = config.checks
    assert isinstance(file_check, FileCheck) and file_check.max_age_ms == 10000
    assert file_check.timeout_ms == 500
    assert isinstance(command, CommandCheck) and command.command[0] == "/bin/test"
    assert isinstance(http, HttpCheck) and http.expect_status is None
    assert isinstance(tcp, TcpCheck) and tcp.port == 5432


def test_every_key_has_a_default(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""), must_exist=True)
    assert config == GuestConfig()
    assert config.port is None
    assert config.addresses == "vmha"
    assert config.heartbeat.enabled
    assert config.heartbeat.name == socket.gethostname()[:64]
    assert (config.heartbeat.interval_ms, config.heartbeat.corrective_action) == (1000, "log")
    assert config.heartbeat.restart_secs == 120
    assert config.checks == []


def test_a_missing_default_file_means_defaults_but_a_named_one_is_an_error(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "absent.toml"
    assert load_config(missing, must_exist=False) == GuestConfig()
    with pytest.raises(ConfigError, match=r"absent\.toml: no such file"):
        load_config(missing, must_exist=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = \n", "not valid TOML: Invalid value (at line 1, column 8)"),
        ("[heartbeat]\nintervall_ms = 5\n", "heartbeat.intervall_ms: unknown key"),
        ("[heartbeat]\ninterval_ms = 0\n", "heartbeat.interval_ms: Input should be greater than 0"),
        (
            '[heartbeat]\ninterval_ms = "1000"\n',
            "heartbeat.interval_ms: Input should be a valid integer",
        ),
        (
            '[heartbeat]\ncorrective_action = "unknown"\n',
            "heartbeat.corrective_action: Input should be 'none', 'reboot', 'stop' or 'log'",
        ),
        ('[heartbeat]\nname = "' + "x" * 65 + '"\n', "heartbeat.name: is 65 bytes, longer than 64"),
        (
            '[[checks]]\nname = "a"\ntype = "ftp"\n',
            "checks[0]: Input tag 'ftp' found using 'type' does not match",
        ),
        ('[[checks]]\nname = "web"\ntype = "http"\n', "checks[0].url: Field required"),
        (
            '[[checks]]\nname = "web"\ntype = "http"\nurl = "ftp://x/"\n',
            "checks[0].url: must be an http:// or https:// URL with a host",
        ),
        (
            '[[checks]]\nname = "f"\ntype = "file"\npath = "run/alive"\n',
            "checks[0].path: must be an absolute path",
        ),
        (
            '[[checks]]\nname = "c"\ntype = "command"\ncommand = []\n',
            "checks[0].command: List should have at least 1 item",
        ),
        (
            '[[checks]]\nname = "db"\ntype = "tcp"\nport = 70000\n',
            "checks[0].port: Input should be less than or equal to 65535",
        ),
        (
            '[[checks]]\nname = "x"\ntype = "tcp"\nport = 1\n'
            '[[checks]]\nname = "x"\ntype = "tcp"\nport = 2\n',
            "(top level): two checks are named 'x'",
        ),
        ('addresses = "openstack"\n', "addresses: Input should be 'vmha' or 'cgcs'"),
    ],
)
def test_mistakes_are_reported_with_where_and_why(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, must_exist=True)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_several_mistakes_are_listed_one_per_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"heartbeat": {"interval_ms": -1, "vote_secs": "x"}, "bogus": 1})
    lines = str(caught.value).splitlines()
    assert lines[0] == "configuration: 3 problems:"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "bogus",
        "heartbeat.interval_ms",
        "heartbeat.vote_secs",
    ]


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'port = "cgcs.messaging"\nlog_level = "warning"\n')
    parser = build_parser()
    from_file = config_from_args(parser.parse_args(["run", "--config", str(path)]))
    assert (from_file.port, from_file.log_level) == ("cgcs.messaging", "warning")
    flags = ["run", "--config", str(path), "--port", "/dev/vport1p1", "--log-level", "DEBUG"]
    overridden = config_from_args(parser.parse_args(flags))
    assert (overridden.port, overridden.log_level) == ("/dev/vport1p1", "debug")
