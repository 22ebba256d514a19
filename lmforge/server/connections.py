"""What uvicorn does not bound by itself: slow and surplus connections, shutdown, and error logs.

- A connection must finish a request's headers within `header_timeout_s` of opening (or of
  its previous response): slow-loris clients are closed instead of holding descriptors forever.
- Beyond `max_connections` open at once, the oldest idle connection (no request in flight, or
  one whose body is still arriving) is closed to make room, or the new one when all are busy:
  descriptors never run out (when they did, /health stopped answering and the log filled with
  tracebacks).
- SIGTERM / SIGINT drain: no new requests, running replies get `grace_s` to finish (then each
  ends with an error event), and the process exits 0 instead of dying of the signal.
- Repeated log records are rate-limited: a flood of one error becomes a few lines and a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def guarded_h11(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a cap on open connections."""

    class GuardedH11(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.opened = time.monotonic()
            if len(self.connections) > max_connections:
                # the oldest connection without a request in flight makes room (a slow-loris
                # client holding slots cannot lock others out); when every one is busy, this one goes
                idle = [c for c in self.connections if c is not self and c.idle() and not c.transport.is_closing()]
                victim = min(idle, key=lambda c: c.opened, default=self)
                log.warning("more than %d connections are open: closing the oldest idle one", max_connections)
                victim.transport.close()
                if victim is self:
                    return
            self._arm()

        def idle(self) -> bool:
            """No request being answered: headers not yet complete, the body still arriving (a
            trickling body must not hold a slot), or between requests."""
            if self.cycle is None or self.cycle.response_complete:
                return True
            return self.conn.their_state is h11.SEND_BODY and not self.cycle.response_started

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                log.info("a client did not send its request headers within %g s: closing it", header_timeout_s)
                self.transport.close()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection has the same deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT starts a drain: `on_drain()` is told (the app
    then refuses new requests and cuts running replies off at its deadline), uvicorn stops
    accepting and waits for the running ones; the signal is not raised again at the end, so the
    process exits with the code `serve` returns. A second SIGINT forces the exit."""

    def __init__(self, config: uvicorn.Config, on_drain) -> None:
        super().__init__(config)
        self.on_drain = on_drain

    async def serve(self, sockets=None) -> None:
        # asyncio logs every failed accept() (and, out of descriptors, retries in a tight loop):
        # its error reports go through the same rate limit as the log records
        loop = asyncio.get_running_loop()
        flood = RateLimit()

        def report(loop, context) -> None:
            record = logging.LogRecord("asyncio", logging.ERROR, "", 0, context.get("message", ""), None, None)
            if flood.filter(record):
                loop.default_exception_handler({**context, "message": record.msg})

        loop.set_exception_handler(report)
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            self.on_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class RateLimit(logging.Filter):
    """At most `burst` records per `period_s` for each (logger, message template); the next one
    let through after a quiet spell says how many were dropped."""

    def __init__(self, burst: int = 5, period_s: float = 10.0):
        super().__init__()
        self.burst, self.period_s = burst, period_s
        self.seen: dict[tuple[str, str], list] = {}  # key -> [window start, count, dropped]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self.lock:
            if len(self.seen) > 1000:
                self.seen.clear()
            entry = self.seen.setdefault(key, [now, 0, 0])
            if now - entry[0] > self.period_s:
                dropped = entry[2]
                entry[:] = [now, 0, 0]
                if dropped:
                    record.msg = f"{record.msg} (and {dropped} more like it in the last {self.period_s:g} s, not shown)"
            entry[1] += 1
            if entry[1] > self.burst:
                entry[2] += 1
                return False
        return True


def limit_logs(loggers=("lmforge", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio")) -> None:
    """Rate-limit what these loggers print; asyncio's errors get a handler of their own (they
    would otherwise reach Python's last-resort handler, which no filter can hold back)."""
    flood = RateLimit()
    asyncio_log = logging.getLogger("asyncio")
    if not asyncio_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lmforge: %(levelname)s: %(name)s: %(message)s"))
        asyncio_log.addHandler(handler)
        asyncio_log.propagate = False
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RateLimit) for f in handler.filters):
                handler.addFilter(flood)


def descriptor_budget(nofile: int, max_connections: int | None) -> tuple[int, int]:
    """(max_connections, backlog) that fit `nofile` descriptors: asyncio accepts up to `backlog`
    connections per loop tick before any of them can be closed, and a few ticks pass before an
    evicted one gives its descriptor back, so both count; 64 stay for the model, threads, pipes."""
    backlog = max(8, min(128, nofile // 32))
    default = max(8, min(4096, nofile - 4 * backlog - 64))
    return (default if max_connections is None else max_connections), backlog


def open_files_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the limit now in force
    (on a system without the POSIX limits, a conservative guess)."""
    try:
        import resource
    except ImportError:
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard or hard == resource.RLIM_INFINITY and soft < 65536:
        target = hard if hard != resource.RLIM_INFINITY else 65536
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft
