"""``connmix-cli``: the command-line client for operators, built on ``connmix_tx.client``.

    connmix-cli [--center URL | --engine URL ...] [--user U --password P] COMMAND ...

Commands: ``consume TOPIC...``, ``send CLIENT_ID DATA``, ``publish CHANNEL DATA``,
``call CLIENT_ID FUNC [ARG...]``, ``nodes``, ``ping``.  Results go to stdout; an unreachable
node or an API error is one line on stderr and exit code 1 (usage errors: 2).  Runs under
``twisted.internet.task.react``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import time
from typing import Any, Sequence, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import LogLevel, FilteringLogObserver, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver

from connmix_tx.client import Client, ConnmixError, EngineLink, EngineUnavailable, QueueMessage, fetch_nodes
from connmix_tx.reactors import IReactor

PROG = "connmix-cli"
DEFAULT_CENTER = "http://127.0.0.1:6787"


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``connmix-cli``."""
    top = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to a connmix-tx cluster: consume queues, send, publish, call connection methods.",
        epilog=f"Without --center or --engine, the center at {DEFAULT_CENTER} is asked for the engines.",
    )
    where = top.add_mutually_exclusive_group()
    where.add_argument("--center", metavar="URL", help="center API, e.g. http://127.0.0.1:6787 (engines are discovered)")
    where.add_argument("--engine", metavar="URL", action="append",
                       help="engine API, e.g. ws://127.0.0.1:6789/ws/v1 (repeat for several; no center needed)")
    top.add_argument("--user", default=os.environ.get("CONNMIX_USER"), help="HTTP Basic user (env CONNMIX_USER)")
    top.add_argument("--password", default=None, help="HTTP Basic password (env CONNMIX_PASSWORD)")
    top.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                     help="bound on connecting and on each request (default 5)")
    top.add_argument("-v", "--verbose", action="store_true", help="log connection events to stderr")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    consume = commands.add_parser("consume", help="print one line per queue message: client_id topic data")
    consume.add_argument("topics", nargs="+", metavar="TOPIC")
    consume.add_argument("--count", type=int, default=0, metavar="N", help="exit after N messages (default: never)")
    consume.add_argument("--json", action="store_true", help="print each event as one JSON object")
    consume.add_argument("--ack", choices=("auto", "manual"), default="auto",
                         help="manual: acknowledge each message after it was printed (at least once; "
                              "a redelivered message is printed again)")

    send = commands.add_parser("send", help="send DATA to one connection (mesh.send)")
    send.add_argument("client_id", metavar="CLIENT_ID")
    send.add_argument("data", metavar="DATA")
    send.add_argument("--binary", action="store_true", help="DATA is base64; send the bytes as a binary frame")

    publish = commands.add_parser("publish", help="send DATA to every subscriber of CHANNEL (mesh.publish)")
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("data", metavar="DATA")
    publish.add_argument("--binary", action="store_true", help="DATA is base64; send the bytes as binary frames")

    call = commands.add_parser(
        "call", help="run a connection method (conn.call): set_context_value, set_context, subscribe, ...",
        description="Each ARG is parsed as JSON; an ARG that is not JSON is taken as a string "
                    "(so `call ID subscribe room1 room2` works).",
    )
    call.add_argument("client_id", metavar="CLIENT_ID")
    call.add_argument("func", metavar="FUNC")
    call.add_argument("args", nargs="*", metavar="ARG")

    commands.add_parser("nodes", help="list the engines the center knows (needs the center)")
    commands.add_parser("ping", help="server.ping every engine")
    return top


class Failed(Exception):
    """A command failed; the message is printed as one line."""


