"""The engine API's request dispatch (SPEC 7.1-7.3, 7.6, 10): JSON in, JSON out, no transport.

``ApiDispatcher.handle`` takes the raw text of one WebSocket request and returns the raw reply
(bytes), or a Deferred of it when the answer needs another engine.  ``handle_many`` answers the
requests of one read together: ``mesh.send`` / ``conn.call`` for other engines leave as one
submission per mesh link, with one completion for all of them (docs/performance.md, "The mesh
fast path"); ``count`` is the hook that counts each request's outcome.  ``ApiDispatcher.call`` runs
one method for any front end (the WebSocket and the HTTP API of SPEC 7.4).  ``ApiSession`` is
the per-connection state (its user, the queues it consumes) and the consumer the queues feed.

Two dialects share one implementation per method.  The long form (Gen A) is the canonical
shape: a method takes the long ``params`` array and returns the long ``result`` object.  The
``Dialect`` objects do the rest at the edges: ``COMPACT`` renames its ``p`` keys into long params
and the long result into its ``r`` object, and each dialect writes its own replies and events.
Replies are built by hand around ``json.dumps`` so that key order reads like the seed (error,
result, id) and queue data pushed by Lua as JSON text is embedded without being parsed again.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from functools import partial
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from connmix_tx.auth import READ, UNAUTHORIZED, WRITE, AccessControl
from connmix_tx.engine.queue import QueueError, QueueManager, valid_name
from connmix_tx.engine.router import CALL_FUNCS, Router, valid_call_args
from connmix_tx.ids import InvalidClientId, parse_client_id

log = Logger(namespace="connmix.api")

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

#: A consumer whose outbound buffer holds this much is skipped by the queues (SPEC 6).
CONSUMER_BUFFER_LIMIT = 256 * 1024

#: Most message ids one ``queue.ack`` may carry.
ACK_IDS_MAX = 10000

#: The role each method needs (SPEC 10); keyed by long name.
METHOD_ROLES = {
    "server.ping": READ,
    "queue.consume": WRITE,
    "queue.unconsume": WRITE,
    "queue.ack": WRITE,
    "conn.call": WRITE,
    "mesh.send": WRITE,
    "mesh.publish": WRITE,
}

#: Methods ``ApiDispatcher.handle_many`` answers on its own fast path.
FAST_METHODS = ("mesh.send", "conn.call")
#: The long results of a successful ``mesh.send`` / ``conn.call``.
SENT = {"fail": 0, "success": True, "total": 1}
CALLED = {"success": True}
_FORWARDED = object()


class ApiError(Exception):
    """An error reply: ``code`` from SPEC 7.6 and a short message."""

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


def _dumps(value: Any) -> bytes:
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
    """How one dialect reads params and writes replies and events (SPEC 7.2 / 7.3)."""

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
        return b'{"error":null,"result":' + _dumps(result) + b',"id":' + _dumps(request_id) + b"}"

    def error(self, code: int, message: str, request_id: Any) -> bytes:
        error = _dumps({"code": code, "message": message})
        return b'{"error":' + error + b',"id":' + _dumps(request_id) + b"}"

    def event(self, node_json: bytes, topic: str, client_id: str, data: bytes) -> bytes:
        return (
            b'{"event":"queue.consume","result":{"client_id":"' + client_id.encode()
            + b'","data":' + data + b',"node_id":' + node_json
            + b',"queue":' + _dumps(topic) + b'},"id":null}'
        )

    def manual_event(self, node_json: bytes, topic: str, client_id: str, data: bytes,
                     message_id: str, redelivered: int) -> bytes:
        again = b',"redelivered":%d' % redelivered if redelivered else b""
        return (
            b'{"event":"queue.consume","result":{"client_id":"' + client_id.encode()
            + b'","data":' + data + b',"message_id":' + _dumps(message_id) + b',"node_id":' + node_json
            + b',"queue":' + _dumps(topic) + again + b'},"id":null}'
        )


class CompactForm(Dialect):
    """``{"m", "p", "i"}`` (Gen B); also the body and ``r`` of the HTTP API (SPEC 7.4)."""

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
        return b'{"E":null,"r":' + _dumps(result) + b',"i":' + _dumps(request_id) + b"}"

    def error(self, code: int, message: str, request_id: Any) -> bytes:
        error = _dumps({"c": code, "m": message})
        return b'{"E":' + error + b',"r":null,"i":' + _dumps(request_id) + b"}"

    def event(self, node_json: bytes, topic: str, client_id: str, data: bytes) -> bytes:
        return (
            b'{"e":"queue.pop","p":{"n":' + node_json + b',"c":"' + client_id.encode()
            + b'","t":' + _dumps(topic) + b',"d":' + data + b"}}"
        )

    def manual_event(self, node_json: bytes, topic: str, client_id: str, data: bytes,
                     message_id: str, redelivered: int) -> bytes:
        again = b',"r":%d' % redelivered if redelivered else b""
        return (
            b'{"e":"queue.pop","p":{"n":' + node_json + b',"c":"' + client_id.encode()
            + b'","t":' + _dumps(topic) + b',"i":' + _dumps(message_id) + again
            + b',"d":' + data + b"}}"
        )

    def envelope(self, result: dict) -> bytes:
        """The HTTP API body of a result (SPEC 7.4: no ``i``)."""
        return b'{"E":null,"r":' + _dumps(result) + b"}"

    def envelope_error(self, code: int, message: str) -> bytes:
        """The HTTP API body of an error."""
        return b'{"E":' + _dumps({"c": code, "m": message}) + b',"r":null}'


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


class ApiSession:
    """One API connection: its user, the consumer of its topics, and its outbound writer.

    ``user`` is the name the connection authenticated as (None when no users are configured);
    its roles are looked up again at each request.  Each consumed topic remembers the dialect of
    the request that started it, which is the dialect of its events (SPEC 7.1).
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        buffered: Callable[[], int],
        node_id: str,
        peer: str = "",
        user: str | None = None,
    ) -> None:
        self._write = write
        self._buffered = buffered
        self.peer = peer
        self.user = user
        self._node_json = _dumps(node_id)
        self._event_dialects: dict[str, Dialect] = {}

    def started(self, topics: list[str], dialect: Dialect) -> None:
        """``topics`` are consumed from now on, with events in ``dialect``."""
        for topic in topics:
            self._event_dialects[topic] = dialect

    def stopped(self) -> None:
        """Nothing is consumed any more."""
        self._event_dialects.clear()

    # Consumer --------------------------------------------------------------------------------

    def eligible(self) -> bool:
        return self._buffered() < CONSUMER_BUFFER_LIMIT

    def deliver(self, topic: str, client_id: str, data: bytes, message_id: str | None = None,
                redelivered: int = 0) -> None:
        dialect = self._event_dialects.get(topic, LONG)
        if message_id is None:
            self._write(dialect.event(self._node_json, topic, client_id, data))
        else:
            self._write(dialect.manual_event(self._node_json, topic, client_id, data, message_id, redelivered))


