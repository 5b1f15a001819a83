"""Fuzzing the engine API (docs/api.md) over real WebSocket connections.

Thousands of generated malformed requests (seeded, so every run sends the same ones) go to the
real service tree over a few API connections: bad JSON, JSON that is not a request, wrong types
in every field of every method in both dialects, unknown methods, huge and deep values, NaN,
lone surrogates, invalid UTF-8 in binary frames.  Each one must get an error reply with the
one code its input class calls for, in the request's dialect (the long form where the request
cannot be read as one), echoing the request id (null where the id is unusable); an internal
error (-32603) or a reply that is not strict JSON fails the test.  The same corpus also runs
through the dispatcher without sockets.  Protocol-level violations (invalid UTF-8 in a text frame, oversized messages, broken
frames) go over throw-away connections and must end in a clean close with the RFC 6455 code.
Throughout, a well-behaved back-end on another connection keeps getting correct answers, and
at the end the node still serves new connections.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
from typing import Any, Callable, Iterator

import pytest
import websockets
from twisted.internet.defer import Deferred

from apihelpers import Engine
from conftest import in_asyncio, loopback_config, start_engine

SEED = 20240605
REQUESTS = 3000
CONNECTIONS = 3
BATCH = 50  # requests written before their replies are read (replies come in request order)

PARSE, INVALID_REQUEST, NOT_FOUND, INTERNAL = -32700, -32600, -32601, -32603
INVALID_PARAMS, CONSUME_FAILED, DUPLICATE, UNCONSUME_FAILED, CALL_FAILED, SEND_FAILED = (
    101, 201, 202, 203, 301, 401,
)
#: Codes a request may get from a node without users (docs/api.md, "Error codes"); -32603 is a bug
#: by definition.
SPEC_CODES = {INVALID_PARAMS, CONSUME_FAILED, DUPLICATE, UNCONSUME_FAILED, CALL_FAILED, SEND_FAILED,
              PARSE, INVALID_REQUEST, NOT_FOUND}
METHODS = {"server.ping", "queue.consume", "queue.unconsume", "conn.call", "mesh.send", "mesh.publish",
           "queue.pop", "queue.unpop"}
#: A well-formed client id that no connection has (node 0 is never handed out by the center).
ABSENT = "1000000000000000001"


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: str | bytes) -> Any:
    """Parse a reply as strict JSON: NaN / Infinity are not JSON, whatever Python accepts."""
    return json.loads(raw, parse_constant=_refuse)


# Generators ----------------------------------------------------------------------------------
#
# Each returns ``(payload, codes, request_id)``: the bytes of one WebSocket message, the error
# code its answer must carry (a set of one), and the id the reply must echo (``NO_ID`` when the
# reply cannot know it: parse errors and requests that are not objects answer with id null).
# The reply's dialect follows from the payload (``reply_dialect``).

NO_ID = object()


def not_a_request_code(payload: bytes) -> int:
    """The code for a message that is no request: text that is not strict JSON and JSON scalars
    are parse errors, arrays (batches) and objects without a "method" / "m" key invalid requests."""
    try:
        value = strict_json(payload)
    except (ValueError, RecursionError):
        return PARSE
    return INVALID_REQUEST if isinstance(value, (list, dict)) else PARSE


def reply_dialect(payload: bytes, codes: set[int]) -> str:
    """The dialect of the error reply to ``payload``: compact only for a request the engine parsed
    as an object with an "m" key and no "method" key; parse errors, batches, scalars and objects
    with neither or both keys answer in the long form."""
    if codes == {PARSE}:
        return "long"
    try:
        request = strict_json(payload)
    except (ValueError, RecursionError):
        return "long"
    return "compact" if isinstance(request, dict) and "m" in request and "method" not in request else "long"


class Fuzzer:
    """Deterministic generator of malformed API requests."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.counter = 0
        self.generators: list[Callable[[], tuple[bytes, set[int], Any]]] = [
            self.garbage_bytes, self.garbage_text, self.truncated, self.not_an_object,
            self.no_method_key, self.method_wrong_type, self.id_wrong_type, self.unknown_method,
            self.params_wrong_type, self.consume_bad_params, self.unconsume_bad_params,
            self.conn_call_bad, self.mesh_send_bad, self.mesh_publish_bad, self.huge_ids,
            self.deep_nesting, self.nan_and_infinity, self.invalid_utf8, self.lone_surrogates,
            self.huge_numbers,
        ]

    def __iter__(self) -> Iterator[tuple[bytes, set[int], Any, bool]]:
        while True:
            payload, codes, request_id = self.rng.choice(self.generators)()
            # Any request may come as a binary frame (treated as UTF-8, docs/api.md); bytes that are
            # not UTF-8 can only go in one (in a text frame they are a protocol violation).
            binary = self.rng.random() < 0.3 or not _is_utf8(payload)
            yield payload, codes, request_id, binary

    # Helpers ----------------------------------------------------------------------------------

    def next_id(self) -> Any:
        """A fresh JSON scalar id of a random kind (the reply must echo it)."""
        self.counter += 1
        kind = self.rng.randrange(6)
        if kind == 0:
            return self.counter
        if kind == 1:
            return f"id-{self.counter}-\u00e9\u4e2d\U0001f600"
        if kind == 2:
            return None
        if kind == 3:
            return self.counter + 0.5
        if kind == 4:
            return self.rng.choice([True, False])
        return -self.counter

    def request(self, dialect: str, method: Any, params: Any, request_id: Any = NO_ID) -> tuple[dict, Any]:
        """A request in ``dialect`` and its id (a fresh one unless given)."""
        if request_id is NO_ID:
            request_id = self.next_id()
        if dialect == "long":
            return {"method": method, "params": params, "id": request_id}, request_id
        return {"m": method, "p": params, "i": request_id}, request_id

    def dialect(self) -> str:
        return self.rng.choice(["long", "compact"])

    def wrong_value(self, *, allow_str: bool = True) -> Any:
        """A JSON value of a random (usually wrong) type."""
        pool: list[Any] = [None, True, False, 0, -1, 3.25, 1e308, [], [1, "a"], {}, {"x": [None]},
                           10 ** 30, -(10 ** 30), [[[]]], {"": {}}]
        if allow_str:
            pool += ["", " ", "has space", "\t", "x" * 300, "\u0000", "\ud800"]
        return self.rng.choice(pool)

    def bad_client_id(self) -> Any:
        return self.rng.choice([
            "", "abc", "12a", "-5", "0", 0, -1, 1.5, 1e18, True, False, None, [], {}, [ABSENT],
            "9" * 20, 2 ** 63, 10 ** 40, " 1000000000000000001", "１２３", "1e18", "0x10",
        ])

    def bad_name(self) -> Any:
        """A topic or channel name the engine refuses (connmix_tx/names.py), or a non-string."""
        return self.rng.choice([
            "", " ", "has space", "tab\there", "new\nline", "nul\u0000", "del\u007f", "x" * 256,
            "\u00e9" * 128, 42, None, True, [], {}, ["foo"], 1.5,
        ])

    def encode(self, request: Any, ascii_only: bool = True) -> bytes:
        return json.dumps(request, ensure_ascii=ascii_only).encode()

    # Categories -------------------------------------------------------------------------------

    def garbage_bytes(self) -> tuple[bytes, set[int], Any]:
        size = self.rng.choice([1, 2, 7, 64, 300, 4096])
        data = bytes(self.rng.randrange(256) for _ in range(size))
        return data, {not_a_request_code(data)}, NO_ID

    def garbage_text(self) -> tuple[bytes, set[int], Any]:
        alphabet = '{}[]":,.-+0123456789eEtruefalsnl \\/abc\u00e9\u4e2d'
        text = "".join(self.rng.choice(alphabet) for _ in range(self.rng.randrange(0, 200)))
        return text.encode(), {not_a_request_code(text.encode())}, NO_ID

    def truncated(self) -> tuple[bytes, set[int], Any]:
        request, _ = self.request(self.dialect(), "mesh.send", [{"client_id": ABSENT, "data": "x" * 20}])
        raw = self.encode(request)
        return raw[: self.rng.randrange(0, len(raw) - 1)], {PARSE}, NO_ID

    def not_an_object(self) -> tuple[bytes, set[int], Any]:
        value = self.rng.choice(['null', 'true', 'false', '0', '-1.5e3', '"server.ping"', '""'])
        if self.rng.random() < 0.4:
            value = self.rng.choice(['[]', '[{"method":"server.ping","params":[],"id":1}]', '[1,2]'])
            return value.encode(), {INVALID_REQUEST}, NO_ID
        return value.encode(), {PARSE}, NO_ID

    def no_method_key(self) -> tuple[bytes, set[int], Any]:
        request = self.rng.choice([
            {}, {"id": 1}, {"params": [], "id": 2}, {"p": {}, "i": 3}, {"Method": "server.ping"},
            {"method": "server.ping", "m": "server.ping", "params": [], "id": 4},
            {"method": "server.ping", "m": None},
        ])
        return self.encode(request), {INVALID_REQUEST}, None

    def method_wrong_type(self) -> tuple[bytes, set[int], Any]:
        """Without a method name the request is invalid as a whole: its id is not echoed (null)."""
        dialect = self.dialect()
        request, _ = self.request(dialect, self.wrong_value(allow_str=False), [])
        return self.encode(request), {INVALID_REQUEST}, None

    def id_wrong_type(self) -> tuple[bytes, set[int], Any]:
        dialect = self.dialect()
        request, _ = self.request(dialect, "server.ping", [])
        request["id" if dialect == "long" else "i"] = self.rng.choice([[], [1], {}, {"id": 1}, [[[]]]])
        return self.encode(request), {INVALID_REQUEST}, None

    def unknown_method(self) -> tuple[bytes, set[int], Any]:
        name = self.rng.choice([
            "", "server", "server.pong", "mesh.send ", "MESH.SEND", "queue.consume\u0000",
            "conn.call.x", "x" * self.rng.choice([1, 100, 65536]), "\u00e9\u4e2d\U0001f600",
            "".join(chr(self.rng.randrange(32, 0x2000)) for _ in range(20)),
        ])
        if name in METHODS:
            name += "!"
        request, request_id = self.request(self.dialect(), name, [])
        return self.encode(request, ascii_only=self.rng.random() < 0.5), {NOT_FOUND}, request_id

    def params_wrong_type(self) -> tuple[bytes, set[int], Any]:
        dialect = self.dialect()
        method = self.rng.choice(["server.ping", "queue.consume", "conn.call", "mesh.send", "mesh.publish"])
        if dialect == "long":
            params = self.rng.choice([None, 1, "x", True, {}, {"client_id": ABSENT}, 1.5])
        else:
            params = self.rng.choice([None, 1, "x", True, 1.5])
        request, request_id = self.request(dialect, method, params)
        return self.encode(request), {INVALID_REQUEST}, request_id

    def consume_bad_params(self) -> tuple[bytes, set[int], Any]:
        dialect = self.dialect()
        bad = [self.bad_name() for _ in range(self.rng.randrange(1, 4))]
        if dialect == "long":
            params: Any = self.rng.choice([[], bad, ["ok-topic", *bad]])
            method = "queue.consume"
        else:
            method = self.rng.choice(["queue.pop", "queue.consume"])
            params = self.rng.choice([{"t": bad}, {"t": []}, {"t": "foo"}, {"t": None}, {}, [bad], bad, [[]]])
            if params == [bad] and all(isinstance(b, str) for b in bad):
                params = {"t": bad}
        request, request_id = self.request(dialect, method, params)
        return self.encode(request), {INVALID_PARAMS}, request_id

    def unconsume_bad_params(self) -> tuple[bytes, set[int], Any]:
        dialect = self.dialect()
        if self.rng.random() < 0.3:  # well-formed, but this connection consumes nothing
            request, request_id = self.request(dialect, "queue.unconsume", [])
            return self.encode(request), {UNCONSUME_FAILED}, request_id
        if dialect == "long":
            params: Any = [self.wrong_value()]
        else:
            params = self.rng.choice([[1], ["foo"], {"t": ["foo"]}, {"x": 1}, [{"t": 1}], [None]])
        method = "queue.unconsume" if dialect == "long" else self.rng.choice(["queue.unpop", "queue.unconsume"])
        request, request_id = self.request(dialect, method, params)
        return self.encode(request), {INVALID_PARAMS}, request_id

    def conn_call_bad(self) -> tuple[bytes, set[int], Any]:
        dialect = self.dialect()
        spec = {"client_id": ABSENT, "func": "subscribe", "args": ["room"]}
        field = self.rng.choice(["client_id", "func", "args", "args_shape", "missing", "absent"])
        codes = {INVALID_PARAMS}
        if field == "client_id":
            spec["client_id"] = self.bad_client_id()
        elif field == "func":
            spec["func"] = self.rng.choice([self.wrong_value(), "eval", "send", "Subscribe", "close "])
        elif field == "args":
            spec["args"] = self.wrong_value()
            if spec["args"] == [1, "a"]:
                spec["args"] = {"a": 1}
        elif field == "args_shape":
            spec["func"], spec["args"] = self.rng.choice([
                ("set_context_value", []), ("set_context_value", ["k"]), ("set_context_value", [1.5, 1]),
                ("set_context_value", [None, 1]), ("set_context_value", ["a", 1, 2]),
                ("set_context", []), ("set_context", ["x"]), ("set_context", [[]]), ("set_context", [{}, {}]),
                ("subscribe", []), ("subscribe", ["bad name"]), ("subscribe", [1]), ("unsubscribe", [None]),
                ("close", ["now"]), ("unsubscribe", ["ok", ""]),
            ])
        elif field == "missing":
            del spec[self.rng.choice(["client_id", "func"])]
        else:  # well-formed, but nobody has that client id
            spec["func"], spec["args"] = self.rng.choice([
                ("set_context_value", ["k", {"v": [1, None, "x"]}]), ("set_context", [{"a": 1}]),
                ("subscribe", ["a", "b"]), ("unsubscribe", ["a"]), ("close", []),
            ])
            codes = {CALL_FAILED}
        if dialect == "long":
            params: Any = [spec]
        else:
            keys = {"client_id": "c", "func": "f", "args": "a"}
            params = {keys[k]: v for k, v in spec.items()}
            if self.rng.random() < 0.3:
                params = [params]
        request, request_id = self.request(dialect, "conn.call", params)
        return self.encode(request), codes, request_id

    def mesh_send_bad(self) -> tuple[bytes, set[int], Any]:
        dialect = self.dialect()
        spec: dict[str, Any] = {"client_id": ABSENT, "data": "hello"}
        field = self.rng.choice(["client_id", "data", "type", "base64", "missing", "absent", "shape"])
        codes = {INVALID_PARAMS}
        if field == "client_id":
            spec["client_id"] = self.bad_client_id()
        elif field == "data":
            spec["data"] = self.wrong_value(allow_str=False)
        elif field == "type":
            spec["type"] = self.rng.choice(["TEXT", "bin", "", None, 1, ["text"], "json"])
        elif field == "base64":
            spec["type"] = "binary"
            spec["data"] = self.rng.choice(["!!!", "abc", "a===", "YW Jj", "\u00e9", "AP8"])
        elif field == "missing":
            del spec[self.rng.choice(["client_id", "data"])]
        elif field == "shape":
            params_long: Any = self.rng.choice([[], [spec, spec], ["x"], [[spec]]])
            request, request_id = self.request(dialect, "mesh.send", params_long if dialect == "long" else [1, 2])
            return self.encode(request), {INVALID_PARAMS}, request_id
        else:  # well-formed, nobody there
            if self.rng.random() < 0.5:
                spec["type"] = "binary"
                spec["data"] = base64.b64encode(bytes(range(8))).decode()
            codes = {SEND_FAILED}
        if dialect == "long":
            params: Any = [spec]
        else:
            keys = {"client_id": "c", "data": "d", "type": "t"}
            params = {keys[k]: v for k, v in spec.items()}
        request, request_id = self.request(dialect, "mesh.send", params)
        return self.encode(request), codes, request_id

    def mesh_publish_bad(self) -> tuple[bytes, set[int], Any]:
        dialect = self.dialect()
        spec: dict[str, Any] = {"channel": "room", "data": "hello"}
        field = self.rng.choice(["channel", "data", "type", "missing"])
        if field == "channel":
            spec["channel"] = self.bad_name()
        elif field == "data":
            spec["data"] = self.wrong_value(allow_str=False)
        elif field == "type":
            spec["type"] = self.rng.choice(["TEXT", "", None, 7, {}])
        else:
            del spec[self.rng.choice(["channel", "data"])]
        if dialect == "long":
            params: Any = [spec]
        else:
            keys = {"channel": "c", "data": "d", "type": "t"}
            params = {keys[k]: v for k, v in spec.items()}
        request, request_id = self.request(dialect, "mesh.publish", params)
        return self.encode(request), {INVALID_PARAMS}, request_id

    def huge_ids(self) -> tuple[bytes, set[int], Any]:
        """Big but finite ids are JSON scalars: echoed exactly (1e400 is refused, see below)."""
        dialect = self.dialect()
        request_id = self.rng.choice([
            10 ** 300, -(10 ** 300), 2 ** 64, 1.7976931348623157e308, -1.7976931348623157e308,
            5e-324, 0.1, "i" * 100_000, "\u4e2d" * 10_000, "",
        ])
        request = {"method": "no.such", "params": [], "id": request_id} if dialect == "long" \
            else {"m": "no.such", "p": {}, "i": request_id}
        return self.encode(request), {NOT_FOUND}, request_id

    def deep_nesting(self) -> tuple[bytes, set[int], Any]:
        depth = self.rng.choice([10_000, 50_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        deep = opener * depth + "1" + closer * depth if opener != "[" else opener * depth + closer * depth
        where = self.rng.choice(["whole", "params", "id", "data"])
        if where == "whole":
            raw = deep
        elif where == "params":
            raw = '{"method":"mesh.send","params":[' + deep + '],"id":1}'
        elif where == "id":
            raw = '{"m":"server.ping","p":{},"i":' + deep + "}"
        else:
            raw = '{"method":"mesh.send","params":[{"client_id":"' + ABSENT + '","data":' + deep + '}],"id":1}'
        return raw.encode(), {PARSE}, NO_ID

    def nan_and_infinity(self) -> tuple[bytes, set[int], Any]:
        constant = self.rng.choice(["NaN", "Infinity", "-Infinity"])
        template = self.rng.choice([
            '{"method":"server.ping","params":[],"id":%s}',
            '{"method":"mesh.send","params":[{"client_id":%s,"data":"x"}],"id":1}',
            '{"m":"mesh.publish","p":{"c":"room","d":%s},"i":1}',
            '{"method":"conn.call","params":[{"client_id":"' + ABSENT + '","func":"set_context_value","args":["k",%s]}],"id":1}',
            '[%s]',
            '%s',
        ])
        return (template % constant).encode(), {PARSE}, NO_ID

    def invalid_utf8(self) -> tuple[bytes, set[int], Any]:
        # (UTF-8-encoded surrogates, b"\xed\xa0\x80", are refused: see below.)
        bad = self.rng.choice([b"\xff", b"\xc0\xaf", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x80", b"\xfe\xff"])
        template = self.rng.choice([
            b'{"method":"server.ping","params":[],"id":"%s"}',
            b'{"method":"%s","params":[],"id":1}',
            b'{"m":"mesh.send","p":{"c":"' + ABSENT.encode() + b'","d":"%s"},"i":1}',
            b'%s{"method":"server.ping","params":[],"id":1}',
        ])
        return template.replace(b"%s", bad), {PARSE}, NO_ID

    def lone_surrogates(self) -> tuple[bytes, set[int], Any]:
        """Escaped lone surrogates are valid JSON text; where they land decides the error."""
        surrogate = self.rng.choice(["\ud800", "\udfff", "\udc00x", "a\ud83d"])
        dialect = self.dialect()
        case = self.rng.randrange(4)
        if case == 0:
            request, request_id = self.request(dialect, "method." + surrogate, [])
            return self.encode(request), {NOT_FOUND}, request_id
        if case == 1:
            params = [{"client_id": ABSENT, "data": surrogate}] if dialect == "long" else {"c": ABSENT, "d": surrogate}
            request, request_id = self.request(dialect, "mesh.send", params)
            return self.encode(request), {SEND_FAILED}, request_id
        if case == 2:
            spec = {"client_id": ABSENT, "func": "set_context_value", "args": [surrogate, surrogate]}
            request, request_id = self.request(dialect, "conn.call", [spec] if dialect == "long" else
                                               {"c": ABSENT, "f": "set_context_value", "a": [surrogate, 1]})
            return self.encode(request), {CALL_FAILED}, request_id
        # A surrogate as the client id, and as the request id (echoed, escaped).
        params = [{"client_id": surrogate, "data": "x"}] if dialect == "long" else {"c": surrogate, "d": "x"}
        request, request_id = self.request(dialect, "mesh.send", params, request_id=surrogate)
        return self.encode(request), {INVALID_PARAMS}, request_id

    def huge_numbers(self) -> tuple[bytes, set[int], Any]:
        number = self.rng.choice(["1e400", "-1e400", "1" + "0" * 400, "9" * 4000, "1e-400", "123456789" * 10,
                                  "-0", "0.0", "1E+2"])
        template = self.rng.choice([
            ('{"method":"mesh.send","params":[{"client_id":%s,"data":"x"}],"id":7}', {INVALID_PARAMS}, 7),
            ('{"m":"mesh.send","p":{"c":"' + ABSENT + '","d":%s},"i":8}', {INVALID_PARAMS}, 8),
            ('{"method":"queue.consume","params":[%s],"id":9}', {INVALID_PARAMS}, 9),
            ('{"method":"mesh.publish","params":[{"channel":%s,"data":"x"}],"id":10}', {INVALID_PARAMS}, 10),
            ('{"method":"conn.call","params":[{"client_id":"' + ABSENT + '","func":"subscribe","args":[%s]}],"id":11}',
             {INVALID_PARAMS}, 11),
        ])
        raw, codes, request_id = template
        if number in ("1e400", "-1e400", "1" + "0" * 400, "9" * 4000):
            # Beyond any double (Lua numbers are doubles): refused while parsing.
            return (raw % number).encode(), {PARSE}, None
        return (raw % number).encode(), codes, request_id


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Checking replies ----------------------------------------------------------------------------

def check_error_reply(raw: str | bytes, codes: set[int], request_id: Any, sent: bytes) -> int:
    """Assert ``raw`` is a strict-JSON error reply in the dialect ``sent`` calls for, with one of
    ``codes``, echoing ``request_id`` (null for ``NO_ID``); return the code."""
    where = f"request {sent[:200]!r}"
    reply = strict_json(raw)
    assert isinstance(reply, dict), where
    dialect = reply_dialect(sent, codes)
    assert ("E" in reply) == (dialect == "compact"), (f"expected a {dialect} reply", reply, where)
    if "E" in reply:
        assert set(reply) == {"E", "r", "i"} and reply["r"] is None, (reply, where)
        error, echoed = reply["E"], reply["i"]
        code, message = error["c"], error["m"]
    else:
        assert set(reply) == {"error", "id"}, (reply, where)
        error, echoed = reply["error"], reply["id"]
        code, message = error["code"], error["message"]
    assert code != INTERNAL, f"internal error for {where}"
    assert code in codes, f"code {code} ({message}) not in {codes} for {where}"
    assert isinstance(message, str) and message, where
    if request_id is NO_ID:
        assert echoed is None, where
    elif isinstance(request_id, float):
        assert isinstance(echoed, float) and math.isclose(echoed, request_id, rel_tol=0, abs_tol=0), where
    else:
        assert echoed == request_id and type(echoed) is type(request_id), (echoed, where)
    return code


class WellBehaved:
    """A correct back-end and a correct end user, checked between fuzz batches."""

    def __init__(self, api: Any, client: Any, client_id: str) -> None:
        self.api = api
        self.client = client
        self.client_id = client_id
        self.next_id = 1000
        self.checks = 0

    async def call(self, request: dict, id_key: str = "id") -> dict:
        """Send one request; return its reply (queue events that arrive first are checked)."""
        self.next_id += 1
        request[id_key] = self.next_id
        await self.api.send(json.dumps(request))
        while True:
            reply = strict_json(await asyncio.wait_for(self.api.recv(), 10))
            if "event" in reply:
                assert reply["result"]["client_id"] == self.client_id
                continue
            assert reply[id_key] == self.next_id, reply
            return reply

    async def check(self) -> None:
        assert await self.call({"method": "server.ping", "params": []}) == {
            "error": None, "result": {"status": "server.pong"}, "id": self.next_id}
        assert (await self.call({"m": "server.ping", "p": {}}, "i"))["r"] == {"m": "server.pong"}
        # Text that is not UTF-8 is refused (401) and nothing reaches the client ...
        reply = await self.call({"method": "mesh.send", "params": [{"client_id": self.client_id, "data": "\ud800"}]})
        assert reply["error"]["code"] == SEND_FAILED, reply
        # ... which receives the next message as its next one.
        text = f"ping {self.checks} \u00e9\u4e2d"
        reply = await self.call({"method": "mesh.send", "params": [{"client_id": self.client_id, "data": text}]})
        assert reply["result"] == {"fail": 0, "success": True, "total": 1}, reply
        assert await asyncio.wait_for(self.client.recv(), 10) == text
        await self.client.send(f"from client {self.checks}")
        event = strict_json(await asyncio.wait_for(self.api.recv(), 10))
        assert event["event"] == "queue.consume"
        assert event["result"]["data"]["msg"]["data"] == f"from client {self.checks}"
        self.checks += 1


async def fuzz_connection(url: str, requests: list[tuple[bytes, set[int], Any, bool]],
                          between: Callable[[], Any]) -> dict[int, int]:
    """Send ``requests`` in pipelined batches on one connection; return the codes seen."""
    seen: dict[int, int] = {}
    async with websockets.connect(url, max_size=None, ping_interval=None, max_queue=None) as api:
        for start in range(0, len(requests), BATCH):
            batch = requests[start:start + BATCH]
            for payload, _, _, binary in batch:
                if binary:
                    await api.send(payload)
                else:
                    await api.send(payload.decode("utf-8"))
            for payload, codes, request_id, _ in batch:
                raw = await asyncio.wait_for(api.recv(), 20)
                code = check_error_reply(raw, codes, request_id, payload)
                seen[code] = seen.get(code, 0) + 1
            await between()
    return seen


@in_asyncio
async def test_thousands_of_malformed_requests_get_error_replies() -> None:
    requests = list(_take(Fuzzer(SEED), REQUESTS))
    engine = await start_engine(loopback_config())
    try:
        async with websockets.connect(engine.client_url) as client, \
                websockets.connect(engine.api_url, max_queue=None) as good_api:
            await good_api.send('{"method":"queue.consume","params":["foo"],"id":1}')
            assert strict_json(await good_api.recv())["result"] == {"success": True}
            await client.send("hello")
            client_id = strict_json(await asyncio.wait_for(good_api.recv(), 5))["result"]["client_id"]
            good = WellBehaved(good_api, client, client_id)
            guard = asyncio.Lock()

            async def between() -> None:
                async with guard:  # one well-behaved exchange at a time
                    await good.check()

            share = len(requests) // CONNECTIONS
            results = await asyncio.gather(*(
                fuzz_connection(engine.api_url, requests[i * share:(i + 1) * share], between)
                for i in range(CONNECTIONS)
            ))
            await good.check()

        counts: dict[int, int] = {}
        for seen in results:
            for code, count in seen.items():
                counts[code] = counts.get(code, 0) + count
        print(f"fuzz: {sum(counts.values())} requests, error codes {dict(sorted(counts.items()))}, "
              f"{good.checks} well-behaved checks")
        assert sum(counts.values()) == share * CONNECTIONS
        # Every category was exercised.
        assert {PARSE, INVALID_REQUEST, NOT_FOUND, INVALID_PARAMS, UNCONSUME_FAILED, CALL_FAILED,
                SEND_FAILED} <= set(counts)
        assert good.checks >= REQUESTS // BATCH

        # The node still serves a newcomer, and the fuzzing connections left nothing behind.
        async with websockets.connect(engine.api_url) as late:
            await late.send('{"m":"server.ping","p":[],"i":"late"}')
            assert strict_json(await asyncio.wait_for(late.recv(), 5)) == {
                "E": None, "r": {"m": "server.pong"}, "i": "late"}
        for _ in range(100):  # the closes reach the server within a few turns
            if not engine.service.engine.api_factory.open_protocols:
                break
            await asyncio.sleep(0.02)
        assert not engine.service.engine.api_factory.open_protocols
        assert not any(topic.consumers for topic in engine.service.engine.queues.topics.values())
    finally:
        await engine.stop()


def _take(iterator: Any, count: int) -> Iterator[Any]:
    for _, item in zip(range(count), iterator):
        yield item


def test_the_fuzz_corpus_is_deterministic() -> None:
    first = [r[0] for r in _take(Fuzzer(SEED), 300)]
    second = [r[0] for r in _take(Fuzzer(SEED), 300)]
    assert first == second


def test_every_fuzz_request_has_one_expected_code_and_both_dialects_occur() -> None:
    cases = list(_take(Fuzzer(SEED), REQUESTS))
    assert all(len(codes) == 1 for _, codes, _, _ in cases)
    dialects = {reply_dialect(payload, codes) for payload, codes, _, _ in cases}
    assert dialects == {"long", "compact"}


def test_the_fuzz_corpus_through_the_dispatcher_gets_exact_codes_ids_and_dialects() -> None:
    """The same corpus without sockets: every reply is checked as over the wire (code, id, dialect)."""
    engine = Engine()
    seen: dict[int, int] = {}
    for payload, codes, request_id, _ in _take(Fuzzer(SEED), REQUESTS):
        reply = engine.dispatcher.handle(engine.session, payload)
        if isinstance(reply, Deferred):
            got: list = []
            reply.addBoth(got.append)
            reply = got[0]
        code = check_error_reply(reply, codes, request_id, payload)
        seen[code] = seen.get(code, 0) + 1
    assert {PARSE, INVALID_REQUEST, NOT_FOUND, INVALID_PARAMS, UNCONSUME_FAILED, CALL_FAILED,
            SEND_FAILED} <= set(seen)


# Protocol-level violations: a clean close with the RFC 6455 code -------------------------------

def client_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame, built by hand so that it can break the rules."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = bytes([first, mask_bit | length])
    elif length < 65536:
        header = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    key = b"\x01\x02\x03\x04"
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def raw_api_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_close_code(reader: asyncio.StreamReader) -> int | None:
    """Read server frames until a close frame (its code) or EOF (None)."""
    while True:
        try:
            head = await asyncio.wait_for(reader.readexactly(2), 5)
        except asyncio.IncompleteReadError:
            return None
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(length)
        if head[0] & 0x0F == 0x8:
            return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


VIOLATIONS = {
    "reserved opcode": (client_frame(0x3, b"x"), 1002),
    "reserved control opcode": (client_frame(0xB, b""), 1002),
    "rsv bits without extension": (client_frame(0x1, b"{}", rsv=0b100), 1002),
    "unmasked client frame": (client_frame(0x1, b"{}", masked=False), 1002),
    "fragmented ping": (client_frame(0x9, b"x", fin=False), 1002),
    "continuation without start": (client_frame(0x0, b"x"), 1002),
    "control frame too long": (client_frame(0x9, b"x" * 126), 1002),
    "invalid utf-8 in a text frame": (client_frame(0x1, b'{"method":"\xff"}'), 1007),
    # Autobahn|Testsuite 7.9.x accepts a 1002 close or a dropped TCP connection here.
    "invalid close code": (client_frame(0x8, (999).to_bytes(2, "big")), (1002, "dropped")),
    "message over maxMessageSize": (client_frame(0x2, b"[" * (512 * 1024 + 1)), 1009),
}


@in_asyncio
async def test_protocol_violations_close_cleanly_and_the_node_keeps_serving() -> None:
    engine = await start_engine(loopback_config())
    try:
        async with websockets.connect(engine.api_url) as good:
            for name, (frame, code) in VIOLATIONS.items():
                reader, writer = await raw_api_connection(engine.api_port)
                writer.write(frame)
                try:
                    got: Any = await read_close_code(reader)
                except ConnectionResetError:
                    got = "dropped"
                assert got in code if isinstance(code, tuple) else got == code, (name, got)
                if got != "dropped":
                    # Complete the close handshake; the server then ends the TCP connection
                    # (Autobahn's server aborts it once the handshake is over: a reset is fine).
                    writer.write(client_frame(0x8, got.to_bytes(2, "big")))
                    try:
                        assert await asyncio.wait_for(reader.read(), 5) == b"", name
                    except ConnectionResetError:
                        pass
                writer.close()
                await good.send(json.dumps({"method": "server.ping", "params": [], "id": name}))
                assert strict_json(await asyncio.wait_for(good.recv(), 5))["id"] == name
        # Through the websockets client too: a message larger than maxMessageSize is 1009.
        async with websockets.connect(engine.api_url, max_size=None) as big:
            await big.send("x" * (512 * 1024 + 1))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(big.recv(), 5)
        assert big.close_code == 1009
    finally:
        await engine.stop()


# Known bugs found by the fuzzer ------------------------------------------------------------------

def assert_long_parse_error(raw: str | bytes) -> None:
    """A parse error is answered in the long form with id null, whatever the request's dialect."""
    reply = strict_json(raw)  # raises on Infinity / NaN
    assert set(reply) == {"error", "id"} and reply["id"] is None, reply
    assert reply["error"]["code"] == PARSE and reply["error"]["message"], reply


async def assert_still_serving(api: Any, request_id: str) -> None:
    await api.send('{"m":"server.ping","p":{},"i":"%s"}' % request_id)
    assert strict_json(await asyncio.wait_for(api.recv(), 5)) == {
        "E": None, "r": {"m": "server.pong"}, "i": request_id}


@in_asyncio
async def test_an_overflowing_id_gets_a_parse_error_with_id_null_in_both_dialects() -> None:
    engine = await start_engine(loopback_config())
    try:
        async with websockets.connect(engine.api_url) as api:
            for raw in ('{"method":"server.ping","params":[],"id":1e400}', '{"m":"server.ping","p":{},"i":1e400}',
                        '{"method":"server.ping","params":[],"id":-1e400}'):
                await api.send(raw)
                assert_long_parse_error(await asyncio.wait_for(api.recv(), 5))
            await assert_still_serving(api, "after")
    finally:
        await engine.stop()


@pytest.mark.parametrize("value", ["1e400", "1" + "0" * 400], ids=["float-overflow", "int-overflow"])
@in_asyncio
async def test_conn_call_refuses_numbers_lua_cannot_hold(value: str) -> None:
    """A number beyond any double (Lua numbers are doubles) is refused while parsing, in both
    dialects; the connection it was meant for keeps working."""
    engine = await start_engine(loopback_config())
    try:
        async with websockets.connect(engine.client_url) as client, websockets.connect(engine.api_url) as api:
            await api.send('{"method":"queue.consume","params":["foo"],"id":1}')
            assert strict_json(await asyncio.wait_for(api.recv(), 5))["result"] == {"success": True}
            await client.send("first")
            client_id = strict_json(await asyncio.wait_for(api.recv(), 5))["result"]["client_id"]
            spec = '{"client_id":"%s","func":"set_context_value","args":["n",%s]}' % (client_id, value)
            await api.send('{"method":"conn.call","params":[%s],"id":2}' % spec)
            assert_long_parse_error(await asyncio.wait_for(api.recv(), 5))
            compact = '{"c":"%s","f":"set_context_value","a":["n",%s]}' % (client_id, value)
            await api.send('{"m":"conn.call","p":%s,"i":3}' % compact)
            assert_long_parse_error(await asyncio.wait_for(api.recv(), 5))
            await client.send("second")
            event = strict_json(await asyncio.wait_for(api.recv(), 5))
            assert event["result"]["data"]["msg"]["data"] == "second"
            assert "n" not in event["result"]["data"]["ctx"]  # nothing was set
    finally:
        await engine.stop()


@in_asyncio
async def test_binary_request_with_encoded_surrogates_is_a_parse_error() -> None:
    engine = await start_engine(loopback_config())
    try:
        async with websockets.connect(engine.api_url) as api:
            for raw in (b'{"method":"server.ping","params":[],"id":"\xed\xa0\x80"}',
                        b'{"m":"server.ping","p":{},"i":"\xed\xa0\x80"}'):
                await api.send(raw)
                assert_long_parse_error(await asyncio.wait_for(api.recv(), 5))
            await assert_still_serving(api, "after")
    finally:
        await engine.stop()
