"""The client connections of one engine: context, subscriptions, waiters (docs/lua-api.md, "The
connection object").

A ``ClientConnection`` is the transport-independent state of one end-user connection; the protocol
object that carries it implements ``ClientTransport``.  ``ConnectionRegistry`` finds connections by
client id and subscribers by channel.  Nothing here knows Twisted's protocols or Lua.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred

from connmix_tx.meter import ServerMeter
from connmix_tx.names import valid_name

MAX_CHANNELS_PER_CONNECTION = 128

#: Delivery failures, as Lua and the API name them (docs/lua-api.md, mix.mesh.send).
CLIENT_NOT_FOUND = "client not found"
SLOW_CONSUMER = "slow consumer"
ENCODE_FAILED = "encode failed"
INVALID_UTF8 = "invalid utf-8"
CLOSED = "closed"


def peer_address(transport: Any) -> str:
    """``ip:port`` of the peer (``[::1]:port`` for IPv6)."""
    peer = transport.getPeer()
    host = getattr(peer, "host", "")
    port = getattr(peer, "port", 0)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClientTransport(Protocol):
    """What the engine needs from the protocol object that carries a client connection."""

    #: The counters of the server the connection arrived on.
    meter: ServerMeter

    def send_message(self, data: bytes, binary: bool) -> str | None:
        """Send one message written by the script itself (``conn:send``); return an error or None."""

    def deliver(self, data: bytes, binary: bool, shared: dict[str, Any]) -> str | None:
        """Send one message that comes from outside the script (API, mesh, publish).

        ``shared`` is one dict per fan-out, where a transport may cache a prepared frame for the
        other recipients.  Return an error string or None.
        """

    def close_connection(self) -> None:
        """Close the connection the normal way (close handshake / flush, then TCP close)."""

    def clear_buffer(self) -> str | None:
        """Discard unconsumed input (socket servers); return an error where not supported."""


class ClientConnection:
    """State of one connection: id, peer, context, channels, context waiters."""

    __slots__ = ("client_id", "cid", "remote_addr", "transport", "context", "context_version",
                 "channels", "ready", "closed", "_waiters")

    def __init__(self, client_id: int, remote_addr: str, transport: ClientTransport) -> None:
        self.client_id = client_id
        self.cid = str(client_id).encode()  # the decimal form Lua and JSON use
        self.remote_addr = remote_addr
        self.transport = transport
        self.context: dict[str, Any] = {}
        self.context_version = 0  # bumped on every change (the Lua side caches by it)
        self.channels: set[str] = set()
        self.ready = False  # the handshake finished: deliveries may be written
        self.closed = False
        self._waiters: dict[str, list[Deferred]] = {}

    # Context -------------------------------------------------------------------------------

    def set_context_value(self, key: str, value: Any) -> None:
        """Set one key (``None`` removes it) and wake whoever waits for it."""
        self.context_version += 1
        if value is None:
            self.context.pop(key, None)
            return
        self.context[key] = value
        for waiter in self._waiters.pop(key, ()):
            waiter.callback(value)

    def set_context(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the context (top-level keys replace; ``None`` removes)."""
        for key, value in values.items():
            self.set_context_value(key, value)

    def wait_context_value(self, key: str) -> Deferred:
        """A Deferred that fires with the value of ``key`` once it is set.

        Errbacks with ``ConnectionClosed`` when the connection closes first.
        """
        waiter: Deferred = Deferred(lambda d: self._cancel_waiter(key, d))
        self._waiters.setdefault(key, []).append(waiter)
        return waiter

    def _cancel_waiter(self, key: str, waiter: Deferred) -> None:
        waiters = self._waiters.get(key, [])
        if waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[key]

    @property
    def live(self) -> bool:
        """Open for deliveries: the handshake finished and the connection has not closed."""
        return self.ready and not self.closed

    @property
    def waiting(self) -> int:
        """How many context waiters this connection holds."""
        return sum(len(w) for w in self._waiters.values())

    def mark_closed(self) -> None:
        """The connection ended: fail every waiter with ``closed``."""
        self.closed = True
        waiters, self._waiters = self._waiters, {}
        for pending in waiters.values():
            for waiter in pending:
                waiter.errback(ConnectionClosed(CLOSED))


class ConnectionClosed(Exception):
    """The connection closed while something waited on it."""


class ConnectionRegistry:
    """Connections of this engine by client id, and local subscribers by channel."""

    def __init__(self) -> None:
        self.by_id: dict[int, ClientConnection] = {}
        self.channels: dict[str, dict[int, ClientConnection]] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, conn: ClientConnection) -> None:
        self.by_id[conn.client_id] = conn

    def get(self, client_id: int) -> ClientConnection | None:
        """The live connection with this id, or None (also while handshaking or closing)."""
        conn = self.by_id.get(client_id)
        if conn is None or not conn.live:
            return None
        return conn

    def remove(self, conn: ClientConnection) -> None:
        """Forget a connection and all its subscriptions."""
        self.unsubscribe(conn, list(conn.channels))
        if self.by_id.get(conn.client_id) is conn:
            del self.by_id[conn.client_id]

    # Subscriptions -------------------------------------------------------------------------

    def subscribe(self, conn: ClientConnection, channels: list[str]) -> str | None:
        """Add channels; all or nothing.  Return an error text or None."""
        for channel in channels:
            if not valid_name(channel):
                return f"invalid channel name {channel!r}"
        new = set(channels) - conn.channels
        if len(conn.channels) + len(new) > MAX_CHANNELS_PER_CONNECTION:
            return f"subscribe limit reached ({MAX_CHANNELS_PER_CONNECTION} channels)"
        for channel in new:
            conn.channels.add(channel)
            self.channels.setdefault(channel, {})[conn.client_id] = conn
        return None

    def unsubscribe(self, conn: ClientConnection, channels: list[str]) -> None:
        """Remove channels; unknown ones are ignored."""
        for channel in channels:
            if channel not in conn.channels:
                continue
            conn.channels.discard(channel)
            members = self.channels.get(channel)
            if members is not None:
                members.pop(conn.client_id, None)
                if not members:
                    del self.channels[channel]

    def subscribers(self, channel: str) -> list[ClientConnection]:
        """The live connections subscribed to ``channel``."""
        members = self.channels.get(channel)
        return [c for c in members.values() if c.live] if members else []