class ApiDispatcher:
    """Runs API methods against the engine's router and queues, for users ``access`` allows.

    Without ``access`` every method is allowed (unit tests, tools).
    """

    def __init__(self, router: Router, queues: QueueManager, access: AccessControl | None = None) -> None:
        self.router = router
        self.queues = queues
        self.access = access
        self.methods: dict[str, Callable[[ApiSession, list, Dialect], Any]] = {
            "server.ping": self.server_ping,
            "queue.consume": self.queue_consume,
            "queue.unconsume": self.queue_unconsume,
            "queue.ack": self.queue_ack,
            "conn.call": self.conn_call,
            "mesh.send": self.mesh_send,
            "mesh.publish": self.mesh_publish,
        }

    def count(self, name: str, code: int, dialect: Dialect | None = None) -> None:
        """One request called ``name`` ended with ``code`` (0 = ok); a hook for metrics."""

    # The requests of one read ----------------------------------------------------------------

    def handle_many(self, session: ApiSession, raws: list[bytes]) -> tuple[list, Deferred | None]:
        """Answer the requests of one read of an API connection, in order; never raises.

        Returns the replies in request order and, when some must wait, a Deferred that fires
        once every ``None`` of that list was replaced by its reply.  ``mesh.send`` and
        ``conn.call`` are parsed once and answered here: local ones at once, forwarded ones
        queued on their engine's link as one submission per link (one completion for all of
        them, no Deferred per request).  Other methods go through ``handle``; the forwarded
        operations queued before such a request are handed to their links first, so a publish
        never overtakes a send of the same read.
        """
        replies: list = []
        forwards: dict[Any, _Forwards] = {}
        completion = _Completion(replies)
        for raw in raws:
            reply = self._fast(session, raw, len(replies), forwards)
            if reply is _FORWARDED:
                replies.append(None)
                continue
            if reply is None:
                if forwards:
                    self._forward(forwards, replies, completion)
                reply = self.handle(session, raw)
                if isinstance(reply, Deferred):
                    replies.append(None)
                    completion.expect()
                    reply.addCallback(_fill, replies, len(replies) - 1, completion.finished)
                    continue
            replies.append(reply)
        if forwards:
            self._forward(forwards, replies, completion)
        return replies, completion.seal()

    def _forward(self, forwards: dict[Any, _Forwards], replies: list, completion: _Completion) -> None:
        """Hand the queued operations to their links, one submission per link."""
        queued = list(forwards.items())
        forwards.clear()
        for link, pending in queued:
            completion.expect()
            self.router.forward(link, pending.ops, partial(self._forwarded, pending, replies, completion.finished))

    def _fast(self, session: ApiSession, raw: bytes, index: int, forwards: dict[Any, _Forwards]) -> Any:
        """Answer one ``mesh.send`` / ``conn.call``: the reply, ``_FORWARDED`` (added to
        ``forwards``), or None when ``raw`` is anything else (``handle`` answers it)."""
        try:
            request = strict_loads(raw)
        except (ValueError, RecursionError):
            return None
        if type(request) is not dict:
            return None
        if "method" in request:
            if "m" in request:
                return None
            dialect: Dialect = LONG
        elif "m" in request:
            dialect = COMPACT
        else:
            return None
        name = request.get(dialect.name_key)
        method = dialect.method(name) if isinstance(name, str) else None
        if method not in FAST_METHODS:
            return None
        request_id = request.get(dialect.id_key)
        if not _scalar(request_id):
            return None
        try:
            self._authorize(session, method)
            params = dialect.params(method, request.get(dialect.params_key, dialect.no_params))
            if method == "mesh.send":
                client_id, data, binary = _send_args(params)
                op: tuple = ("send", client_id, data, binary)
            else:
                client_id, func, args = _call_args(params)
                op = ("call", client_id, func, args)
            target = self.router.route(client_id)
            if target is None:  # here: the router runs it (and times it) at once
                error = self.router.send(client_id, data, binary) if method == "mesh.send" \
                    else self.router.call(client_id, func, args)
            elif isinstance(target, str):
                error = target
            else:
                pending = forwards.get(target)
                if pending is None:
                    pending = forwards[target] = _Forwards()
                pending.ops.append(op)
                pending.requests.append((index, dialect, request_id, name, method))
                return _FORWARDED
            reply, code = _answer(method, error, dialect, request_id)
        except ApiError as e:
            reply, code = dialect.error(e.code, e.message, request_id), e.code
        except Exception:
            log.failure("api {method} from {peer}: internal error", method=name, peer=session.peer)
            reply, code = dialect.error(INTERNAL_ERROR, "internal error", request_id), INTERNAL_ERROR
        if code:
            self._debug(session, name, code)
        self.count(name, code, dialect)
        return reply

    def _forwarded(self, pending: _Forwards, replies: list, finished: Callable[[], None], results: list) -> None:
        """The link answered every operation of ``pending``: their replies take their places."""
        for (index, dialect, request_id, name, method), error in zip(pending.requests, results):
            reply, code = _answer(method, error, dialect, request_id)
            self.count(name, code, dialect)
            replies[index] = reply
        finished()

    # One request -----------------------------------------------------------------------------

    def handle(self, session: ApiSession, raw: bytes) -> bytes | Deferred:
        """Answer one WebSocket request in its dialect; never raises."""
        try:
            request = strict_loads(raw)
        except (ValueError, RecursionError):
            return LONG.error(PARSE_ERROR, "parse error: invalid JSON", None)
        if isinstance(request, list):
            return LONG.error(INVALID_REQUEST, "batch requests are not supported", None)
        if not isinstance(request, dict):
            return LONG.error(PARSE_ERROR, "parse error: a request is a JSON object", None)
        if ("method" in request) == ("m" in request):
            return LONG.error(INVALID_REQUEST, 'invalid request: expected a "method" or an "m" key', None)
        dialect = LONG if "method" in request else COMPACT
        request_id = request.get(dialect.id_key)
        if not _scalar(request_id):
            return dialect.error(INVALID_REQUEST, f"{dialect.id_key} must be a JSON scalar", None)
        name = request.get(dialect.name_key)
        if not isinstance(name, str):
            return dialect.error(INVALID_REQUEST, f"{dialect.name_key} must be a string", None)
        params = request.get(dialect.params_key, dialect.no_params)
        try:
            result = self.call(session, dialect, name, params)
        except ApiError as e:
            return dialect.error(e.code, e.message, request_id)
        if isinstance(result, Deferred):
            return result.addCallbacks(
                lambda value: dialect.reply(value, request_id),
                lambda failure: dialect.error(failure.value.code, failure.value.message, request_id),
            )
        return dialect.reply(result, request_id)

    def call(self, session: ApiSession, dialect: Dialect, name: str, params: Any) -> dict | Deferred:
        """Run method ``name`` with ``params``, both as written in ``dialect``.

        Returns the result as ``dialect`` writes it, or a Deferred of it.  Every error is an
        ``ApiError``: raised, or the failure of the Deferred (internal errors are logged here and
        become -32603).
        """
        method = dialect.method(name)
        try:
            if method is None:
                raise ApiError(METHOD_NOT_FOUND, f"method not found: {name}")
            self._authorize(session, method)
            result = self.methods[method](session, dialect.params(method, params), dialect)
            if isinstance(result, Deferred):
                return result.addCallback(lambda value: dialect.result(method, value)).addErrback(
                    self._failed, session, name
                )
            return dialect.result(method, result)
        except ApiError as e:
            self._debug(session, name, e.code)
            raise
        except Exception:
            log.failure("api {method} from {peer}: internal error", method=name, peer=session.peer)
            raise ApiError(INTERNAL_ERROR, "internal error") from None

    def _authorize(self, session: ApiSession, method: str) -> None:
        role = METHOD_ROLES[method]
        if self.access is not None and not self.access.allows(session.user, role):
            raise ApiError(UNAUTHORIZED, f"permission denied: {method} needs the {role} role")

    def _failed(self, failure: Any, session: ApiSession, name: str) -> Any:
        if failure.check(ApiError):
            self._debug(session, name, failure.value.code)
            return failure
        log.failure("api {method} from {peer}: internal error", failure, method=name, peer=session.peer)
        raise ApiError(INTERNAL_ERROR, "internal error")

    def _debug(self, session: ApiSession, name: str, code: int) -> None:
        log.debug("api {method} from {peer}: error {code}", method=name, peer=session.peer, code=code)

    # Methods: long-form params in, long-form result out, whatever the dialect ----------------

    def server_ping(self, session: ApiSession, params: list, dialect: Dialect) -> dict:
        return {"status": "server.pong"}

    def queue_consume(self, session: ApiSession, params: list, dialect: Dialect) -> dict:
        manual = False
        if len(params) == 1 and isinstance(params[0], dict):  # [{"queues": [...], "ack": mode}]
            spec = params[0]
            if set(spec) - {"queues", "ack"} or spec.get("ack", "auto") not in ("auto", "manual"):
                raise ApiError(INVALID_PARAMS, 'invalid params: expected {"queues": [...], "ack": "auto"|"manual"}')
            manual = spec.get("ack") == "manual"
            params = spec.get("queues")
            if not isinstance(params, list):
                raise ApiError(INVALID_PARAMS, "invalid params: queues must be an array of topic names")
        if not params or not all(valid_name(t) for t in params):
            raise ApiError(INVALID_PARAMS, "invalid params: expected one or more topic names")
        mine = self.queues.consumes(session)
        if len(set(params)) != len(params) or any(t in mine for t in params):
            raise ApiError(DUPLICATE_CONSUMPTION, "duplicate consumption")
        session.started(params, dialect)  # before any event: delivery starts next turn
        try:
            self.queues.consume(session, params, manual=manual)
        except QueueError as e:
            raise ApiError(CONSUME_FAILED, f"consume failed: {e}") from None
        return {"success": True}

    def queue_ack(self, session: ApiSession, params: list, dialect: Dialect) -> dict:
        spec = _object_param(params)
        topic, ids = spec.get("queue"), spec.get("ids")
        if not valid_name(topic):
            raise ApiError(INVALID_PARAMS, "invalid params: bad queue name")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise ApiError(INVALID_PARAMS, "invalid params: ids must be a non-empty array of strings")
        if len(ids) > ACK_IDS_MAX:
            raise ApiError(INVALID_PARAMS, f"invalid params: at most {ACK_IDS_MAX} ids per ack")
        try:
            acked = self.queues.ack(session, topic, ids)
        except QueueError:
            raise ApiError(CONSUME_FAILED, f"ack failed: {topic} is not consumed by this connection") from None
        return {"acked": acked, "success": True}

    def queue_unconsume(self, session: ApiSession, params: list, dialect: Dialect) -> dict:
        if params:
            raise ApiError(INVALID_PARAMS, "invalid params: expected []")
        if not self.queues.unconsume(session):
            raise ApiError(UNCONSUME_FAILED, "unconsume failed: nothing is consumed")
        session.stopped()
        return {"success": True}

    def conn_call(self, session: ApiSession, params: list, dialect: Dialect) -> Any:
        result = self.router.call(*_call_args(params))
        if isinstance(result, Deferred):
            return result.addCallback(_called)
        return _called(result)

    def mesh_send(self, session: ApiSession, params: list, dialect: Dialect) -> Any:
        result = self.router.send(*_send_args(params))
        if isinstance(result, Deferred):
            return result.addCallback(_sent)
        return _sent(result)

    def mesh_publish(self, session: ApiSession, params: list, dialect: Dialect) -> Any:
        spec = _object_param(params)
        channel = spec.get("channel")
        if not valid_name(channel):
            raise ApiError(INVALID_PARAMS, "invalid params: bad channel name")
        data, binary = _payload(spec, "data", "type")
        result = self.router.publish(channel, data, binary)

        def answer(counts: tuple[int, int]) -> dict:
            success, fail = counts
            return {"fail": fail, "success": True, "total": success + fail}

        if isinstance(result, Deferred):
            return result.addCallback(answer)
        return answer(result)


