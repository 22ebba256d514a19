"""Server-sent events: a request's deltas from the scheduler, and the OpenAI chunk streams.

A client that leaves cancels its sequence: Starlette cancels a streaming response when the
connection drops (the `finally` below), and every request also polls for it."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request

from lmforge.server import protocol as P
from lmforge.server.batching import Failed, Handle

POLL_DISCONNECT_S = 1.0  # how often a request checks whether its client left (streams also learn it at once)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _no_deadline() -> float | None:
    return None


async def deltas(handle: Handle, events: asyncio.Queue, request: Request, deadline=_no_deadline):
    """The handle's deltas as they come; cancels the sequence when the client leaves (or when
    the consumer stops early: a streaming response cancelled by a disconnect ends up here).
    `deadline()`: None, or the time.monotonic() at which the server, shutting down, cuts the
    reply off with a 503 ApiError (a stream's error event)."""
    getter = None
    checked = time.monotonic()
    try:
        while True:
            cutoff = deadline()
            if cutoff is not None and time.monotonic() > cutoff:
                raise P.ApiError(
                    503, "the server shut down before this reply finished", "server_error", code="server_shutdown"
                )
            if getter is None and not events.empty():  # the common case under load: no task, no wait
                item = events.get_nowait()
                if time.monotonic() - checked > POLL_DISCONNECT_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
            else:
                getter = getter or asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter}, timeout=POLL_DISCONNECT_S)
                if not done:
                    if await request.is_disconnected():
                        return
                    continue
                item, getter = getter.result(), None
            if isinstance(item, Failed):
                raise P.ApiError(500, str(item), "server_error", code="engine_failed")
            yield item
            if item.finish_reason is not None:
                return
    finally:
        if getter is not None:
            getter.cancel()
        handle.cancel()  # nothing when it finished


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def event_stream(base: dict, fmt, deltas, include_usage: bool):
    """The OpenAI chunk stream of one reply, shaped by `fmt` (protocol.ChatFormat or
    CompletionFormat): the opening chunks, one chunk per delta that carries something, the usage
    chunk when asked, and `[DONE]`; an engine failure mid-stream becomes an error event."""
    chunk = {**base, "object": fmt.chunk_object}
    for choice in fmt.opening():
        yield sse({**chunk, "choices": [choice]})
    try:
        async for d in deltas:
            for choice in fmt.chunks(d):
                yield sse({**chunk, "choices": [choice]})
            if d.finish_reason and include_usage:
                yield sse({**chunk, "choices": [], "usage": P.usage(d.prompt_tokens, d.completion_tokens)})
    except P.ApiError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"
