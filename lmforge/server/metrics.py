"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms.

Small on purpose: a lock, a few dicts, no client library."""

from __future__ import annotations

import threading
from collections.abc import Callable

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]


class Metrics:
    """Requests by endpoint and status, tokens in and out, cancellations, time to first token
    and per-request generation speed; queue depth and active sequences are read when scraped."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.n_cancelled = 0
        self.decode_steps = 0
        self.decode_rows = 0
        self.prefix_lookups = 0
        self.prefix_hits = 0
        self.prefix_reused = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tps = Histogram(TPS_BUCKETS)
        self.queue_depth: Callable[[], int] = lambda: 0
        self.active_sequences: Callable[[], int] = lambda: 0
        self.kv_bytes: Callable[[], int] = lambda: 0
        self.chooser = None  # the scheduler's server.threads.SessionChooser, where the engine has two sessions
        self.speculation = None  # the scheduler's lmforge.speculative.Speculation, where it speculates
        self.prefix_bytes: Callable[[], int] = lambda: 0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def finished(self, prompt_tokens: int, generation_tokens: int, tokens_per_second: float | None) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            if tokens_per_second is not None:
                self.tps.observe(tokens_per_second)

    def decode_step(self, rows: int) -> None:
        with self.lock:
            self.decode_steps += 1
            self.decode_rows += rows

    def prefix_lookup(self, reused_tokens: int) -> None:
        """A sequence looked its prompt up in the prefix cache and took `reused_tokens` from it."""
        with self.lock:
            self.prefix_lookups += 1
            self.prefix_hits += reused_tokens > 0
            self.prefix_reused += reused_tokens

    def cancelled(self) -> None:
        with self.lock:
            self.n_cancelled += 1

    def render(self) -> str:
        p = "lmforge_"
        with self.lock:
            lines = [
                f"# HELP {p}requests_total HTTP requests answered, by endpoint and status.",
                f"# TYPE {p}requests_total counter",
            ]
            lines += [
                f'{p}requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())
            ]
            for name, kind, text, value in (
                ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
                (
                    "generation_tokens_total",
                    "counter",
                    "Tokens generated for finished requests.",
                    self.generation_tokens,
                ),
                ("requests_cancelled_total", "counter", "Requests whose client left before the end.", self.n_cancelled),
                ("decode_steps_total", "counter", "Batched decode steps run.", self.decode_steps),
                (
                    "decode_rows_total",
                    "counter",
                    "Sequences decoded, summed over steps (/ steps: mean batch).",
                    self.decode_rows,
                ),
                ("queue_depth", "gauge", "Requests waiting for a batch slot.", self.queue_depth()),
                ("active_sequences", "gauge", "Sequences holding a KV slot.", self.active_sequences()),
                ("kv_cache_bytes", "gauge", "Bytes of KV cache held by the scheduler.", self.kv_bytes()),
                *self._sessions(),
                *self._speculation(),
                (
                    "prefix_cache_lookups_total",
                    "counter",
                    "Prompts looked up in the prefix cache.",
                    self.prefix_lookups,
                ),
                ("prefix_cache_hits_total", "counter", "Prompts that reused a cached prefix.", self.prefix_hits),
                (
                    "prefix_cache_reused_tokens_total",
                    "counter",
                    "Prompt tokens taken from the prefix cache instead of prefilled.",
                    self.prefix_reused,
                ),
                ("prefix_cache_bytes", "gauge", "Bytes of KV blocks held by the prefix cache.", self.prefix_bytes()),
            ):
                lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
            for name, text, hist in (
                ("time_to_first_token_seconds", "Seconds from arrival to the first generated token.", self.ttft),
                ("generation_tokens_per_second", "Decode speed of each finished request.", self.tps),
            ):
                lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} histogram", *hist.lines(p + name)]
        return "\n".join(lines) + "\n"

    def _sessions(self) -> list[tuple[str, str, str, int]]:
        if self.chooser is None:
            return []
        return [
            ("decode_spinning", "gauge", "1 while decode steps run on the spinning session.", self.chooser.current),
            (
                "decode_session_switches_total",
                "counter",
                "Times the measured faster session changed (threads sleeping / spinning).",
                self.chooser.switches,
            ),
        ]

    def _speculation(self) -> list[tuple[str, str, str, int]]:
        if self.speculation is None:
            return []
        s = self.speculation.stats
        return [
            ("speculative_passes_total", "counter", "Forward passes of sequences that speculate.", s.passes),
            (
                "speculative_tokens_total",
                "counter",
                "Tokens those passes produced (/ passes: tokens per pass).",
                s.tokens,
            ),
            ("speculative_verifies_total", "counter", "Passes that verified drafted tokens.", s.verifies),
            ("speculative_drafted_total", "counter", "Tokens drafted.", s.drafted),
            ("speculative_accepted_total", "counter", "Drafted tokens the model kept.", s.accepted),
        ]
