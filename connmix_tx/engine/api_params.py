"""The params and results of the engine API's methods, checked: long form in, long form out.

Plain functions, no state: each turns the long ``params`` array of a method into the arguments of
the router (or raises ``ApiError(101)`` saying what is wrong), or the router's outcome into the
long ``result`` (or raises the method's error).  The dispatcher (connmix_tx/engine/api.py) and its
fast path share them, so a ``mesh.send`` answers the same whichever way it went.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from connmix_tx.engine.api_wire import CALL_FAILED, INVALID_PARAMS, SEND_FAILED, ApiError
from connmix_tx.engine.router import CALL_FUNCS, valid_call_args
from connmix_tx.ids import InvalidClientId, parse_client_id

__all__ = [
    "CALLED", "SENT", "call_args", "called", "client_id_param", "object_param", "payload", "published",
    "scalar", "send_args", "sent",
]

#: The long results of a successful ``mesh.send`` / ``conn.call``.
SENT = {"fail": 0, "success": True, "total": 1}
CALLED = {"success": True}


def send_args(params: list) -> tuple[int, bytes, bool]:
    """``mesh.send`` params -> (client_id, data, binary); raises ApiError(101)."""
    spec = object_param(params)
    client_id = client_id_param(spec.get("client_id"))
    data, binary = payload(spec, "data", "type")
    return client_id, data, binary


def call_args(params: list) -> tuple[int, str, list]:
    """``conn.call`` params -> (client_id, func, args); raises ApiError(101)."""
    spec = object_param(params)
    client_id = client_id_param(spec.get("client_id"))
    func = spec.get("func")
    args = spec.get("args", [])
    if func not in CALL_FUNCS:
        raise ApiError(INVALID_PARAMS, f"invalid params: unknown func {func!r}")
    if not isinstance(args, list):
        raise ApiError(INVALID_PARAMS, "invalid params: args must be an array")
    if not valid_call_args(func, args):
        raise ApiError(INVALID_PARAMS, f"invalid params: wrong args for {func}")
    return client_id, func, args


def sent(error: str | None) -> dict:
    """The result of a ``mesh.send`` that ended with ``error`` (None: delivered); raises 401."""
    if error is not None:
        raise ApiError(SEND_FAILED, f"send failed: {error}")
    return SENT


def called(error: str | None) -> dict:
    """The result of a ``conn.call`` that ended with ``error`` (None: applied); raises 301."""
    if error is not None:
        raise ApiError(CALL_FAILED, f"conn.call failed: {error}")
    return CALLED


def scalar(value: Any) -> bool:
    """Whether ``value`` may be a request id (a JSON scalar)."""
    return value is None or isinstance(value, (str, int, float, bool))


def object_param(params: list) -> dict:
    """The one object of ``params``; raises 101 otherwise."""
    if len(params) != 1 or not isinstance(params[0], dict):
        raise ApiError(INVALID_PARAMS, "invalid params: expected one object")
    return params[0]


def client_id_param(value: Any) -> int:
    """The client id written in ``value``; raises 101 for anything else."""
    try:
        return parse_client_id(value)
    except InvalidClientId:
        raise ApiError(INVALID_PARAMS, "invalid params: bad client_id") from None


def payload(spec: dict, data_key: str, type_key: str) -> tuple[bytes, bool]:
    """The ``(data, binary)`` of a send or publish: text, or base64 with ``"type": "binary"``."""
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


def published(counts: tuple[int, int]) -> dict:
    """The long result of a ``mesh.publish`` that reached ``(success, fail)`` connections."""
    success, fail = counts
    return {"fail": fail, "success": True, "total": success + fail}
