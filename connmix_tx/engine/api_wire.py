"""The engine API on the wire: strict JSON in, the two dialects, replies and events out.

Two dialects share one implementation per method (connmix_tx/engine/api.py).  The long form
(Gen A) is the canonical shape: a method takes the long ``params`` array and returns the long
``result`` object.  The ``Dialect`` objects do the rest at the edges: ``COMPACT`` renames its
``p`` keys into long params and the long result into its ``r`` object, and each dialect writes its
own replies and events.  Replies are built by hand around ``json.dumps`` so that key order reads
like the seed (error, result, id) and queue data pushed by Lua as JSON text is embedded without
being parsed again.  ``strict_loads`` refuses what a Lua double cannot hold.  docs/api.md lists
every method, reply and error code.
"""

from __future__ import annotations

import json
import math
from typing import Any

from connmix_tx.auth import READ, WRITE

__all__ = [
    "CALL_FAILED", "COMPACT", "CONSUME_FAILED", "DUPLICATE_CONSUMPTION", "INTERNAL_ERROR", "INVALID_PARAMS",
    "INVALID_REQUEST", "LONG", "METHOD_NOT_FOUND", "METHOD_ROLES", "PARSE_ERROR", "SEND_FAILED",
    "UNCONSUME_FAILED", "ApiError", "CompactForm", "Dialect", "LongForm", "dumps", "strict_loads",
]

INVALID_PARAMS = 101
CONSUME_FAILED = 201
DUPLICATE_CONSUMPTION = 202
UNCONSUME_FAILED = 203
CALL_FAILED = 301
SEND_FAILED = 401
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603

#: The role each method needs (docs/api.md); keyed by long name.
METHOD_ROLES = {
    "server.ping": READ,
    "queue.consume": WRITE,
    "queue.unconsume": WRITE,
    "queue.ack": WRITE,
    "conn.call": WRITE,
    "mesh.send": WRITE,
    "mesh.publish": WRITE,
}


