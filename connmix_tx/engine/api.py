"""The engine API's request dispatch: JSON in, JSON out, no transport.

``ApiDispatcher.handle`` takes the raw text of one WebSocket request and returns the raw reply
(bytes), or a Deferred of it when the answer needs another engine.  ``handle_many`` answers the
requests of one read together: ``mesh.send`` / ``conn.call`` for other engines leave as one
submission per mesh link, with one completion for all of them (docs/performance.md, "The mesh
fast path"); every request's outcome is counted through the dispatcher's ``ApiMeter``.  ``ApiDispatcher.call`` runs
one method for any front end (the WebSocket and the HTTP API).  ``ApiSession`` is the
per-connection state (its user, the queues it consumes) and the consumer the queues feed.

The dialects, strict parsing and reply encoding live in connmix_tx/engine/api_wire.py, the checks
of each method's params in connmix_tx/engine/api_params.py; both are re-exported here.
docs/api.md describes every method and error code.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from connmix_tx.auth import UNAUTHORIZED, AccessControl
from connmix_tx.engine.api_params import (
    CALLED, SENT, call_args, called, object_param, payload, published, scalar, send_args, sent,
)
from connmix_tx.engine.api_wire import (
    CALL_FAILED, COMPACT, CONSUME_FAILED, DUPLICATE_CONSUMPTION, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST,
    LONG, METHOD_NOT_FOUND, METHOD_ROLES, PARSE_ERROR, SEND_FAILED, UNCONSUME_FAILED, ApiError, CompactForm,
    Dialect, LongForm, dumps, strict_loads,
)
from connmix_tx.engine.queue import QueueError, QueueManager
from connmix_tx.engine.router import Router
from connmix_tx.later import Later, when_ready
from connmix_tx.meter import NULL_METER, ApiMeter, QueueMeter
from connmix_tx.names import valid_name

__all__ = [
    "ACK_IDS_MAX", "CALLED", "CALL_FAILED", "COMPACT", "CONSUME_FAILED", "CONSUMER_BUFFER_LIMIT",
    "DUPLICATE_CONSUMPTION", "FAST_METHODS", "INTERNAL_ERROR", "INVALID_PARAMS", "INVALID_REQUEST", "LONG",
    "METHOD_NOT_FOUND", "METHOD_ROLES", "PARSE_ERROR", "SEND_FAILED", "SENT", "UNCONSUME_FAILED",
    "ApiDispatcher", "ApiError", "ApiSession", "CompactForm", "Dialect", "LongForm", "strict_loads",
]

log = Logger(namespace="connmix.api")

#: A consumer whose outbound buffer holds this much is skipped by the queues (docs/queues.md).
CONSUMER_BUFFER_LIMIT = 256 * 1024

#: Most message ids one ``queue.ack`` may carry.
ACK_IDS_MAX = 10000

#: Methods ``ApiDispatcher.handle_many`` answers on its own fast path.
FAST_METHODS = ("mesh.send", "conn.call")
_FORWARDED = object()


class ApiSession:
    """One API connection: its user, the consumer of its topics, and its outbound writer.

    ``user`` is the name the connection authenticated as (None when no users are configured);
    its roles are looked up again at each request.  Each consumed topic remembers the dialect of
    the request that started it, which is the dialect of its events.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        buffered: Callable[[], int],
        node_id: str,
        peer: str = "",
        user: str | None = None,
        meter: QueueMeter = NULL_METER,
    ) -> None:
        self._write = write
        self._buffered = buffered
        self.peer = peer
        self.user = user
        self._meter = meter
        self._node_json = dumps(node_id)
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
        self.deliver_from(self._node_json, topic, client_id, data, message_id, redelivered)

    def deliver_from(self, node_json: bytes, topic: str, client_id: str, data: bytes,
                     message_id: str | None = None, redelivered: int = 0) -> None:
        """Write one event whose ``node_id`` is ``node_json`` (JSON text): another worker of this
        engine pushed it (connmix_tx/engine/siblings.py)."""
        self._meter.delivered(topic).inc()
        dialect = self._event_dialects.get(topic, LONG)
        if message_id is None:
            self._write(dialect.event(node_json, topic, client_id, data))
        else:
            self._write(dialect.manual_event(node_json, topic, client_id, data, message_id, redelivered))


