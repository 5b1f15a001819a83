"""The wire of the engine API as the client sees it: long-form requests, replies and events.

Plain Python, no transport: ``PendingRequests`` numbers requests and matches replies to them,
``parse_frame`` tells replies from events, ``payload_params`` writes the data of a send or a
publish, and the small helpers turn addresses, credentials and failures into text.  docs/api.md
describes the frames; docs/client.md the SDK built on them.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

#: ``(username, password)`` for HTTP Basic.
Credentials = tuple[str, str]


class ConnmixError(Exception):
    """An error reply of the engine API: ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"error {self.code}: {self.message}"


class EngineUnavailable(Exception):
    """No engine (or not the center) could be reached, or a connection was lost mid-request."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A long-form reply: ``error`` is ``None`` or ``{"code", "message"}``."""

    id: Any
    result: Any
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Event:
    """A long-form event (``{"event", "result", "id": null}``)."""

    name: str
    result: Any


def parse_frame(payload: bytes | str) -> Reply | Event:
    """Classify one message of the engine API; raise ``ValueError`` for anything else."""
    message = json.loads(payload)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    if isinstance(message.get("event"), str):
        return Event(message["event"], message.get("result"))
    if "id" not in message or not ("result" in message or "error" in message):
        raise ValueError("neither a reply nor an event")
    error = message.get("error")
    if error is not None and not isinstance(error, dict):
        raise ValueError("error is not an object")
    return Reply(message["id"], message.get("result"), error)


class PendingRequests:
    """Request ids and the Deferreds waiting for their replies, for one connection.

    ``open`` numbers a request and returns its frame and Deferred; ``settle`` fires the Deferred
    of a reply (the result, or a ``ConnmixError`` failure); ``fail_all`` fails whatever is left
    when the connection goes.  Cancelling a Deferred (e.g. ``addTimeout``) forgets its id, so a
    late reply is ignored.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, Deferred] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self, method: str, params: Sequence[Any]) -> tuple[bytes, Deferred]:
        """A new request: its JSON frame and the Deferred of its result."""
        request_id = next(self._ids)
        frame = json.dumps({"method": method, "params": list(params), "id": request_id}, separators=(",", ":"))

        def cancel(_: Deferred) -> None:
            self._waiting.pop(request_id, None)

        waiting: Deferred = Deferred(cancel)
        self._waiting[request_id] = waiting
        return frame.encode(), waiting

    def settle(self, reply: Reply) -> bool:
        """Fire the Deferred of ``reply``; False when no request waits for that id."""
        waiting = self._waiting.pop(reply.id, None) if isinstance(reply.id, int) else None
        if waiting is None:
            return False
        if reply.error is None:
            waiting.callback(reply.result)
        else:
            code = reply.error.get("code")
            waiting.errback(ConnmixError(code if isinstance(code, int) else 0, str(reply.error.get("message", ""))))
        return True

    def fail_all(self, error: Exception) -> None:
        """Fail every waiting request with ``error``."""
        waiting, self._waiting = self._waiting, {}
        for deferred in waiting.values():
            deferred.errback(error)


def payload_params(params: dict[str, Any], data: str | bytes, binary: bool) -> dict[str, Any]:
    """Add ``data`` to the params of a ``mesh.send`` / ``mesh.publish``: text as it is, or
    base64 with ``"type": "binary"``; returns ``params``."""
    if binary:
        raw = data.encode() if isinstance(data, str) else data
        params.update(data=base64.b64encode(raw).decode("ascii"), type="binary")
    else:
        params["data"] = data.decode() if isinstance(data, bytes) else data
    return params


def engine_url(address: str, scheme: str = "ws") -> str:
    """``ws://host:port/ws/v1`` from an engine API address: ``host:port`` or a ws(s) URL."""
    if "://" in address:
        return address if urlsplit(address).path not in ("", "/") else address.rstrip("/") + "/ws/v1"
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/ws/v1"


def address_of(url: str) -> str:
    """``host:port`` of a ws(s)/http(s) URL (default ports filled in, IPv6 in brackets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def basic_authorization(credentials: Credentials) -> str:
    """The ``Authorization`` header value for HTTP Basic."""
    username, password = credentials
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def reason_text(failure: Failure | BaseException | str) -> str:
    """A short human reason for a failed connection or request."""
    if isinstance(failure, str):
        return failure
    value = failure.value if isinstance(failure, Failure) else failure
    name = type(value).__name__
    if "ConnectionRefused" in name:
        return "connection refused"
    if "DNSLookup" in name:
        return "unknown host"
    if "TimeoutError" in name or "TimedOut" in name:
        return "timed out"
    text = str(value).strip() or name
    return text.splitlines()[0]


def close_reason(reason: str | None, code: int | None) -> str:
    """A short text for why an API connection closed (or its handshake was refused)."""
    refused = re.search(r"upgrade failed \[(\d+)\]: ?([^\"]*)", reason or "")
    if refused:
        return f"handshake refused: HTTP {refused.group(1)} {refused.group(2)}".rstrip()
    if reason:
        return reason
    return f"closed with code {code}" if code else "connection lost"

