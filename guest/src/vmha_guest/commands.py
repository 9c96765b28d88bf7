"""The application-side commands of `vmha-guest`, built on `vmha_guest.client`:

    vmha-guest broadcast MESSAGE|-      send a broadcast to the other members
    vmha-guest status                   list the members of the group and their state
    vmha-guest watch                    print notifications and broadcasts as they come
    vmha-guest app [MESSAGE]            the original sample program server_group_app:
                                        status at start, MESSAGE as a broadcast, then
                                        everything received, one line each

Each takes `--json` (one JSON object per line on stdout), `--timeout SECONDS` (per
request, default 5) and `--socket PATH`. Errors go to stderr as one line.

Exit status, for scripts:
    0  done (watch/app: --count events seen, or ended by SIGINT/SIGTERM)
    1  unexpected error
    2  usage error; the message is too large or cannot be a broadcast
    3  server group messaging is disabled for this VM (or in this guest)
    4  the host is not connected, not answering, or cannot serve now
    5  the host refused: rate limited or another reason; or the daemon is busy
    6  the daemon is not running (no socket, no permission) or not answering
    7  watch/app: --duration ended before --count events came
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from vmha_guest.client import (
    BroadcastEvent,
    DaemonNotRunning,
    DroppedEvent,
    Event,
    GuestClient,
    HostEvent,
    HostNotAnswering,
    HostNotConnected,
    InvalidMessage,
    InvalidRequest,
    MessageTooLarge,
    MessagingDisabled,
    NoticeEvent,
    NotificationEvent,
    RateLimited,
    Refused,
    VmhaError,
    VoteEvent,
    default_socket_path,
)
from vmha_guest.local_protocol import MAX_REQUEST_LINE_BYTES, MAX_TIMEOUT_MS, ApiError, Topic
from vmha_guest.server_group import validated_broadcast
from vmha_protocol.server_group import MemberState

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MESSAGING_DISABLED = 3
EXIT_HOST = 4
EXIT_REFUSED = 5
EXIT_DAEMON = 6
EXIT_INCOMPLETE = 7
EXIT_INTERRUPTED = 130

_EXIT_FOR: tuple[tuple[type[VmhaError], int], ...] = (
    (MessageTooLarge, EXIT_USAGE),
    (InvalidMessage, EXIT_USAGE),
    (InvalidRequest, EXIT_USAGE),
    (MessagingDisabled, EXIT_MESSAGING_DISABLED),
    (HostNotConnected, EXIT_HOST),
    (HostNotAnswering, EXIT_HOST),  # and HostUnavailable
    (RateLimited, EXIT_REFUSED),
    (Refused, EXIT_REFUSED),  # and Busy
    (DaemonNotRunning, EXIT_DAEMON),
)
WATCH_TOPICS = (Topic.NOTIFICATION, Topic.BROADCAST, Topic.NOTICE, Topic.HOST)
COMMANDS = ("broadcast", "status", "watch", "app")


def exit_status(error: VmhaError) -> int:
    for kind, status in _EXIT_FOR:
        if isinstance(error, kind):
            return status
    return EXIT_ERROR


def add_commands(commands: Any) -> None:
    """Add the subcommands to `vmha-guest`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    common.add_argument(
        "--timeout",
        type=_timeout,
        default=5.0,
        metavar="SECONDS",
        help="longest wait for each answer (default 5)",
    )
    common.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the daemon's socket (default $VMHA_GUEST_SOCKET or {default_socket_path()})",
    )
    broadcast = commands.add_parser(
        "broadcast", parents=[common], help="send a message to the other members of the group"
    )
    broadcast.add_argument("message", help="the message (≤ 3050 bytes, one line); - reads stdin")
    commands.add_parser("status", parents=[common], help="list the group's members")
    watching = argparse.ArgumentParser(add_help=False)
    watching.add_argument("--count", type=_positive_int, metavar="N", help="stop after N events")
    watching.add_argument(
        "--duration", type=_positive_seconds, metavar="SECONDS", help="stop after this long"
    )
    watch = commands.add_parser(
        "watch", parents=[common, watching], help="print events as they come"
    )
    watch.add_argument(
        "--topics",
        type=_topics,
        default=(Topic.NOTIFICATION, Topic.BROADCAST),
        metavar="LIST",
        help="comma-separated: notification, broadcast, notice, host "
        "(default notification,broadcast)",
    )
    app = commands.add_parser(
        "app",
        parents=[common, watching],
        help="server_group_app compatible: print status, notifications and broadcasts",
    )
    app.add_argument("message", nargs="?", help="send this as a broadcast after the status")


