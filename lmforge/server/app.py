"""The OpenAI-compatible HTTP API (FastAPI) and the chat page.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics, POST /tokenize, POST /detokenize, GET / (the chat page). With an API key, every
/v1 route and /tokenize, /detokenize need `Authorization: Bearer KEY`. The model loads in the
background: /health answers 503 until it is ready. No route reads a file the client names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge import chat
from lmforge.errors import ChatTemplateError, LmforgeError, TokenizerError
from lmforge.generate import ContextLengthError, fit_to_context
from lmforge.sampling import SamplingParams
from lmforge.server import protocol as P
from lmforge.server.batching import BatchScheduler, Handle, Scheduler, SerialScheduler
from lmforge.server.guard import Access, Guard
from lmforge.server.metrics import Metrics
from lmforge.server.streaming import SSE_HEADERS, deltas, event_stream
from lmforge.server.threads import SPIN_IN_RUN, TWIN_MAX_BYTES, SessionChooser, model_bytes
from lmforge.tools import ToolError

log = logging.getLogger("lmforge.server")

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    max_batch: int = 8
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    body_timeout_s: float = 30.0  # for a request's whole body to arrive
    kv_budget_mb: int | None = None  # KV cache budget of the batching scheduler (None: its default)
    # the batching scheduler's prompt-prefix cache, beside the KV budget (None: its default; 0: off)
    prefix_cache_mb: int | None = None
    spin: str = "auto"  # how ONNX Runtime's threads wait (lmforge.server.threads)


@dataclass
class ServerState:
    """What the routes share: the model once loaded, its scheduler, the metrics, the limits."""

    name: str
    limits: Limits
    api_key: str | None = None
    status: str = "loading"  # loading | ready | failed
    error: str | None = None
    model: object = None
    scheduler: Scheduler | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: float | None = None  # set at shutdown: when (time.monotonic()) running replies are cut off
    # parsing and the chat template: threads of their own, so that requests waiting for a render
    # worker (chat.RENDER_WORKERS; a hostile template holds one up to its deadline) never hold the
    # default executor the running requests' setup and /tokenize use
    preparing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=64, thread_name_prefix="lmforge-prepare")
    )

    def drain_deadline(self) -> float | None:
        return self.draining

    def ready(self):
        if self.status == "loading":
            raise P.ApiError(503, "the model is still loading; retry shortly", "server_error", code="model_loading")
        if self.status != "ready":
            raise P.ApiError(503, f"the model failed to load: {self.error}", "server_error", code="model_failed")
        return self.model

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise P.ApiError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )


def make_scheduler(model, limits: Limits, metrics: Metrics) -> Scheduler:
    """Continuous batching for ONNX Runtime on the CPU, one sequence at a time otherwise."""
    from lmforge.runtime.ort import OrtEngine

    engine = model.engine
    prefix = None if limits.prefix_cache_mb is None else limits.prefix_cache_mb * 2**20
    if isinstance(engine, OrtEngine) and engine.ort_device == "cpu" and limits.max_batch > 1:
        budget = None if limits.kv_budget_mb is None else limits.kv_budget_mb * 2**20
        chooser = None
        if limits.spin == "auto" and engine.threads != 1 and model_bytes(engine.model_path) <= TWIN_MAX_BYTES:
            engine.add_session(SPIN_IN_RUN)  # and decode on whichever of the two measures faster
            chooser = SessionChooser(time.perf_counter())
        sched = BatchScheduler(
            engine,
            limits.max_batch,
            metrics,
            limits.max_queue,
            kv_budget_bytes=budget,
            prefix_cache_bytes=prefix,
            chooser=chooser,
            speculation=model.speculation,
        )
        metrics.chooser = chooser
    else:
        sched = SerialScheduler(
            engine, metrics, limits.max_queue, prefix_cache_bytes=prefix, speculation=model.speculation
        )
    metrics.queue_depth = sched.queue_depth
    metrics.active_sequences = sched.active_count
    metrics.kv_bytes = sched.kv_bytes
    metrics.prefix_bytes = sched.prefix_bytes
    metrics.speculation = sched.speculation
    return sched.start()


# ---- generation: one implementation behind both routes ----------------------------------------


def _sampling(
    state: ServerState,
    ids: list[int],
    req,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    constraints: list[tuple[str, dict]],
) -> SamplingParams:
    """SamplingParams for a request: max_tokens capped by the server's limit and the context
    left after the prompt; prompts that do not fit are a 400 with the counts."""
    if not ids:
        raise P.ApiError(400, "the prompt is empty", param="prompt")
    limit = state.limits.max_tokens_limit
    params = req.sampling_params(limit if max_tokens is None else max_tokens, logprobs, top_logprobs, constraints)
    try:
        return fit_to_context(
            len(ids), replace(params, max_tokens=min(params.max_tokens, limit)), state.model.engine.context_length
        )
    except ContextLengthError as e:
        raise P.ApiError(
            400, str(e), param="messages" if hasattr(req, "messages") else "prompt", code="context_length_exceeded"
        ) from None


async def _submit(
    state: ServerState, ids: list[int], params: SamplingParams, constraints: list[tuple[str, dict]]
) -> tuple[Handle, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    model = state.model
    too_big = state.scheduler.check(len(ids), params.max_tokens)
    if too_big:
        raise P.ApiError(400, too_big, param="max_tokens", code="kv_budget_exceeded")

    def sink(item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    # the sequence state checks logit_bias ids against the vocabulary and compiles the grammar
    # (milliseconds, more for a large schema): off the event loop, which keeps other streams going
    fields = {option: field for field, options in constraints for option in options}
    with P.sampling_errors(fields):
        handle = await loop.run_in_executor(
            None, Handle, model.tokenizer, ids, params, model.eos_token_ids, model.engine.vocab_size, sink
        )
    if not state.scheduler.submit(handle):
        raise P.ApiError(429, "too many requests are waiting; retry later", "server_error", code="queue_full")
    return handle, events


async def _reply(state: ServerState, request: Request, req, prepared):
    """Generate for one validated request (`prepared`: prompt ids, SamplingParams, format, the
    constraints' request fields) and answer it whole or as an SSE stream, shaped by the format."""
    ids, params, fmt, constraints = prepared
    handle, events = await _submit(state, ids, params, constraints)
    base = {
        "id": f"{fmt.id_prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": state.name,
        "system_fingerprint": "lmforge",
    }
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            event_stream(base, fmt, deltas(handle, events, request, state.drain_deadline), usage),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    got = [d async for d in deltas(handle, events, request, state.drain_deadline)]
    if not got or got[-1].finish_reason is None:
        return Response(status_code=499)  # the client left; nobody reads this
    text, infos, last = P.merge(got)
    return {
        **base,
        "object": fmt.object,
        "choices": [fmt.choice(text, infos, last.finish_reason)],
        "usage": P.usage(last.prompt_tokens, last.completion_tokens),
    }


def _chat_request(state: ServerState, req: P.ChatRequest):
    """(prompt ids, SamplingParams, format, constraints) of a chat request: the messages (and tools) through
    the template; response_format or a forced tool call as the output constraint."""
    model = state.model
    messages = [_message(m) for m in req.messages]
    if req.top_logprobs and not req.logprobs:
        raise P.ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if req.tool_choice is not None and not req.tools:
        raise P.ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
    plan, constraints = None, req.constraints()
    try:
        if req.tools:
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, P.NamedToolChoice) else req.tool_choice
            plan = model.plan_tools(messages, tools, choice or "auto", req.parallel_tool_calls)
            constraints = [("tools", plan.constraint), *constraints] if plan.constraint else constraints
            ids = model.prompt_ids(messages=plan.messages, tools=plan.template_tools)
        else:
            ids = model.prompt_ids(messages=messages)
    except (ChatTemplateError, TokenizerError) as e:
        raise P.ApiError(400, str(e), param="messages") from None
    except ToolError as e:
        raise P.ApiError(400, str(e), param=e.param) from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling(state, ids, req, max_tokens, req.logprobs, req.top_logprobs or 0, constraints)
    return ids, params, P.ChatFormat(req.logprobs, _token_text(model), plan), constraints


