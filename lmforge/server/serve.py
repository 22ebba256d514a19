"""`serve`: check the arguments, bind the socket, load the model behind uvicorn."""

from __future__ import annotations

import functools
import logging
import re
import socket
import sys
import time
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.runtime.engine import ENGINES
from lmforge.server.threads import SPIN_POLICIES
from lmforge.speculative import DRAFT_MAX, check_options

log = logging.getLogger(__name__)


def load_for_serving(
    model: str,
    engine: str = "ort",
    device: str = "cpu",
    target: str | None = None,
    threads: int | None = None,
    spin: str = "auto",
    speculative: dict | None = None,
):
    """A `Model` for the server: what `lmforge.model.load` gives, its ONNX Runtime engine opened
    with threads that spin within runs (`spin` "spin") or sleep (else; with "auto" the batching
    scheduler may add a spinning session: lmforge.server.threads); `speculative` holds `load`'s
    speculative, draft and draft_max."""
    from lmforge.model import load
    from lmforge.server import threads as T

    first = T.SPIN_IN_RUN if spin == "spin" else T.SLEEP
    m = load(
        model,
        device=device,
        target=target,
        threads=threads,
        progress=False,
        engine=engine,
        session_config=first if engine == "ort" else None,
        **(speculative or {}),
    )
    return m


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise LmforgeError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --host/--port") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    from lmforge.server.guard import ip_address

    address = ip_address(host)
    return host == "localhost" if address is None else address.is_loopback


def _announce(name: str, host: str, sock: socket.socket, api_key: str | None) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(
        f"lmforge: serving {name} on http://{shown}:{sock.getsockname()[1]} (chat page at /); loading the model",
        file=sys.stderr,
        flush=True,
    )
    if not _is_loopback(host) and api_key is None:
        log.warning("listening beyond this machine without --api-key: anyone who can reach it can use it")


def _connection_limits(
    max_connections: int | None, shutdown_grace_s: float, header_timeout_s: float
) -> tuple[int, int]:
    """(--max-connections as given or from the open-file limit, raised to its hard limit first;
    the accept backlog); a user error for limits that make no sense."""
    from lmforge.server.connections import descriptor_budget, open_files_limit

    nofile = open_files_limit()
    max_connections, backlog = descriptor_budget(nofile, max_connections)
    most = nofile - 4 * backlog - 32
    if not 1 <= max_connections <= most:
        raise LmforgeError(f"--max-connections must be in 1..{most} (the open-file limit is {nofile})")
    if shutdown_grace_s < 0 or header_timeout_s <= 0:
        raise LmforgeError("--shutdown-grace must be >= 0 and --header-timeout > 0")
    return max_connections, backlog


def _server(app, log_level: str, shutdown_grace_s: float, header_timeout_s: float, connection_limits: tuple[int, int]):
    """uvicorn for `app` with the connection limits ((max connections, accept backlog)), the drain
    at SIGTERM and rate-limited logs."""
    import uvicorn

    from lmforge.server import connections

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        # h11, also where uvicorn[standard] would pick httptools: the guard hooks H11Protocol's
        # request cycle and reads h11's connection state (is the body still arriving?) to time out
        # headers and pick connections to close; httptools' protocol has neither
        http=connections.guarded_h11(header_timeout_s, connection_limits[0]),
        backlog=connection_limits[1],
        timeout_keep_alive=5,
        timeout_graceful_shutdown=shutdown_grace_s + 2,  # the replies cut off at the grace send their error event
    )
    connections.limit_logs()

    def drain() -> None:
        app.state.draining = time.monotonic() + shutdown_grace_s
        print(f"lmforge: shutting down; running replies get up to {shutdown_grace_s:g} s", file=sys.stderr, flush=True)

    return connections.DrainingServer(config, drain)


def _access(host: str, allowed_hosts: tuple[str, ...], cors_origins: tuple[str, ...]):
    """The Host names browsers may use (the loopback names, `host` when it is a name, and
    `allowed_hosts`) and the CORS origins; a user error for a malformed origin."""
    from lmforge.server.guard import LOOPBACK_NAMES, Access, ip_address, normal_name

    for origin in cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin.rstrip("/")):
            raise LmforgeError(f"--cors-origin {origin!r} is not an origin; write it as http://host[:port]")
    names = {*LOOPBACK_NAMES, *map(normal_name, allowed_hosts)}
    if ip_address(host) is None:
        names.add(normal_name(host))
    return Access(tuple(sorted(names)), tuple(o.rstrip("/") for o in cors_origins))