class _Forwards:
    """The operations of one read bound for one link, and the requests they answer."""

    __slots__ = ("ops", "requests")

    def __init__(self) -> None:
        self.ops: list[tuple] = []
        #: (reply index, dialect, request id, method name as written, long method name)
        self.requests: list[tuple] = []


class _Completion:
    """Counts what the replies of one read still wait for; fires once nothing is left."""

    __slots__ = ("replies", "left", "deferred")

    def __init__(self, replies: list) -> None:
        self.replies = replies
        self.left = 0
        self.deferred: Deferred | None = None

    def expect(self) -> None:
        self.left += 1

    def finished(self) -> None:
        self.left -= 1
        if self.left == 0 and self.deferred is not None:
            self.deferred.callback(self.replies)

    def seal(self) -> Deferred | None:
        """Every request was read: None if no reply waits, else the Deferred of the replies."""
        if self.left == 0:
            return None
        self.deferred = Deferred()
        return self.deferred


def _fill(reply: bytes, replies: list, index: int, finished: Callable[[], None]) -> None:
    replies[index] = reply
    finished()


def _send_args(params: list) -> tuple[int, bytes, bool]:
    """``mesh.send`` params -> (client_id, data, binary); raises ApiError(101)."""
    spec = _object_param(params)
    client_id = _client_id(spec.get("client_id"))
    data, binary = _payload(spec, "data", "type")
    return client_id, data, binary


