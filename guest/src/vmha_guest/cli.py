"""`vmha-guest run [--config PATH] [--port NAME_OR_PATH] [--log-level LEVEL]`, and the
commands for applications (`broadcast`, `status`, `watch`, `app`; see `commands.py`).

The daemon is the `run` subcommand. Its exit status: 0 after SIGTERM/SIGINT, 2 for a
configuration error, 1 for a crash. The other commands document theirs in `commands.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vmha_guest import __version__
from vmha_guest.commands import COMMANDS, add_commands, run_command
from vmha_guest.config import DEFAULT_CONFIG_PATH, ConfigError, GuestConfig, load_config
from vmha_guest.logs import setup_logging

log = logging.getLogger("vmha_guest")

LOG_LEVELS = ("debug", "info", "warning", "error")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command in COMMANDS:
        return run_command(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse requires one


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmha-guest",
        description="vmha guest daemon (heartbeat and server group messaging over virtio-serial)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default {DEFAULT_CONFIG_PATH}; all defaults if absent)",
    )
    run.add_argument(
        "--port",
        metavar="NAME_OR_PATH",
        help="name under /dev/virtio-ports/ or an absolute path "
        "(default vmha.messaging, then cgcs.messaging)",
    )
    run.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS)
    add_commands(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"vmha-guest: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    asyncio.run(_serve(config))
    return 0


def config_from_args(args: argparse.Namespace) -> GuestConfig:
    explicit = args.config is not None
    config = load_config(
        Path(args.config) if explicit else DEFAULT_CONFIG_PATH, must_exist=explicit
    )
    overrides = {
        key: value
        for key, value in (("port", args.port), ("log_level", args.log_level))
        if value is not None
    }
    return config.model_copy(update=overrides)


async def _serve(config: GuestConfig) -> None:
    # Imported here: the commands for applications never need the daemon's modules, and
    # in a small guest every import counts.
    from vmha_guest.daemon import GuestDaemon  # noqa: PLC0415
    from vmha_guest.port import SerialPort  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, signum, stop)
    port = SerialPort(config.port)
    log.info(
        "vmha-guest %s starting: port %s, heartbeat %s, %d check(s)",
        __version__,
        port.describe(),
        f"as {config.heartbeat.name!r}" if config.heartbeat.enabled else "disabled",
        len(config.checks),
    )
    await GuestDaemon(config, port).run(stop)
    log.info("vmha-guest stopped")


def _request_stop(signum: int, stop: asyncio.Event) -> None:
    log.info("stopping on %s", signal.Signals(signum).name)
    stop.set()