def _check_arguments(engine: str, port: int, api_key: str | None, limits: dict[str, int], extra: dict) -> None:
    """A user error for the first bad argument of `serve`; LIMITS maps each limit's name to its
    value, EXTRA holds spin, prefix_cache_mb and `load`'s speculative, draft and draft_max."""
    if engine not in ("auto", *ENGINES):
        raise LmforgeError(f"unknown engine {engine!r}; choose one of: auto, {', '.join(ENGINES)}")
    for what, value in limits.items():
        if value < 1:
            raise LmforgeError(f"{what} must be >= 1")
    if extra["spin"] not in SPIN_POLICIES:
        raise LmforgeError(f"unknown --spin {extra['spin']!r}; choose one of: {', '.join(SPIN_POLICIES)}")
    if not 0 <= port <= 65535:
        raise LmforgeError(f"--port must be in 0..65535, not {port}")
    if api_key is not None and not api_key.strip():
        raise LmforgeError("--api-key is empty; give a key or leave the option out")
    if extra["prefix_cache_mb"] is not None and extra["prefix_cache_mb"] < 0:
        raise LmforgeError("--prefix-cache-mb must be >= 0 (0 turns prompt-prefix reuse off)")
    check_options(extra["speculative"] or "ngram", extra["draft_max"])
    if extra["speculative"] == "draft" and extra["draft"] is None:
        raise LmforgeError("--speculative draft needs a draft model: give --draft MODEL")


def _load_announced(name: str, *args):
    """`load_for_serving(*args)`, announced on stderr when ready."""
    loaded = load_for_serving(*args)
    print(f"lmforge: {name} is ready, running as {loaded.form}", file=sys.stderr, flush=True)
    if not loaded.chat_template:
        log.warning("this model has no chat template: /v1/chat/completions answers 400, /v1/completions runs")
    return loaded


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_tokens_limit: int = 2048,
    engine: str = "auto",
    device: str = "cpu",
    target: str | None = None,
    threads: int | None = None,
    name: str | None = None,
    max_body_bytes: int = 1 << 20,
    log_level: str = "warning",
    allowed_hosts: tuple[str, ...] = (),
    cors_origins: tuple[str, ...] = (),
    shutdown_grace_s: float = 10.0,
    max_connections: int | None = None,
    header_timeout_s: float = 10.0,
    kv_budget_mb: int | None = None,
    prefix_cache_mb: int | None = None,
    spin: str = "auto",
    speculative: str | None = None,
    draft: str | None = None,
    draft_max: int = DRAFT_MAX,
) -> None:
    """Serve MODEL with the OpenAI API on host:port until interrupted (SIGTERM/SIGINT drain it).

    Args, as `lmforge serve`'s flags: the model (known name, HF folder, .gguf file, ONNX folder);
    where to listen; the API key; the decode batch; the max_tokens cap; engine auto|ort|llamacpp;
    device; conversion target; threads; the model id clients use (default: MODEL's name); the
    body size limit; uvicorn's log level; Host names to accept besides the loopback names and
    `host`; CORS origins; seconds running replies get at shutdown; connections open at once
    (default: from the open-file limit); seconds a client has to send its headers; the KV cache
    budget in MiB (None: room for every batch row and one full context); the prompt-prefix cache's
    budget in MiB, beside the KV budget (None: 256; 0: no reuse); how ONNX Runtime's threads wait
    (lmforge.server.threads); speculative decoding as `load` takes it. Raises LmforgeError for
    bad arguments, a model that does not exist or does not load."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise LmforgeError("the server needs FastAPI and uvicorn; run: pip install 'lmforge[server]'") from None
    from lmforge.checkpoint import resolve
    from lmforge.server.app import Limits, create_app

    limits = {"--max-batch": max_batch, "--max-tokens-limit": max_tokens_limit, "the body size limit": max_body_bytes}
    spec = dict(speculative=speculative, draft=draft, draft_max=draft_max)
    extra = dict(prefix_cache_mb=prefix_cache_mb, spin=spin)
    _check_arguments(engine, port, api_key, limits, {**extra, **spec})
    max_connections, backlog = _connection_limits(max_connections, shutdown_grace_s, header_timeout_s)
    access = _access(host, allowed_hosts, cors_origins)
    from lmforge.model import pick_engine

    path = resolve(model)  # a missing model (or one the engine cannot run) fails now, before the socket opens
    engine = pick_engine(path, engine, device, target)
    name = name or (path.name if Path(str(model)).expanduser().exists() else str(model))  # a name or Hub id as typed
    sock = _bind(host, port)
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(
        functools.partial(_load_announced, name, model, engine, device, target, threads, spin, spec),
        name,
        api_key,
        Limits(max_batch, max_tokens_limit, max_body_bytes, kv_budget_mb=kv_budget_mb, **extra),
        on_load_error=stop,
        access=access,
    )
    _announce(name, host, sock, api_key)
    server = _server(app, log_level, shutdown_grace_s, header_timeout_s, (max_connections, backlog))
    server.run(sockets=[sock])
    state = app.state
    if state.status == "failed":
        raise LmforgeError(state.error)
