"""Who may use the API listeners (docs/api.md, "Authentication and roles"): protected mode,
``access.users``, roles.

``AccessControl`` is plain Python: ``check()`` decides one HTTP request (the WebSocket handshake
included) from the peer IP, the ``Authorization`` header and, on ``/ws/v1`` only, the
``?username=&password=`` query; ``allows()`` answers the per-request role question by user *name*,
so that a reload (``replace()``) changes the roles of connections that are already open.

``AccessGuard`` is the thin Twisted Web side: it wraps the root resource of a ``Site`` and answers
401 / 403 before any child resource (WebSocket upgrade, HTTP API, 404) sees the request.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from fnmatch import fnmatchcase
from typing import Mapping, NamedTuple, Sequence
from urllib.parse import parse_qs

from twisted.internet.address import UNIXAddress
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from connmix_tx.config import AccessConfig, UserConfig
from connmix_tx.web import json_response

#: Error -32001 (docs/api.md, "Error codes"): no valid credentials, or a role is missing.
UNAUTHORIZED = -32001

READ, WRITE = "read", "write"

UNAUTHORIZED_BODY = b'{"E":{"c":-32001,"m":"unauthorized"},"r":null}'
PROTECTED_BODY = (
    b'{"E":{"c":-32001,"m":"protected mode: configure access.users or set access.protected: false"},'
    b'"r":null}'
)
HOST_FORBIDDEN_BODY = b'{"E":{"c":-32001,"m":"forbidden: host not allowed for this user"},"r":null}'
ROLE_FORBIDDEN_BODY = b'{"E":{"c":-32001,"m":"forbidden: the read role is required"},"r":null}'
WWW_AUTHENTICATE = 'Basic realm="connmix"'

#: The listener kinds of the protected-mode warning and the namespace each one logs under.
_LISTENER_LOGS = {"api": Logger(namespace="connmix.api"), "center api": Logger(namespace="connmix.center")}


class Verdict(NamedTuple):
    """The answer to one request: ``status`` 200 admits ``user`` (None when no users exist)."""

    user: UserConfig | None
    status: int
    body: bytes

    @property
    def admitted(self) -> bool:
        return self.status == 200

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that go with a refusal (the Basic challenge of a 401)."""
        return {"WWW-Authenticate": WWW_AUTHENTICATE} if self.status == 401 else {}


