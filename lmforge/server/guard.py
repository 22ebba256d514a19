"""Pure ASGI middleware in front of the routes: the API key, the body-size limit, request metrics."""

from __future__ import annotations

import hmac
import json

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
    """Pure ASGI middleware: API key on protected routes (constant-time compare), the body-size
    limit (read before any route sees it), and requests counted by endpoint and status."""

    def __init__(self, app, state):  # state: the app's ServerState (api_key, limits, metrics)
        self.app, self.state = app, state

    def authorized(self, scope) -> bool:
        key = self.state.api_key
        if key is None or not scope["path"].startswith(PROTECTED):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not self.authorized(scope):
                return await _send_error(
                    send_status,
                    P.ApiError(
                        401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
                    ),
                )
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    return await _send_error(
                        send_status,
                        P.ApiError(
                            413,
                            f"the request body exceeds {self.state.limits.max_body_bytes} bytes",
                            code="request_too_large",
                        ),
                    )
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            self.state.metrics.request(path if path in ENDPOINTS else "other", status[0])

    async def _read_body(self, scope, receive) -> bytes | None:
        limit = self.state.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
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