class ApiError(Exception):
    """An error reply: ``code`` (docs/api.md lists them) and a short message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _encode(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (valid in JSON input, not in UTF-8): escape everything instead.
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


#: Encodings of values that recur in every reply and event: small flat results such as
#: ``{"fail":0,"success":true,"total":1}``, topic names.  Bounded; keyed with the value types so
#: ``True`` and ``1`` (equal in Python) never share an entry.
_MEMO: dict[Any, bytes] = {}
_MEMO_MAX = 1024


def dumps(value: Any) -> bytes:
    """Compact JSON of ``value`` as UTF-8, memoised for small recurring values."""
    kind = type(value)
    if kind is int:
        return str(value).encode()
    if value is None:
        return b"null"
    if kind is str and len(value) <= 64:
        key: Any = value
    elif kind is dict and len(value) <= 4 and all(type(v) in (int, bool, str) for v in value.values()):
        key = tuple((k, type(v), v) for k, v in value.items())
    else:
        return _encode(value)
    cached = _MEMO.get(key)
    if cached is None:
        cached = _encode(value)
        if len(_MEMO) < _MEMO_MAX:
            _MEMO[key] = cached
    return cached


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 309:  # beyond any double (Lua numbers are doubles): refuse, do not store
        raise ValueError(f"number out of range: {text[:20]}...")
    return int(text)


def strict_loads(raw: bytes) -> Any:
    """``json.loads`` of strict UTF-8 JSON: no NaN / Infinity, no number a Lua double cannot
    hold (``1e400``, 400-digit integers); raises ValueError or RecursionError."""
    text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)


class Dialect:
    """How one dialect reads params and writes replies and events."""

    name_key = id_key = params_key = ""
    #: ``params`` / ``p`` when the request has none.
    no_params: Any = None

    def method(self, name: str) -> str | None:
        """The long name of the method called ``name`` in this dialect, or None."""
        raise NotImplementedError

    def params(self, method: str, params: Any) -> list:
        """The long-form params array of ``params`` written in this dialect."""
        raise NotImplementedError

    def result(self, method: str, result: dict) -> dict:
        """The long ``result`` of ``method`` as this dialect writes it."""
        raise NotImplementedError

    def reply(self, result: dict, request_id: Any) -> bytes:
        raise NotImplementedError

    def error(self, code: int, message: str, request_id: Any) -> bytes:
        raise NotImplementedError

    def failure(self, failure: Any, request_id: Any) -> bytes:
        """The error reply of a method that failed later with an ``ApiError``."""
        return self.error(failure.value.code, failure.value.message, request_id)

    def event(self, node_json: bytes, topic: str, client_id: str, data: bytes) -> bytes:
        """A queue event; ``node_json`` is the JSON string of the node id, ``data`` JSON text."""
        raise NotImplementedError

    def manual_event(self, node_json: bytes, topic: str, client_id: str, data: bytes,
                     message_id: str, redelivered: int) -> bytes:
        """A queue event of a manual consumption: with the message id (and redelivery count)."""
        raise NotImplementedError


class LongForm(Dialect):
    """``{"method", "params", "id"}`` (Gen A, as the seed)."""

    name_key, id_key, params_key = "method", "id", "params"
    no_params: Any = []

    def method(self, name: str) -> str | None:
        return name if name in METHOD_ROLES else None

    def params(self, method: str, params: Any) -> list:
        if not isinstance(params, list):
            raise ApiError(INVALID_REQUEST, "params must be an array")
        return params

    def result(self, method: str, result: dict) -> dict:
        return result

    def reply(self, result: dict, request_id: Any) -> bytes:
        return b'{"error":null,"result":' + dumps(result) + b',"id":' + dumps(request_id) + b"}"

    def error(self, code: int, message: str, request_id: Any) -> bytes:
        error = dumps({"code": code, "message": message})
        return b'{"error":' + error + b',"id":' + dumps(request_id) + b"}"

    def event(self, node_json: bytes, topic: str, client_id: str, data: bytes) -> bytes:
        return (
            b'{"event":"queue.consume","result":{"client_id":"' + client_id.encode()
            + b'","data":' + data + b',"node_id":' + node_json
            + b',"queue":' + dumps(topic) + b'},"id":null}'
        )

    def manual_event(self, node_json: bytes, topic: str, client_id: str, data: bytes,
                     message_id: str, redelivered: int) -> bytes:
        again = b',"redelivered":%d' % redelivered if redelivered else b""
        return (
            b'{"event":"queue.consume","result":{"client_id":"' + client_id.encode()
            + b'","data":' + data + b',"message_id":' + dumps(message_id) + b',"node_id":' + node_json
            + b',"queue":' + dumps(topic) + again + b'},"id":null}'
        )


class CompactForm(Dialect):
    """``{"m", "p", "i"}`` (Gen B); also the body and ``r`` of the HTTP API (docs/api.md)."""

    name_key, id_key, params_key = "m", "i", "p"
    no_params: Any = {}

    #: Compact method names that differ from the long ones (long names are accepted too).
    ALIASES = {"queue.pop": "queue.consume", "queue.unpop": "queue.unconsume"}
    #: ``p`` keys -> long ``params[0]`` keys, for the methods taking one object.
    KEYS = {
        "conn.call": {"c": "client_id", "f": "func", "a": "args"},
        "mesh.send": {"c": "client_id", "d": "data", "t": "type"},
        "mesh.publish": {"c": "channel", "d": "data", "t": "type"},
    }

    def method(self, name: str) -> str | None:
        name = self.ALIASES.get(name, name)
        return name if name in METHOD_ROLES else None

    def params(self, method: str, params: Any) -> list:
        if not isinstance(params, (dict, list)):
            raise ApiError(INVALID_REQUEST, "p must be an object or an array")
        spec = _unwrap(params)
        if method == "server.ping":
            return []
        if method == "queue.unconsume":  # takes nothing: {}, [] or [{}]
            return [] if spec == {} else [params]
        if method == "queue.consume":  # {"t": [topics], "a"?: mode}, [{"t": …}] or [topics]
            topics = spec.get("t") if spec is not None else params
            if not isinstance(topics, list):
                raise ApiError(INVALID_PARAMS, "invalid params: expected t, an array of topic names")
            if spec is not None and "a" in spec:
                return [{"queues": topics, "ack": spec["a"]}]
            return topics
        if method == "queue.ack":  # {"t": topic, "i": [ids]}
            if spec is None:
                raise ApiError(INVALID_PARAMS, "invalid params: expected one object")
            return [{"queue": spec.get("t"), "ids": spec.get("i")}]
        if spec is None:
            raise ApiError(INVALID_PARAMS, "invalid params: expected one object")
        keys = self.KEYS[method]
        return [{keys[key]: value for key, value in spec.items() if key in keys}]

    def result(self, method: str, result: dict) -> dict:
        if method == "server.ping":
            return {"m": "server.pong"}
        if method == "mesh.publish":
            return {"f": result["fail"], "s": result["total"] - result["fail"], "t": result["total"]}
        if method == "queue.ack":
            return {"n": result["acked"], "s": result["success"]}
        return {"s": result["success"]}

    def reply(self, result: dict, request_id: Any) -> bytes:
        return b'{"E":null,"r":' + dumps(result) + b',"i":' + dumps(request_id) + b"}"

    def error(self, code: int, message: str, request_id: Any) -> bytes:
        error = dumps({"c": code, "m": message})
        return b'{"E":' + error + b',"r":null,"i":' + dumps(request_id) + b"}"

    def event(self, node_json: bytes, topic: str, client_id: str, data: bytes) -> bytes:
        return (
            b'{"e":"queue.pop","p":{"n":' + node_json + b',"c":"' + client_id.encode()
            + b'","t":' + dumps(topic) + b',"d":' + data + b"}}"
        )

    def manual_event(self, node_json: bytes, topic: str, client_id: str, data: bytes,
                     message_id: str, redelivered: int) -> bytes:
        again = b',"r":%d' % redelivered if redelivered else b""
        return (
            b'{"e":"queue.pop","p":{"n":' + node_json + b',"c":"' + client_id.encode()
            + b'","t":' + dumps(topic) + b',"i":' + dumps(message_id) + again
            + b',"d":' + data + b"}}"
        )

    def envelope(self, result: dict) -> bytes:
        """The HTTP API body of a result (no ``i``)."""
        return b'{"E":null,"r":' + dumps(result) + b"}"

    def envelope_error(self, code: int, message: str) -> bytes:
        """The HTTP API body of an error."""
        return b'{"E":' + dumps({"c": code, "m": message}) + b',"r":null}'


LONG = LongForm()
COMPACT = CompactForm()


def _unwrap(params: dict | list) -> dict | None:
    """The object of a compact ``p``: itself, the one object of an array, {} for []; else None."""
    if isinstance(params, dict):
        return params
    if not params:
        return {}
    if len(params) == 1 and isinstance(params[0], dict):
        return params[0]
    return None