def json_arg(text: str) -> Any:
    """An ARG of ``call``: JSON when it parses, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Failed(f"--binary needs base64 DATA, got {text!r}") from None


def nodes_table(nodes: Sequence[dict[str, Any]], now: float) -> str:
    """The ``nodes`` table: one row per engine, columns aligned."""
    if not nodes:
        return "no engine registered"
    header = ("NUMBER", "ID", "API SERVER", "MESH POINT", "HOST", "VERSION", "CLIENTS", "CHANNELS", "LAST SEEN")
    rows: list[tuple[str, ...]] = [header]
    for node in nodes:
        last_seen = node.get("last_seen")
        seen = f"{max(0, int(now - last_seen))}s ago" if isinstance(last_seen, (int, float)) else "-"
        rows.append(tuple(str(node.get(key, "-")) for key in (
            "number", "id", "api_server", "mesh_point", "host", "version", "clients", "channels")) + (seen,))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def event_line(message: QueueMessage, as_json: bool) -> str:
    """One printed line for a queue message."""
    data = json.dumps(message.data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    if as_json:
        fields = {"client_id": message.client_id, "node_id": message.node_id, "topic": message.topic,
                  "data": message.data}
        if message.message_id is not None:
            fields.update(message_id=message.message_id, redelivered=message.redelivered)
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    again = f" (redelivered {message.redelivered})" if message.redelivered else ""
    return f"{message.client_id or '-'} {message.topic} {data}{again}"


async def run(reactor: IReactor, args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    """Run one command; raise ``SystemExit(1)`` after printing a one-line error."""
    try:
        await _command(reactor, args, out, err)
    except (EngineUnavailable, Failed) as e:
        print(f"{PROG}: {e}", file=err)
        raise SystemExit(1)
    except ConnmixError as e:
        print(f"{PROG}: API error {e.code}: {e.message}", file=err)
        raise SystemExit(1)
    except Exception as e:  # timeouts and the unexpected: still one line
        name = type(e).__name__
        text = f"no reply within {args.timeout:g} s" if "Timeout" in name or "Cancelled" in name else f"{name}: {e}"
        print(f"{PROG}: {text}", file=err)
        raise SystemExit(1)


async def _command(reactor: IReactor, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    credentials = (args.user, args.password or "") if args.user else None
    center = args.center or (None if args.engine else DEFAULT_CENTER)
    if args.command == "nodes":
        if center is None:
            raise Failed("nodes needs the center (--center URL)")
        nodes = await fetch_nodes(reactor, center, credentials, timeout=args.timeout)
        print(nodes_table(nodes, time.time()), file=out)
        return

    connected = False
    seen: set[str] = set()

    def engine_state(link: EngineLink, up: bool, reason: str | None) -> None:
        # A long consume says when engines go, come back or join; the first connections are quiet.
        if connected and args.command == "consume":
            state = ("up again" if link.address in seen else "up") if up else f"down ({reason}), reconnecting"
            print(f"{PROG}: engine {link.address} {state}", file=err, flush=True)
        seen.add(link.address)

    client = Client(center_url=center, engines=args.engine or (), credentials=credentials, reactor=reactor,
                    request_timeout=args.timeout, on_engine=engine_state)
    client.start()
    try:
        await client.ready(timeout=args.timeout, fail_fast=True)
        connected = True
        await COMMANDS[args.command](client, args, out)
    finally:
        await client.stop()


async def _consume(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    done: Deferred = Deferred()
    seen = 0

    def printed(message: QueueMessage) -> Any:
        nonlocal seen
        if done.called or (args.count and seen >= args.count):
            return None  # not acknowledged: another consumer gets it
        print(event_line(message, args.json), file=out, flush=True)
        seen += 1
        acked = client.ack(message) if message.message_id is not None else None
        if args.count and seen >= args.count:
            if acked is None:
                done.callback(None)
            else:  # exit once the last ack was answered, so it is not redelivered

                def finish(_: object) -> None:
                    if not done.called:
                        done.callback(None)

                acked.addBoth(finish)
        return acked

    await client.consume(args.topics, printed, ack=args.ack)
    await done


async def _send(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    data: str | bytes = decode_base64(args.data) if args.binary else args.data
    result = await client.send(args.client_id, data, binary=args.binary)
    print(f"sent to {args.client_id} (total {result.get('total')}, fail {result.get('fail')})", file=out)


async def _publish(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    data: str | bytes = decode_base64(args.data) if args.binary else args.data
    result = await client.publish(args.channel, data, binary=args.binary)
    print(f"published to {args.channel}: {result.get('total')} reached, {result.get('fail')} failed", file=out)


async def _call(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    result = await client.call(args.client_id, args.func, *(json_arg(a) for a in args.args))
    print(f"{args.func} on {args.client_id}: ok" if result == {"success": True} else json.dumps(result), file=out)


async def _ping(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    times = await client.ping()
    for address, seconds in sorted(times.items()):
        link = client.links[address]
        node = f" (node {link.number})" if link.number is not None else ""
        print(f"{address}{node}: pong in {seconds * 1000:.1f} ms", file=out)


COMMANDS = {"consume": _consume, "send": _send, "publish": _publish, "call": _call, "ping": _ping}


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: parse, then run the command under ``react`` (exits)."""
    args = parser().parse_args(argv)
    if args.password is None:
        args.password = os.environ.get("CONNMIX_PASSWORD")
    if args.verbose:
        level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [level])],
                                         redirectStandardIO=False)
    react(run, (args,))


if __name__ == "__main__":
    main()
