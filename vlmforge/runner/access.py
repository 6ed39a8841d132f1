"""Who may reach the runner, and how long a connection may take to say what it wants.

- :func:`check_exposure`: a runner that listens beyond loopback must have an API key (it refuses to start), and a
  key must be one a client can send and no one can guess (:func:`check_key`; deploy applies the same rules).
- :class:`ApiKeyMiddleware`: with a key, every path but ``/health`` needs ``Authorization: Bearer KEY`` (as
  OpenAI's clients send it), compared in constant time; otherwise 401 with OpenAI's error body, before the
  request body is read.
- :func:`header_timeout_protocol`: uvicorn (0.54) bounds the idle time between requests (``timeout_keep_alive``)
  but not the time a client takes to send a request's headers, so a client that opens connections and sends a
  byte now and then holds them forever. The returned HTTP protocol closes a connection whose request headers are
  not complete within the timeout, from the moment it is opened or a new request on it begins.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vlmforge.errors import DeployError

log = logging.getLogger(__name__)

API_KEY_ENV = "VLMFORGE_API_KEY"
"""The environment variable the runner (and ``vlmforge deploy``, which passes it to rank 0) reads the key from."""
MIN_KEY_LENGTH = 16
"""Shorter keys can be guessed (and deploy records a fingerprint of the key, which a short one would give away)."""
GENERATE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_KEY_RE = re.compile(r"[\x21-\x7e]+")
"""Visible ASCII: what an HTTP header and an environment variable carry unchanged."""
OPEN_PATHS = frozenset({"/health"})
"""Paths answered without the key (load balancers and orchestrators probe them)."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback_address(host: str) -> bool:
    """Whether ``host`` is loopback as written (127.0.0.0/8, ::1, ``localhost``), without resolving names: all
    interfaces (``0.0.0.0``, ``::``, empty) and other names are not. Deploy uses this (rank 0 may run on another
    host, where a name resolves differently)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only: loopback as written, or a name whose every
    address is loopback. ``""``, ``0.0.0.0`` and ``::`` (all interfaces) are not."""
    if is_loopback_address(host):
        return True
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
        return False  # an address that is not loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_key(api_key: str) -> None:
    """A DeployError saying why ``api_key`` cannot be a runner's key (never echoing it): under
    :data:`MIN_KEY_LENGTH` characters, or characters other than visible ASCII (a header could not carry it, so no
    client could ever be let in)."""
    if len(api_key) < MIN_KEY_LENGTH:
        raise DeployError(f"the API key is {len(api_key)} characters long; use at least {MIN_KEY_LENGTH} "
                          f"(make one with {GENERATE_KEY})")
    if not _KEY_RE.fullmatch(api_key):
        raise DeployError("the API key may hold only visible ASCII characters (no spaces, newlines or other "
                          f"control characters): it travels in an HTTP header (make one with {GENERATE_KEY})")


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse a key that cannot serve (:func:`check_key`), and to listen beyond loopback without one."""
    if api_key:
        check_key(api_key)
        return
    if is_loopback(host):
        return
    raise DeployError(
        f"the runner would listen on {host or 'all interfaces'!r}, which is not a loopback address, without an API "
        "key: anyone who reaches it could use it. Set a key (--api-key KEY, or the environment variable "
        f"{API_KEY_ENV}; clients send 'Authorization: Bearer KEY'), or listen on 127.0.0.1 (--host 127.0.0.1)"
    )


def unauthorized_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}


class ApiKeyMiddleware:
    """ASGI middleware: requests other than :data:`OPEN_PATHS` must carry the key as a Bearer token.

    ``on_refused(path)`` is called for every refusal (the runner counts them in its metrics).
    """

    def __init__(self, app: Asgi, api_key: str, on_refused: Callable[[str], None] | None = None) -> None:
        if not api_key:
            raise ValueError("an empty API key protects nothing")
        self.app = app
        self._key = api_key.encode()
        self._on_refused = on_refused

    def _presented(self, scope: Scope) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = bytes(value).strip().partition(b" ")
                return token.strip() if scheme.lower() == b"bearer" else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = self._presented(scope)
        if token is not None and hmac.compare_digest(token, self._key):
            await self.app(scope, receive, send)
            return
        if self._on_refused is not None:
            self._on_refused(str(scope.get("path")))
        message = ("no API key: send 'Authorization: Bearer KEY' (OpenAI clients: api_key=KEY)" if token is None
                   else "the API key is not valid for this runner")
        body = json.dumps(unauthorized_body(message)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="vlmforge"')]})
        await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 HTTP protocol, closing connections whose request headers take longer than ``seconds``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
                log.info("closing a connection from %s: no complete request headers within %gs", self.client, seconds)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if self._header_timer is None and (cycle is None or cycle.response_complete):
                self._arm()  # the next request on a kept-alive connection begins
            super().data_received(data)
            if self.cycle is not cycle:  # its headers are complete
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