class ApiDispatcher:
    """Runs API methods against the engine's router and queues, for users ``access`` allows.

    Without ``access`` every method is allowed (unit tests, tools).
    """

    def __init__(self, router: Router, queues: QueueManager, access: AccessControl | None = None,
                 meter: ApiMeter = NULL_METER) -> None:
        self.router = router
        self.queues = queues
        self.access = access
        self.meter = meter
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
        """One request called ``name`` (as written in ``dialect``) ended with ``code`` (0 = ok).

        The ``method`` label is the long name of a known method, ``unknown`` for any other name,
        and ``""`` for a request refused before its method was read (bad JSON, no method key...).
        """
        self.meter.request((dialect.method(name) if dialect is not None else name) or "unknown", code)

    def _refuse(self, dialect: Dialect, code: int, message: str) -> bytes:
        """The reply to a request refused before its method was read (counted under ``""``)."""
        self.meter.request("", code)
        return dialect.error(code, message, None)

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
        self.router.hold_publishes()
        try:
            for raw in raws:
                reply = self._fast(session, raw, len(replies), forwards)
                if reply is _FORWARDED:
                    replies.append(None)
                    continue
                if reply is None:
                    if forwards:
                        self._forward(forwards, replies, completion)
                    replies.append(None)
                    completion.expect()  # _fill, now or later, marks it finished
                    when_ready(self.handle(session, raw), _fill, replies, len(replies) - 1, completion)
                    continue
                replies.append(reply)
            if forwards:
                self._forward(forwards, replies, completion)
        finally:
            self.router.release_publishes()
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
        if not isinstance(name, str):
            return None
        method = dialect.method(name)
        if method not in FAST_METHODS:
            return None
        request_id = request.get(dialect.id_key)
        if not scalar(request_id):
            return None
        try:
            self._authorize(session, method)
            params = dialect.params(method, request.get(dialect.params_key, dialect.no_params))
            if method == "mesh.send":
                client_id, data, binary = send_args(params)
                op: tuple = ("send", client_id, data, binary)
            else:
                client_id, func, args = call_args(params)
                op = ("call", client_id, func, args)
            target = self.router.route(client_id)
            if target is None:  # here: run it (and time it) at once
                local = self.router.local
                error = local.send(client_id, data, binary) if method == "mesh.send" \
                    else local.call(client_id, func, args)
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

    def handle(self, session: ApiSession, raw: bytes) -> Later[bytes]:
        """Answer one WebSocket request in its dialect; never raises."""
        try:
            request = strict_loads(raw)
        except (ValueError, RecursionError):
            return self._refuse(LONG, PARSE_ERROR, "parse error: invalid JSON")
        if isinstance(request, list):
            return self._refuse(LONG, INVALID_REQUEST, "batch requests are not supported")
        if not isinstance(request, dict):
            return self._refuse(LONG, PARSE_ERROR, "parse error: a request is a JSON object")
        if ("method" in request) == ("m" in request):
            return self._refuse(LONG, INVALID_REQUEST, 'invalid request: expected a "method" or an "m" key')
        dialect = LONG if "method" in request else COMPACT
        request_id = request.get(dialect.id_key)
        if not scalar(request_id):
            return self._refuse(dialect, INVALID_REQUEST, f"{dialect.id_key} must be a JSON scalar")
        name = request.get(dialect.name_key)
        if not isinstance(name, str):
            return self._refuse(dialect, INVALID_REQUEST, f"{dialect.name_key} must be a string")
        params = request.get(dialect.params_key, dialect.no_params)
        try:
            result = self.call(session, dialect, name, params)
        except ApiError as e:
            return dialect.error(e.code, e.message, request_id)
        return when_ready(result, dialect.reply, request_id, failed=dialect.failure)

    def call(self, session: ApiSession, dialect: Dialect, name: str, params: Any) -> Later[dict]:
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
            return when_ready(result, self._answered, method, dialect, session, name, failed=self._failed)
        except ApiError as e:
            self._debug(session, name, e.code)
            self.count(name, e.code, dialect)
            raise
        except Exception:
            log.failure("api {method} from {peer}: internal error", method=name, peer=session.peer)
            self.count(name, INTERNAL_ERROR, dialect)
            raise ApiError(INTERNAL_ERROR, "internal error") from None

    def _authorize(self, session: ApiSession, method: str) -> None:
        role = METHOD_ROLES[method]
        if self.access is not None and not self.access.allows(session.user, role):
            raise ApiError(UNAUTHORIZED, f"permission denied: {method} needs the {role} role")

    def _answered(self, result: dict, method: str, dialect: Dialect, session: ApiSession, name: str) -> dict:
        """The long ``result`` of ``method`` as ``dialect`` writes it; counted as a success."""
        reply = dialect.result(method, result)
        self.count(name, 0, dialect)
        return reply

    def _failed(self, failure: Any, method: str, dialect: Dialect, session: ApiSession, name: str) -> Any:
        if failure.check(ApiError):
            self._debug(session, name, failure.value.code)
            self.count(name, failure.value.code, dialect)
            return failure
        log.failure("api {method} from {peer}: internal error", failure, method=name, peer=session.peer)
        self.count(name, INTERNAL_ERROR, dialect)
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
            queues = spec.get("queues")
            if not isinstance(queues, list):
                raise ApiError(INVALID_PARAMS, "invalid params: queues must be an array of topic names")
            params = queues
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
        spec = object_param(params)
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

    def conn_call(self, session: ApiSession, params: list, dialect: Dialect) -> Later[dict]:
        return when_ready(self.router.call(*call_args(params)), called)

    def mesh_send(self, session: ApiSession, params: list, dialect: Dialect) -> Later[dict]:
        return when_ready(self.router.send(*send_args(params)), sent)

    def mesh_publish(self, session: ApiSession, params: list, dialect: Dialect) -> Later[dict]:
        spec = object_param(params)
        channel = spec.get("channel")
        if not valid_name(channel):
            raise ApiError(INVALID_PARAMS, "invalid params: bad channel name")
        data, binary = payload(spec, "data", "type")
        return when_ready(self.router.publish(channel, data, binary), published)


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



def _fill(reply: bytes, replies: list, index: int, completion: _Completion) -> None:
    """The reply of request ``index`` of a read is known (now or later)."""
    replies[index] = reply
    completion.finished()


def _answer(method: str, error: str | None, dialect: Dialect, request_id: Any) -> tuple[bytes, int]:
    """The reply of a ``mesh.send`` / ``conn.call`` that ended with ``error`` and its code."""
    try:
        result = sent(error) if method == "mesh.send" else called(error)
    except ApiError as e:
        return dialect.error(e.code, e.message, request_id), e.code
    return dialect.reply(dialect.result(method, result), request_id), 0