def run_command(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    out = Output(args.json)
    command: Callable[[argparse.Namespace, Output], Awaitable[int]] = {
        "broadcast": _broadcast,
        "status": _status,
        "watch": _watch,
        "app": _app,
    }[args.command]
    try:
        return await command(args, out)
    except asyncio.CancelledError:
        return EXIT_OK if args.command in ("watch", "app") else EXIT_INTERRUPTED
    except VmhaError as error:
        out.error(args.command, error.code, error.message)
        return exit_status(error)


class Output:
    """Lines on stdout (text or JSON), errors on stderr; flushed as they are written."""

    def __init__(self, as_json: bool, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr):
        self.as_json = as_json
        self._stdout = stdout
        self._stderr = stderr

    def emit(self, text: str, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) if self.as_json else text
        print(line, file=self._stdout, flush=True)

    def error(self, command: str, code: str, message: str) -> None:
        print(f"vmha-guest {command}: {message}", file=self._stderr, flush=True)
        if self.as_json:
            self.emit("", {"ok": False, "error": {"code": code, "message": message}})


# -- commands ----------------------------------------------------------------------------


async def _broadcast(args: argparse.Namespace, out: Output) -> int:
    message = _read_stdin() if args.message == "-" else args.message
    _check_broadcast(message)
    async with _client(args) as client:
        result = await client.broadcast(message)
    out.emit(f"broadcast sent ({result.bytes} bytes)", {"ok": True, "bytes": result.bytes})
    return EXIT_OK


async def _status(args: argparse.Namespace, out: Output) -> int:
    async with _client(args) as client:
        result = await client.status()
    members = sorted(result.members, key=lambda m: (m.display_name, m.instance_id))
    if out.as_json:
        listed = [_member_json(member) for member in members]
        out.emit("", {"ok": True, "members": listed, "truncated": result.truncated})
    else:
        for line in status_table(members):
            out.emit(line, {})
    if result.truncated:
        print("vmha-guest status: more members than listed (truncated)", file=sys.stderr)
    return EXIT_OK


async def _watch(args: argparse.Namespace, out: Output) -> int:
    async with _client(args) as client:
        await client.subscribe(args.topics)
        return await _print_events(client, args, out)


async def _app(args: argparse.Namespace, out: Output) -> int:
    if args.message is not None:
        _check_broadcast(args.message)
    async with _client(args, name="server_group_app") as client:
        await client.subscribe([Topic.NOTIFICATION, Topic.BROADCAST])
        result = await client.status()
        for member in result.members:
            out.emit(f"status: {describe_member(member)}", _event_json("status", member))
        count = len(result.members)
        out.emit(f"status done: {count} member(s)", {"event": "status_done", "count": count})
        if args.message is not None:
            sent = await client.broadcast(args.message)
            out.emit(
                f"broadcast sent: {args.message}",
                {"event": "broadcast_sent", "data": args.message, "bytes": sent.bytes},
            )
        return await _print_events(client, args, out)


async def _print_events(client: GuestClient, args: argparse.Namespace, out: Output) -> int:
    seen = 0
    try:
        async with asyncio.timeout(args.duration):
            while args.count is None or seen < args.count:
                event = await client.next_event()
                out.emit(describe_event(event), event_json(event))
                seen += 1
    except TimeoutError:
        if args.count is not None:
            print(
                f"vmha-guest {args.command}: {seen} of {args.count} event(s) "
                f"in {args.duration:g} s",
                file=sys.stderr,
            )
            return EXIT_INCOMPLETE
    return EXIT_OK


# -- formatting ----------------------------------------------------------------------------


def describe_member(member: MemberState) -> str:
    node = member.host or member.node or "-"
    return (
        f"{member.display_name} state={member.state} heartbeat={member.heartbeat} "
        f"host={node} instance_id={member.instance_id}"
    )


def describe_event(event: Event) -> str:
    """One readable line per event (the original sample program's spirit)."""
    match event:
        case NotificationEvent(member=member):
            return f"notification: {describe_member(member)}"
        case BroadcastEvent(source_instance=source, data=data):
            return f"broadcast from {source}: {data}"
        case VoteEvent() as vote:
            return (
                f"vote {vote.vote_id}: {vote.event_type} proposed; answer within "
                f"{vote.timeout_ms} ms"
            )
        case NoticeEvent() as notice:
            kind = notice.notification_type
            return f"notice: {notice.event_type} ({kind}) in {notice.timeout_ms} ms"
        case HostEvent(connected=connected, messaging=messaging):
            link = "connected" if connected else "not connected"
            return f"host: {link}, messaging {messaging}"
        case DroppedEvent(count=count):
            return f"dropped: {count} event(s) missed (reading too slowly)"


def event_json(event: Event) -> dict[str, Any]:
    match event:
        case NotificationEvent(member=member):
            return _event_json("notification", member)
        case BroadcastEvent(source_instance=source, data=data):
            return {"event": "broadcast", "source_instance": source, "data": data}
        case VoteEvent() as vote:
            return {"event": "vote", **vars(vote)}
        case NoticeEvent() as notice:
            return {"event": "notice", **vars(notice)}
        case HostEvent(connected=connected, messaging=messaging):
            return {"event": "host", "connected": connected, "messaging": messaging}
        case DroppedEvent(count=count):
            return {"event": "dropped", "count": count}


def status_table(members: list[MemberState]) -> list[str]:
    rows = [("NAME", "STATE", "HEARTBEAT", "HOST", "INSTANCE_ID")]
    rows += [
        (m.display_name, m.state, m.heartbeat, m.host or m.node or "-", m.instance_id)
        for m in members
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


def _event_json(kind: str, member: MemberState) -> dict[str, Any]:
    return {"event": kind, "member": _member_json(member)}


def _member_json(member: MemberState) -> dict[str, Any]:
    return member.model_dump(mode="json")


# -- helpers -------------------------------------------------------------------------------


def _client(args: argparse.Namespace, name: str | None = None) -> GuestClient:
    return GuestClient(args.socket, timeout=args.timeout, name=name or f"vmha-guest {args.command}")


def _check_broadcast(message: str) -> None:
    """Refuse what cannot be a broadcast before asking the daemon (it checks again)."""
    try:
        validated_broadcast(message)
    except ApiError as error:
        cls = MessageTooLarge if error.code == "too-large" else InvalidMessage
        raise cls(error.message) from None


def _read_stdin() -> str:
    # Bounded: a broadcast is at most 3050 bytes; more than a request line is certainly wrong.
    data = sys.stdin.buffer.read(MAX_REQUEST_LINE_BYTES + 1)
    if len(data) > MAX_REQUEST_LINE_BYTES:
        raise MessageTooLarge(f"standard input is longer than {MAX_REQUEST_LINE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("standard input is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


def _timeout(text: str) -> float:
    value = _positive_seconds(text)
    if value > MAX_TIMEOUT_MS / 1000:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_MS // 1000} seconds")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _topics(text: str) -> tuple[Topic, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    allowed = {topic.value for topic in WATCH_TOPICS}
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"topics are {', '.join(sorted(allowed))} (vote needs an application that answers)"
        )
    return tuple(Topic(name) for name in names)
