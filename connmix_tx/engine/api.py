"""The engine API's request dispatch (SPEC 7.1, 7.2, 7.6): JSON in, JSON out, no transport.

``ApiDispatcher.handle`` takes the raw text of one request and returns the raw reply (bytes), or a
Deferred of it when the answer needs another engine.  ``ApiSession`` is the per-connection state
(the queues it consumes) and the consumer the queues feed.  Replies are built by hand around
``json.dumps`` so that key order reads like the seed (error, result, id) and queue data pushed by
Lua as JSON text is embedded without being parsed again.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

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


class ApiError(Exception):
    """An error reply: ``code`` from SPEC 7.6 and a short message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _dumps(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (valid in JSON input, not in UTF-8): escape everything instead.
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def long_reply(result: Any, request_id: Any) -> bytes:
    return b'{"error":null,"result":' + _dumps(result) + b',"id":' + _dumps(request_id) + b"}"


def long_error(code: int, message: str, request_id: Any) -> bytes:
    error = _dumps({"code": code, "message": message})
    return b'{"error":' + error + b',"id":' + _dumps(request_id) + b"}"


class ApiSession:
    """One API connection: the consumer of its topics, and its outbound writer."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        buffered: Callable[[], int],
        node_id: str,
        peer: str = "",
    ) -> None:
        self._write = write
        self._buffered = buffered
        self.peer = peer
        self._node_json = _dumps(node_id)

    # Consumer --------------------------------------------------------------------------------

    def eligible(self) -> bool:
        return self._buffered() < CONSUMER_BUFFER_LIMIT

    def deliver(self, topic: str, client_id: str, data: bytes) -> None:
        self._write(
            b'{"event":"queue.consume","result":{"client_id":"' + client_id.encode()
            + b'","data":' + data + b',"node_id":' + self._node_json
            + b',"queue":' + _dumps(topic) + b'},"id":null}'
        )


class ApiDispatcher:
    """Runs API methods against the engine's router and queues."""

    def __init__(self, router: Router, queues: QueueManager) -> None:
        self.router = router
        self.queues = queues
        self.methods: dict[str, Callable[[ApiSession, list], Any]] = {
            "server.ping": self.server_ping,
            "queue.consume": self.queue_consume,
            "queue.unconsume": self.queue_unconsume,
            "conn.call": self.conn_call,
            "mesh.send": self.mesh_send,
            "mesh.publish": self.mesh_publish,
        }

    def handle(self, session: ApiSession, raw: bytes) -> bytes | Deferred:
        """Answer one request; never raises."""
        try:
            request = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            return long_error(PARSE_ERROR, "parse error: invalid JSON", None)
        if isinstance(request, list):
            return long_error(INVALID_REQUEST, "batch requests are not supported", None)
        if not isinstance(request, dict):
            return long_error(PARSE_ERROR, "parse error: a request is a JSON object", None)
        request_id = request.get("id")
        if not _scalar(request_id):
            return long_error(INVALID_REQUEST, "id must be a JSON scalar", None)
        name = request.get("method")
        if not isinstance(name, str) or "m" in request:
            return long_error(INVALID_REQUEST, "invalid request: expected a \"method\" key", None)
        params = request.get("params", [])
        if not isinstance(params, list):
            return long_error(INVALID_REQUEST, "params must be an array", request_id)
        method = self.methods.get(name)
        if method is None:
            return long_error(METHOD_NOT_FOUND, f"method not found: {name}", request_id)
        try:
            result = method(session, params)
        except ApiError as e:
            self._debug(session, name, e.code)
            return long_error(e.code, e.message, request_id)
        except Exception:
            log.failure("api {method} from {peer}: internal error", method=name, peer=session.peer)
            return long_error(INTERNAL_ERROR, "internal error", request_id)
        if isinstance(result, Deferred):
            return result.addCallbacks(
                lambda value: long_reply(value, request_id),
                lambda failure: self._failed(failure, session, name, request_id),
            )
        return long_reply(result, request_id)

    def _failed(self, failure: Any, session: ApiSession, name: str, request_id: Any) -> bytes:
        if failure.check(ApiError):
            self._debug(session, name, failure.value.code)
            return long_error(failure.value.code, failure.value.message, request_id)
        log.failure("api {method} from {peer}: internal error", failure, method=name, peer=session.peer)
        return long_error(INTERNAL_ERROR, "internal error", request_id)

    def _debug(self, session: ApiSession, name: str, code: int) -> None:
        log.debug("api {method} from {peer}: error {code}", method=name, peer=session.peer, code=code)

    # Methods ---------------------------------------------------------------------------------

    def server_ping(self, session: ApiSession, params: list) -> dict:
        return {"status": "server.pong"}

    def queue_consume(self, session: ApiSession, params: list) -> dict:
        if not params or not all(valid_name(t) for t in params):
            raise ApiError(INVALID_PARAMS, "invalid params: expected one or more topic names")
        mine = self.queues.consumes(session)
        if len(set(params)) != len(params) or any(t in mine for t in params):
            raise ApiError(DUPLICATE_CONSUMPTION, "duplicate consumption")
        try:
            self.queues.consume(session, params)
        except QueueError as e:
            raise ApiError(CONSUME_FAILED, f"consume failed: {e}") from None
        return {"success": True}

    def queue_unconsume(self, session: ApiSession, params: list) -> dict:
        if params:
            raise ApiError(INVALID_PARAMS, "invalid params: expected []")
        if not self.queues.unconsume(session):
            raise ApiError(UNCONSUME_FAILED, "unconsume failed: nothing is consumed")
        return {"success": True}

    def conn_call(self, session: ApiSession, params: list) -> Any:
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
        result = self.router.call(client_id, func, args)

        def answer(error: str | None) -> dict:
            if error is not None:
                raise ApiError(CALL_FAILED, f"conn.call failed: {error}")
            return {"success": True}

        if isinstance(result, Deferred):
            return result.addCallback(answer)
        return answer(result)

    def mesh_send(self, session: ApiSession, params: list) -> Any:
        spec = _object_param(params)
        client_id = _client_id(spec.get("client_id"))
        data, binary = _payload(spec, "data", "type")
        result = self.router.send(client_id, data, binary)

        def answer(error: str | None) -> dict:
            if error is not None:
                raise ApiError(SEND_FAILED, f"send failed: {error}")
            return {"fail": 0, "success": True, "total": 1}

        if isinstance(result, Deferred):
            return result.addCallback(answer)
        return answer(result)

    def mesh_publish(self, session: ApiSession, params: list) -> Any:
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
