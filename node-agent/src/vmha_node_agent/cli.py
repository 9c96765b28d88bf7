"""`vmha-node-agent`: run the node agent."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from vmha_node_agent.agent import NodeAgent
from vmha_node_agent.config import AgentConfig, ConfigError, load_config
from vmha_node_agent.inventory import StaticVMSource, VMSource
from vmha_node_agent.logs import configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vmha-node-agent",
        description="Challenge the guests on this node over virtio-serial and report faults.",
    )
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument("--node-name", help="this node's name (default: $NODE_NAME or hostname)")
    parser.add_argument("--metrics-address", help="listen address for /metrics and /healthz")
    parser.add_argument("--metrics-port", type=int, help="listen port (0: any free port)")
    parser.add_argument("--doctor-url", help="OPNFV Doctor inspector base URL")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> AgentConfig:
    config = load_config(args.config)
    overrides: dict[str, object] = {}
    if args.node_name:
        overrides["node_name"] = args.node_name
    metrics = {
        key: value
        for key, value in (("address", args.metrics_address), ("port", args.metrics_port))
        if value is not None
    }
    if metrics:
        overrides["metrics"] = config.metrics.model_copy(update=metrics)
    if args.doctor_url:
        overrides["doctor"] = config.doctor.model_copy(update={"url": args.doctor_url})
    # Round-trip through validation so overrides are checked like the file is.
    return AgentConfig.model_validate({**config.model_dump(), **overrides})


async def run(config: AgentConfig) -> None:
    sources: list[VMSource] = [StaticVMSource(config.vms)]
    agent = NodeAgent(config, sources)
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main.cancel)
    with contextlib.suppress(asyncio.CancelledError):  # SIGTERM/SIGINT: a clean stop
        await agent.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_format == "json")
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"vmha-node-agent: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
