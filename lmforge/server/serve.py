"""`serve`: check the arguments, bind the socket, load the model behind uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.runtime.engine import ENGINES

log = logging.getLogger(__name__)


# ONNX Runtime's idle worker threads spin by default; in a server they would take the cores the
# event loop needs between decode steps (measured: 1.6-1.8x the throughput without spinning on a
# busy 2-core machine). llama.cpp gets the same through OMP_WAIT_POLICY=PASSIVE.
SERVING_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def load_for_serving(
    model: str, engine: str = "ort", device: str = "cpu", target: str | None = None, threads: int | None = None
):
    """A `Model` for the server: what `lmforge.model.load` gives, the ONNX Runtime engine opened
    without spinning threads."""
    from lmforge.model import load

    return load(
        model,
        device=device,
        target=target,
        threads=threads,
        progress=False,
        engine=engine,
        session_config=SERVING_SESSION_CONFIG if engine == "ort" else None,
    )


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
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_arguments(engine: str, port: int, api_key: str | None, limits: dict[str, int]) -> None:
    """A user error for the first bad argument of `serve`; LIMITS maps each limit's name to its value."""
    if engine not in ("auto", *ENGINES):
        raise LmforgeError(f"unknown engine {engine!r}; choose one of: auto, {', '.join(ENGINES)}")
    for what, value in limits.items():
        if value < 1:
            raise LmforgeError(f"{what} must be >= 1")
    if not 0 <= port <= 65535:
        raise LmforgeError(f"--port must be in 0..65535, not {port}")
    if api_key is not None and not api_key.strip():
        raise LmforgeError("--api-key is empty; give a key or leave the option out")


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
    kv_budget_mb: int | None = None,
) -> None:
    """Serve MODEL with the OpenAI API on host:port until interrupted.

    Args: the model (known name, HF folder, .gguf file, ONNX folder); where to listen (loopback
    unless told otherwise); the API key every /v1 route then needs; the decode batch size; the
    cap on max_tokens; engine auto|ort|llamacpp (auto: as `run` picks); device; conversion target; threads; the model id
    clients use (default: MODEL's name); the KV cache budget in MiB (None: room for every batch row
    and one full context). Raises LmforgeError for bad arguments, a model that does
    not exist or does not load."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise LmforgeError("the server needs FastAPI and uvicorn; run: pip install 'lmforge[server]'") from None
    from lmforge.checkpoint import resolve
    from lmforge.server.app import Limits, create_app

    _check_arguments(
        engine,
        port,
        api_key,
        {"--max-batch": max_batch, "--max-tokens-limit": max_tokens_limit, "the body size limit": max_body_bytes},
    )
    from lmforge.model import pick_engine

    path = resolve(model)  # a missing model (or one the engine cannot run) fails now, before the socket opens
    engine = pick_engine(path, engine, device, target)
    name = name or (path.name if Path(str(model)).expanduser().exists() else str(model))  # a name or Hub id as typed
    sock = _bind(host, port)
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        if server is not None:
            server.should_exit = True

    def load():
        loaded = load_for_serving(model, engine, device, target, threads)
        print(f"lmforge: {name} is ready, running as {loaded.form}", file=sys.stderr, flush=True)
        return loaded

    app = create_app(
        load,
        name,
        api_key,
        Limits(max_batch, max_tokens_limit, max_body_bytes, kv_budget_mb=kv_budget_mb),
        on_load_error=stop,
    )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"lmforge: serving {name} on http://{shown}:{sock.getsockname()[1]} (chat page at /); loading the model",
        file=sys.stderr,
        flush=True,
    )
    if not _is_loopback(host) and api_key is None:
        log.warning("listening beyond this machine without --api-key: anyone who can reach it can use it")
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, access_log=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    state = app.state
    if state.status == "failed":
        raise LmforgeError(state.error)