def is_loopback(peer_ip: str) -> bool:
    """127.0.0.0/8, ::1 (with or without a zone, ``::1%lo``) and IPv4-mapped loopback; anything
    unparsable is not loopback.  The API listeners' protected mode and the PB listeners' guard
    (``connmix_tx.pb.GuardedPBServerFactory``) both ask it."""
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _host_text(peer_ip: str) -> str:
    """The IP text the ``host`` globs are matched against (IPv4-mapped IPv6 as plain IPv4)."""
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return peer_ip


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(username, password)`` of an ``Authorization: Basic …`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, colon, password = text.partition(":")
    return (username, password) if colon else None


def query_credentials(query: Mapping[str, Sequence[str]] | None) -> tuple[str, str] | None:
    """``(username, password)`` from ``?username=…&password=…`` (first values), or None."""
    if not query:
        return None
    username, password = query.get("username"), query.get("password")
    if not username or not password:
        return None
    return username[0], password[0]


class AccessControl:
    """The ``access`` section applied to requests; ``replace()`` swaps it (SIGHUP,
    docs/operations.md)."""

    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self._listeners: list[tuple[str, str, int]] = []

    @property
    def open(self) -> bool:
        """True when no users exist and protected mode is off: anyone is admitted."""
        return not self.config.users and not self.config.protected

    def replace(self, config: AccessConfig) -> None:
        """Use ``config`` from the next request on; warn again if the listeners became open."""
        was_open = self.open
        self.config = config
        if self.open and not was_open:
            for kind, bind, port in self._listeners:
                self._warn(kind, bind, port)

    def add_listener(self, kind: str, bind: str, port: int) -> None:
        """Record an API listener (``kind`` ``api`` or ``center api``) and warn if it is open.

        docs/api.md, "No users: protected mode": with no users and ``protected: false``, each
        listener bound to a non-loopback address logs ``access.users is empty: the {kind} server on
        {bind}:{port} accepts anyone``.
        """
        self._listeners.append((kind, bind, port))
        if self.open:
            self._warn(kind, bind, port)

    def _warn(self, kind: str, bind: str, port: int) -> None:
        if is_loopback(bind):
            return
        _LISTENER_LOGS[kind].warn(
            "access.users is empty: the {kind} server on {bind}:{port} accepts anyone",
            kind=kind, bind=bind, port=port,
        )

    def check(
        self,
        peer_ip: str | None,
        authorization: str | None,
        query: Mapping[str, Sequence[str]] | None = None,
    ) -> Verdict:
        """Decide one request.

        ``peer_ip`` is the client's IP text, or None for a local (UNIX socket) peer;
        ``authorization`` the ``Authorization`` header; ``query`` the decoded query parameters,
        passed only for the ``/ws/v1`` handshake (the only place docs/api.md accepts them).
        The Basic header wins over the query when both are present.
        """
        config = self.config
        local = peer_ip is None or is_loopback(peer_ip)
        if not config.users:
            if config.protected and not local:
                return Verdict(None, 403, PROTECTED_BODY)
            return Verdict(None, 200, b"")
        credentials = basic_credentials(authorization) or query_credentials(query)
        user = self._verify(*credentials) if credentials is not None else None
        if user is None:
            return Verdict(None, 401, UNAUTHORIZED_BODY)
        if peer_ip is not None and not fnmatchcase(_host_text(peer_ip), user.host):
            return Verdict(None, 403, HOST_FORBIDDEN_BODY)
        if READ not in user.roles:
            return Verdict(None, 403, ROLE_FORBIDDEN_BODY)
        return Verdict(user, 200, b"")

    def _verify(self, username: str, password: str) -> UserConfig | None:
        """The user with these credentials; every user is compared, each in constant time."""
        name, secret = username.encode("utf-8", "surrogatepass"), password.encode("utf-8", "surrogatepass")
        found = None
        for user in self.config.users:
            same_name = hmac.compare_digest(user.username.encode("utf-8", "surrogatepass"), name)
            same_password = hmac.compare_digest(user.password.encode("utf-8", "surrogatepass"), secret)
            if same_name and same_password and found is None:
                found = user
        return found

    def allows(self, username: str | None, role: str) -> bool:
        """May the user admitted as ``username`` use ``role`` now?

        With no users configured everyone admitted may do everything.  Otherwise the user is
        looked up by name in the current configuration: a removed user has no role left, and a
        connection admitted before users existed (``username`` None) has none either.
        """
        users = self.config.users
        if not users:
            return True
        return any(user.username == username and role in user.roles for user in users)


class AccessGuard(Resource):
    """Wraps a Site's root resource: every request is admitted by ``access`` first.

    A refused request gets the verdict's status, JSON body and headers.  An admitted one goes on
    to ``inner``, with the user name recorded on the request (``request_user``).
    ``query_paths`` are the paths where query-string credentials are accepted (``/ws/v1``).
    """

    def __init__(self, inner: Resource, access: AccessControl, query_paths: Sequence[bytes] = ()) -> None:
        super().__init__()
        self.inner = inner
        self.access = access
        self.query_paths = frozenset(query_paths)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        refusal = self._admit(request)
        if refusal is not None:
            return refusal
        return self.inner.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes:
        refusal = self._admit(request)
        if refusal is not None:
            return refusal.render(request)
        return self.inner.render(request)

    def _admit(self, request: Request) -> Resource | None:
        address = request.getClientAddress()
        # A UNIX socket peer is local, like loopback (as in Redis's protected mode); an address
        # of an unknown kind is not.
        peer_ip = None if isinstance(address, UNIXAddress) else getattr(address, "host", "")
        header = request.getHeader(b"authorization")
        authorization = header.decode("latin-1") if header is not None else None
        query = None
        if request.path in self.query_paths:
            _, _, raw = request.uri.partition(b"?")
            query = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        verdict = self.access.check(peer_ip, authorization, query)
        if not verdict.admitted:
            return Refusal(verdict)
        if _cross_origin(request) and (verdict.user is None or authorization is not None):
            # A web page of another site must not drive the API with the browser's ambient
            # authority: loopback in protected mode, or Basic credentials the browser cached.
            # Credentials given explicitly in the /ws/v1 query are a deliberate cross-site use.
            return Refusal(Verdict(None, 403, CROSS_ORIGIN_BODY))
        # Twisted's Request has no slot for it: the admitted user rides on the request object.
        setattr(request, _USER_ATTRIBUTE, verdict.user.username if verdict.user is not None else None)
        return None


CROSS_ORIGIN_BODY = (
    b'{"E":{"c":-32001,"m":"cross-origin request refused: a page of another site may not use this '
    b'API without explicit credentials (?username=&password= on /ws/v1)"},"r":null}'
)


def _cross_origin(request: Request) -> bool:
    """Whether a browser sent this request from a page of another origin than the API's own."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return False  # not a browser: command-line tools and back-ends send no Origin
    host = request.getHeader(b"host") or b""
    _, _, netloc = origin.partition(b"://")
    return netloc.lower() != host.lower()


def request_user(request: Request) -> str | None:
    """The user name ``AccessGuard`` admitted this request as (None when no users exist)."""
    return getattr(request, _USER_ATTRIBUTE, None)


_USER_ATTRIBUTE = "connmix_user"


class Refusal(Resource):
    """The 401 / 403 answer of a verdict."""

    isLeaf = True

    def __init__(self, verdict: Verdict) -> None:
        super().__init__()
        self.verdict = verdict

    def render(self, request: Request) -> bytes:
        for name, value in self.verdict.headers.items():
            request.setHeader(name.encode(), value.encode())
        return json_response(request, self.verdict.status, self.verdict.body)
