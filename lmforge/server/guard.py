"""Pure ASGI middleware in front of the routes: who may call (the Host allow-list against DNS
rebinding, cross-site browser requests, CORS), the API key, draining at shutdown, the JSON body
(its type, size and read timeout), request metrics."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from lmforge.server import protocol as P

PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # need the API key when the server has one
ENDPOINTS = (
    "/",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
)  # metric labels; anything else counts as "other"
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Access:
    """Who may call from a browser. `allowed_hosts`: the names a request's Host header may carry
    (None: any; an IP address is always fine, since DNS rebinding needs a name; "*": any);
    `cors_origins`: the web origins (scheme://host[:port], or "*") that may call cross-site."""

    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()

    def host_allowed(self, host: str) -> bool:
        if self.allowed_hosts is None or "*" in self.allowed_hosts or not host:
            return True  # no Host at all: HTTP/1.0, which no browser sends
        name = _host_name(host)
        return name is not None and (ip_address(name) is not None or name in self.allowed_hosts)

    def origin_allowed(self, origin: str, host: str) -> bool:
        """A browser's Origin: the server's own page, or one of `cors_origins`."""
        if urlsplit(origin).netloc.lower() == host.lower():
            return True
        return "*" in self.cors_origins or origin.rstrip("/") in self.cors_origins


_HOST = re.compile(r"\[([0-9a-f:.]+)\](?::\d{1,5})?|([a-z0-9._-]+)(?::\d{1,5})?")


def _host_name(host: str) -> str | None:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'; None for a malformed Host
    ('localhost:80@evil.com', '[::1]evil.com', ...)."""
    match = _HOST.fullmatch(host.strip().lower())
    if match is None or match[1] is not None and ip_address(match[1]) is None:
        return None
    return match[1] or normal_name(match[2])


def normal_name(name: str) -> str:
    """A host name as the allow-list compares it: lower case, no trailing dot."""
    return name.strip().lower().rstrip(".")


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`text` as an IP address, or None when it is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


async def _send_error(send, err: P.ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Pure ASGI middleware: the Host allow-list and cross-site browser requests (403), CORS for
    the origins `access` names (Starlette's CORSMiddleware), 503 while draining, the API key on
    protected routes (constant-time compare), JSON bodies only on POST (415), the body-size limit
    and its deadline (413, 408; read before any route sees it), and requests counted by endpoint
    and status."""

    def __init__(self, app, state, access: Access | None = None):  # state: the app's ServerState
        self.app, self.state, self.access = app, state, access or Access()
        self.checked = self._checked
        if self.access.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            self.checked = CORSMiddleware(
                self._checked,
                allow_origins=list(self.access.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type"],
                max_age=600,
            )

    def authorized(self, scope) -> bool:
        key = self.state.api_key
        if key is None or not scope["path"].startswith(PROTECTED):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + key.encode())

    def refusal(self, scope) -> P.ApiError | None:
        """Why a request may not go on before its body is read, or None."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.access.host_allowed(host):
            name = _host_name(host)
            fix = "send host[:port]" if name is None else f"start the server with --allowed-host {name} to accept it"
            return P.ApiError(403, f"the Host {host!r} is not allowed; {fix}", code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None and not self.access.origin_allowed(origin.decode("latin-1"), host):
            return P.ApiError(
                403,
                f"cross-site requests from {origin.decode('latin-1')!r} are not allowed; "
                "start the server with --cors-origin ORIGIN to allow one",
                code="origin_not_allowed",
            )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refused = self.refusal(scope)
            if refused is not None:
                return await _send_error(send_status, refused)
            await self.checked(scope, receive, send_status)
        finally:
            path = scope["path"]
            self.state.metrics.request(path if path in ENDPOINTS else "other", status[0])

    async def _checked(self, scope, receive, send):
        if self.state.draining is not None:
            return await _send_error(
                send, P.ApiError(503, "the server is shutting down; retry elsewhere", "server_error", code="draining")
            )
        if not self.authorized(scope):
            return await _send_error(
                send,
                P.ApiError(
                    401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
                ),
            )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if isinstance(body, P.ApiError):
                return await _send_error(send, body)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, scope, receive) -> bytes | P.ApiError:
        limits = self.state.limits
        headers = dict(scope["headers"])
        too_large = P.ApiError(413, f"the request body exceeds {limits.max_body_bytes} bytes", code="request_too_large")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            return too_large
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            return P.ApiError(
                415,
                f"send the body as JSON with 'Content-Type: application/json' (got {kind.decode('latin-1')!r})",
                code="unsupported_media_type",
            )
        return await self._receive_body(receive, too_large)

    async def _receive_body(self, receive, too_large: P.ApiError) -> bytes | P.ApiError:
        """The body's pieces within one deadline for the whole body (a byte now and then does not
        keep a connection), given up with a 503 as soon as the server starts draining."""
        limits, loop = self.state.limits, asyncio.get_running_loop()
        deadline = loop.time() + limits.body_timeout_s
        chunks, size = [], 0
        while True:
            if self.state.draining is not None:
                return P.ApiError(503, "the server is shutting down; retry elsewhere", "server_error", code="draining")
            left = deadline - loop.time()
            if left <= 0:
                return P.ApiError(
                    408, f"the request body did not arrive within {limits.body_timeout_s:g} s", code="request_timeout"
                )
            try:  # in short waits, to see a drain start
                message = await asyncio.wait_for(receive(), min(left, 0.25))
            except asyncio.TimeoutError:
                continue
            if message["type"] == "http.disconnect":
                return P.ApiError(400, "the client closed the connection before its body arrived")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