def _call_args(params: list) -> tuple[int, str, list]:
    """``conn.call`` params -> (client_id, func, args); raises ApiError(101)."""
    spec = _object_param(params)
    client_id = _client_id(spec.get("client_id"))
    func = spec.get("func")
    args = spec.get("args", [])
    if func not in CALL_FUNCS:
        raise ApiError(INVALID_PARAMS, f"invalid params: unknown func {func!r}")
    if not isinstance(args, list):
        raise ApiError(INVALID_PARAMS, "invalid params: args must be an array")
    if not valid_call_args(func, args):
        raise ApiError(INVALID_PARAMS, f"invalid params: wrong args for {func}")
    return client_id, func, args


def _sent(error: str | None) -> dict:
    if error is not None:
        raise ApiError(SEND_FAILED, f"send failed: {error}")
    return SENT


def _called(error: str | None) -> dict:
    if error is not None:
        raise ApiError(CALL_FAILED, f"conn.call failed: {error}")
    return CALLED


def _answer(method: str, error: str | None, dialect: Dialect, request_id: Any) -> tuple[bytes, int]:
    """The reply of a ``mesh.send`` / ``conn.call`` that ended with ``error`` and its code."""
    try:
        result = _sent(error) if method == "mesh.send" else _called(error)
    except ApiError as e:
        return dialect.error(e.code, e.message, request_id), e.code
    return dialect.reply(dialect.result(method, result), request_id), 0


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _object_param(params: list) -> dict:
    if len(params) != 1 or not isinstance(params[0], dict):
        raise ApiError(INVALID_PARAMS, "invalid params: expected one object")
    return params[0]


def _client_id(value: Any) -> int:
    try:
        return parse_client_id(value)
    except InvalidClientId:
        raise ApiError(INVALID_PARAMS, "invalid params: bad client_id") from None


def _payload(spec: dict, data_key: str, type_key: str) -> tuple[bytes, bool]:
    data = spec.get(data_key)
    kind = spec.get(type_key, "text")
    if not isinstance(data, str):
        raise ApiError(INVALID_PARAMS, f"invalid params: {data_key} must be a string")
    if kind == "text":
        return data.encode("utf-8", "surrogatepass"), False
    if kind == "binary":
        try:
            return base64.b64decode(data, validate=True), True
        except (binascii.Error, ValueError):
            raise ApiError(INVALID_PARAMS, f"invalid params: {data_key} is not valid base64") from None
    raise ApiError(INVALID_PARAMS, f"invalid params: {type_key} must be \"text\" or \"binary\"")