def _message(m: P.ChatMessage) -> dict:
    """An OpenAI message as a template dict: developer as system, text parts joined, tool fields kept."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _completion_request(state: ServerState, req: P.CompletionRequest):
    """(prompt ids, SamplingParams, format, constraints) of a completion request: a raw prompt or token ids."""
    model = state.model
    if req.suffix:
        raise P.ApiError(400, "'suffix' (fill in the middle) is not supported", param="suffix")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise P.ApiError(400, "one prompt per request (n = 1)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.prompt_ids(prompt, raw=True)
    else:
        ids = list(prompt)
        if any(not 0 <= t < model.engine.vocab_size for t in ids):
            raise P.ApiError(400, f"token ids must be in [0, {model.engine.vocab_size})", param="prompt")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    constraints = req.constraints()
    params = _sampling(state, ids, req, max_tokens, req.logprobs is not None, req.logprobs or 0, constraints)
    echo = (prompt if isinstance(prompt, str) else model.tokenizer.decode(ids)) if req.echo else ""
    return ids, params, P.CompletionFormat(req.logprobs is not None, _token_text(model), echo), constraints


# ---- the app -----------------------------------------------------------------------------------


def create_app(
    load_model: Callable[[], object],
    name: str,
    api_key: str | None = None,
    limits: Limits | None = None,
    on_load_error: Callable[[str], None] | None = None,
    access: Access | None = None,
) -> Guard:
    """The ASGI app serving the model `load_model()` returns (called in a background thread at
    startup) under the id `name`: the FastAPI routes behind the `Guard` middleware.
    `on_load_error(message)` is told when loading fails; `app.state` is the ServerState;
    `access`: the Host names and CORS origins browsers may use (default: any Host, no CORS;
    `serve` passes the loopback names)."""
    state = ServerState(name=name, limits=limits or Limits(), api_key=api_key)

    def load() -> None:
        try:
            model = load_model()
            state.scheduler = make_scheduler(model, state.limits, state.metrics)
            state.model, state.status = model, "ready"
            log.info("model %s ready", name)
            if getattr(model, "chat_template", None):  # the next requests need not wait for them
                with contextlib.suppress(ChatTemplateError):  # (a request will say why they do not start)
                    chat.start_workers()
        except Exception as e:  # noqa: BLE001 - reported on /health and by serve()
            state.error = str(e) if isinstance(e, LmforgeError) else f"{type(e).__name__}: {e}"
            state.status = "failed"
            if not isinstance(e, LmforgeError):
                log.exception("loading the model failed")
            if on_load_error:
                on_load_error(state.error)

    async def lifespan(app):
        threading.Thread(target=load, name="lmforge-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            state.scheduler.close()
        state.preparing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    _error_handlers(app)
    _info_routes(app, state)
    _generation_routes(app, state)
    return Guard(app, state, access)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P.ApiError)
    async def api_error(request, e: P.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(
            P.ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).body(),
            status_code=e.status_code,
        )

    @app.exception_handler(TokenizerError)
    async def tokenizer_error(request, e: TokenizerError):
        return JSONResponse(P.ApiError(400, str(e), code="invalid_value").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(P.ApiError(500, "internal server error", "server_error").body(), status_code=500)


def _info_routes(app: FastAPI, state: ServerState) -> None:
    """The chat page, health, metrics, models, tokenize and detokenize."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        code = {"ready": 200}.get(state.status, 503)
        body = {"status": {"ready": "ok"}.get(state.status, state.status)}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        state.check_model(model_id)
        return _model_card(state)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        model = state.ready()
        req = P.parse(P.TokenizeRequest, await request.body())
        encode = functools.partial(model.tokenizer.encode, req.content, add_special=req.add_special)
        ids = await asyncio.get_running_loop().run_in_executor(None, encode)  # a megabyte takes a while
        return {"tokens": ids, "count": len(ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        model = state.ready()
        req = P.parse(P.DetokenizeRequest, await request.body())
        vocab = model.engine.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise P.ApiError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"content": model.tokenizer.decode(req.tokens)}


def _generation_routes(app: FastAPI, state: ServerState) -> None:
    """/v1/chat/completions and /v1/completions: each shapes its request, `_reply` does the rest."""
    app.add_api_route("/v1/chat/completions", _generation_route(state, P.ChatRequest, _chat_request), methods=["POST"])
    app.add_api_route(
        "/v1/completions", _generation_route(state, P.CompletionRequest, _completion_request), methods=["POST"]
    )


def _generation_route(state: ServerState, schema, prepare):
    def parse_and_prepare(body: bytes):
        req = P.parse(schema, body)
        state.check_model(req.model)
        return req, prepare(state, req)

    async def route(request: Request):
        state.ready()
        # the chat template, the tokenizer and a large body's JSON run off the event loop: /health
        # and the running streams keep going while they work (a template renders in a bounded worker
        # process: chat.render)
        body = await request.body()
        req, prepared = await asyncio.get_running_loop().run_in_executor(state.preparing, parse_and_prepare, body)
        return await _reply(state, request, req, prepared)

    return route


def _model_card(state: ServerState) -> dict:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "lmforge"}


def _token_text(model) -> Callable[[int], str]:
    decode = model.tokenizer.decode
    return lambda token: decode([token])
