"""`vmha-node-agent`: run the node agent."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from vmha_node_agent import cluster
from vmha_node_agent.agent import NodeAgent, Service, SessionKey
from vmha_node_agent.config import AgentConfig, ConfigError, load_config
from vmha_node_agent.inventory import StaticVMSource, VMSource
from vmha_node_agent.logs import configure_logging
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.reporting import TransitionSink
from vmha_node_agent.session import VMSession


def agent_command() -> list[str]:
    """How to run `vmha-node-agent` from this installation: the script next to this
    interpreter, else `python -m vmha_node_agent`."""
    script = Path(sys.executable).parent / "vmha-node-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmha_node_agent"]


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
    parser.add_argument(
        "--kubeconfig", type=Path, help="kubeconfig file (default: the pod's service account)"
    )
    parser.add_argument(
        "--kubelet-root", type=Path, help="the kubelet's root directory (default /var/lib/kubelet)"
    )
    parser.add_argument(
        "--kubernetes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="discover VMs and report through the Kubernetes API (default: when a kubeconfig "
        "is given or the agent runs in a pod)",
    )
    parser.add_argument(
        "--messaging-address", help="listen address of the agent-to-agent HTTPS endpoint"
    )
    parser.add_argument(
        "--messaging-port", type=int, help="its port (0: any free port; default 9443)"
    )
    parser.add_argument(
        "--advertise-address",
        help="the address other agents use to reach this one (default: $POD_IP)",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> AgentConfig:
    config = load_config(args.config)
    overrides: dict[str, object] = {}
    if args.node_name:
        overrides["node_name"] = args.node_name
    metrics = _given(address=args.metrics_address, port=args.metrics_port)
    if metrics:
        overrides["metrics"] = config.metrics.model_copy(update=metrics)
    if args.doctor_url:
        overrides["doctor"] = config.doctor.model_copy(update={"url": args.doctor_url})
    kube = _given(
        kubeconfig=args.kubeconfig, kubelet_root=args.kubelet_root, enabled=args.kubernetes
    )
    if kube:
        overrides["kubernetes"] = config.kubernetes.model_copy(update=kube)
    messaging = _given(
        address=args.messaging_address,
        port=args.messaging_port,
        advertise_address=args.advertise_address,
    )
    if messaging:
        overrides["messaging"] = config.messaging.model_copy(update=messaging)
    # Round-trip through validation so overrides are checked like the file is.
    return AgentConfig.model_validate({**config.model_dump(), **overrides})


def _given(**values: object) -> dict[str, object]:
    return {key: value for key, value in values.items() if value is not None}


def assemble(config: AgentConfig) -> NodeAgent:
    """The agent with its sources: the static VM list, and Kubernetes when wanted."""
    metrics = AgentMetrics()
    sessions: dict[SessionKey, VMSession] = {}
    sources: list[VMSource] = [StaticVMSource(config.vms)]
    sinks: list[TransitionSink] = []
    services: list[Service] = []
    ready: Callable[[], bool] = lambda: True  # noqa: E731
    messenger = None
    if config.kubernetes.wanted():
        parts = cluster.connect(config, metrics, sessions)
        sources.append(parts.source)
        sinks.extend(parts.sinks)
        services.extend(parts.services)
        ready = parts.source.ready
        messenger = parts.messenger
    return NodeAgent(
        config,
        sources,
        metrics=metrics,
        sinks=sinks,
        services=services,
        sessions=sessions,
        ready=ready,
        messenger=messenger,
    )


async def run(config: AgentConfig) -> None:
    agent = assemble(config)
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
        asyncio.run(run(config))
    except ConfigError as exc:
        print(f"vmha-node-agent: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
