"""Schedulers: one background thread owns the engine; requests come in as `Handle`s.

`BatchScheduler` (ONNX Runtime, CPU) does continuous batching over a `KVPool` of `max_batch`
rows. Active sequences occupy rows 0..n-1 and decode together in one batched step (a view of that
prefix, so idle rows cost nothing). Short prompts prefill straight into the next free rows,
several in one right-padded batch, and join the decode batch at the next step. A sequence that
finishes or is cancelled leaves at once: the last active row is copied into its slot (one copy
per layer of the used positions), keeping the prefix dense.

Memory is bounded by a KV budget (`plan_budget`): pool rows share one capacity, so the pool
takes sequences of up to `pool_capacity` positions only. A long prompt, or a sequence that
would not fit a pool row, goes to the *lane*: its own one-row cache sized to it, prefilled in
chunks (one long prompt at a time), then moved into the pool if it fits, else decoded there.
While streams decode, the lane gets at most LANE_SHARE seconds per second of other work (so they
keep about 3/4 of their rate), more while other long prompts queue for it, in chunks of about
LANE_SLICE_S; short prompts keep being admitted between chunks. (Charging the lane with the
streams' whole slowdown instead starves it as the streams' own contexts grow: their steps slow
down with the positions they attend to, ~40% from 500 to 1,500, which is not the lane's doing.)
pool shrinks back and the C heap is trimmed.

Prompt prefixes are reused through a `PrefixStore` (its own byte budget, beside the KV budget):
once a sequence's prompt is prefilled, the whole blocks of it go into the store (and at its exit
the decoded positions too, where the engine's decoded KV equals a prefill's: `decoded_kv_exact`).
A prompt whose leading blocks are stored gets them copied into its row and prefills the rest (at
least two tokens, ending as one pass of the whole prompt would: `exact_split`) in a pass of its
own over them: right-padded batches assume rows that start empty. A long prompt whose rest is
short enough goes to the pool instead of the lane.

`SerialScheduler` serves any engine of the Engine protocol (llama.cpp) one sequence at a time,
starting each from the last one's cache where their prompts share a prefix (`PrefixCache`).

Both keep every sequence's own sampler and stops (`SequenceState`), so a greedy sequence gets the
same tokens batched as alone.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.generate import (
    PREFILL_TILE,
    Delta,
    PrefixCache,
    SequenceState,
    decoded_kv_exact,
    exact_split,
    next_draft,
    sequence_deltas,
    speculates,
)
from lmforge.sampling import SamplingParams
from lmforge.server.prefix import PrefixStore

log = logging.getLogger("lmforge.server")

PREFILL_CHUNK = 256  # longest prompt prefilled straight into the pool; the lane's largest chunk
LANE_SHARE = 0.3  # lane seconds per second of other work while both have work: streams keep ~3/4 of their rate
LANE_SHARE_MAX = 4.0
LANE_SLICE_S = 0.25  # the lane's chunk is sized to take about this long while streams decode
MIN_CHUNK = 16
POOL_ROW_POSITIONS = 2560  # default budget: a pool row holds a short prompt and a 2048-token reply
PREFIX_CACHE_MB = 256  # default prefix cache: ~5,700 positions of the default model (fp32 KV)


@dataclass(frozen=True)
class KVBudget:
    """The KV budget's split: pool rows of at most `pool_capacity` positions, `lane_bytes` for
    the lane's own rows; `per_position` bytes a position of one row takes."""

    total: int
    pool_capacity: int
    lane_bytes: int
    per_position: int


def plan_budget(engine, max_batch: int, budget_bytes: int | None = None) -> KVBudget:
    """Split `budget_bytes` (default: every pool row POOL_ROW_POSITIONS positions, and one full
    context for the lane) between the pool and the lane; a user error when it cannot hold
    `max_batch` pool rows of 256 positions."""
    per, ctx = engine.kv_bytes_per_position, engine.context_length
    if budget_bytes is None:
        budget_bytes = (max_batch * min(POOL_ROW_POSITIONS, ctx) + ctx) * per
    reserve = min(ctx * per, budget_bytes // 2)  # the lane's share: one full context if the budget allows
    cap = min(ctx, (budget_bytes - reserve) // (max_batch * per))
    cap = cap // 256 * 256 if cap >= 256 else cap
    if cap < min(256, ctx):
        need = (max_batch * min(256, ctx) * per + reserve) / 2**20
        raise LmforgeError(
            f"a KV budget of {budget_bytes / 2**20:.0f} MB is too small for --max-batch {max_batch}; "
            f"give --kv-budget-mb {int(need) + 1} or more, or lower --max-batch"
        )
    return KVBudget(budget_bytes, cap, budget_bytes - max_batch * cap * per, per)


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the system (glibc; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _exact_chunk(rest: int, size: int) -> int:
    """About `size` tokens (at most, or PREFILL_TILE where no smaller one will do) of the `rest`
    a lane prompt has left to prefill, such that its chunks together give what one pass gives
    (`exact_split`): the chunk does not end on a one-row tile and leaves a rest that ends as one
    pass would end. Holds as long as the rest before it would (true from the start)."""
    if size >= rest:
        return rest
    k = exact_split(rest, size)
    while k % PREFILL_TILE == 1:
        k = exact_split(rest, k - 1)
    if k == 0:  # a rest of 128j + 1 splits at multiples of 128 only
        k = PREFILL_TILE if rest - PREFILL_TILE >= 2 else rest
    return k


class Failed(Exception):
    """The engine failed on a step that held this sequence (reported to its client as a 500)."""


class Handle:
    """One request as the scheduler sees it. `sink(item)` receives each Delta, then nothing
    more; or a `Failed`. `cancel()` may be called from any thread: the sequence leaves at the
    scheduler's next step."""

    _ids = itertools.count()

    def __init__(
        self,
        tokenizer,
        prompt_ids: list[int],
        params: SamplingParams,
        eos_token_ids,
        vocab_size: int | None,
        sink: Callable[[object], None],
    ):
        self.id = next(self._ids)
        self.state = SequenceState(tokenizer, prompt_ids, params, eos_token_ids, vocab_size)
        self.sink = sink
        self.cancelled = False
        self.done = False
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.row = -1  # KV row in a BatchScheduler's pool
        self.lane_pool = None  # its own one-row KVPool while in a BatchScheduler's lane
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.cached = (-1, 0)  # (prefix store version, prompt tokens it held then)
        self.scheduler: Scheduler | None = None
        self.spec = None  # its drafter (lmforge.speculative), made when it first decodes alone
        self.spec_off = False  # no drafter for it: none configured, an output constraint, or one failed

    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            if self.scheduler is not None:
                self.scheduler.wake()


class Scheduler:
    """The thread, the inbox and the bookkeeping both schedulers share."""

    def __init__(self, engine, metrics=None, max_queue: int = 256, speculation=None):
        self.engine = engine
        self.metrics = metrics
        # a lmforge.speculative.Speculation (None: plain decoding): sequences without an output
        # constraint draft tokens and verify them in one pass when they decode alone
        self.speculation = speculation
        self.max_queue = max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Handle] = deque()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)

    # ---- called from other threads -------------------------------------------------------------
    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def submit(self, handle: Handle) -> bool:
        """Queue `handle`; False when the queue is full (the caller answers 429)."""
        if self.closed or self.queue_depth() >= self.max_queue:
            return False
        handle.scheduler = self
        self.inbox.put(handle)
        return True

    def wake(self) -> None:
        self.inbox.put(None)

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True
        self.wake()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def queue_depth(self) -> int:
        return len(self.waiting) + self.inbox.qsize()

    def active_count(self) -> int:
        raise NotImplementedError

    def check(self, n_prompt: int, max_tokens: int) -> str | None:
        """Why such a request can never be served (a message for a 400), or None."""
        return None

    def kv_bytes(self) -> int:
        """Bytes of KV cache the scheduler holds (0 where the engine keeps its own)."""
        return 0

    def prefix_bytes(self) -> int:
        """Bytes of KV blocks the scheduler's prefix cache holds."""
        return 0

    # ---- the scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.closed:
            self._take_inbox(block=self.idle())
            try:
                self.step()
            except Exception as e:  # a fault fails the sequences it touched, not the server
                log.exception("engine step failed")
                self.fail_active(Failed(f"the engine failed: {type(e).__name__}: {str(e)[:200]}"))
        error = Failed("the server is shutting down")
        self.fail_active(error)
        self._take_inbox(block=False)
        for h in self.waiting:
            self._retire(h, error)
        self.waiting.clear()

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=1.0) if block else self.inbox.get_nowait()
            while True:
                if item is not None:
                    self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def idle(self) -> bool:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def fail_active(self, error: Failed) -> None:
        """Fail the sequences being generated (after an engine fault); waiting ones stay."""
        raise NotImplementedError

    def _next_waiting(self) -> Handle | None:
        """The oldest waiting handle that is still wanted (cancelled ones are dropped)."""
        while self.waiting:
            h = self.waiting[0]
            if not h.cancelled:
                return h
            self.waiting.popleft()
            self._retire(h)
        return None

    def emit(self, h: Handle, delta: Delta) -> None:
        now = time.perf_counter()
        if h.first_token is None:
            h.first_token = now
            if self.metrics:
                self.metrics.observe_ttft(now - h.arrival)
        if delta.finish_reason is not None:
            h.done = True
            if self.metrics:
                n = delta.completion_tokens
                self.metrics.finished(
                    delta.prompt_tokens, n, (n - 1) / (now - h.first_token) if n > 1 and now > h.first_token else None
                )
        self._send(h, delta)

    def _retire(self, h: Handle, error: Failed | None = None) -> None:
        """A handle leaves without finishing: cancelled (nothing sent) or failed."""
        h.spec = None  # a draft model's cache goes with its drafter
        if h.done:
            return
        h.done = True
        if error is not None:
            self._send(h, error)
        elif self.metrics:
            self.metrics.cancelled()

    @staticmethod
    def _send(h: Handle, item) -> None:
        try:
            h.sink(item)
        except Exception:  # the client's side is gone (event loop closed): nothing to tell
            log.debug("dropped an event for request %d", h.id)


class BatchScheduler(Scheduler):
    """Continuous batching on an OrtEngine (CPU): see the module docstring."""

    def __init__(
        self,
        engine,
        max_batch: int = 8,
        metrics=None,
        max_queue: int = 256,
        prefill_chunk: int = PREFILL_CHUNK,
        initial_capacity: int = 256,
        kv_budget_bytes: int | None = None,
        prefix_cache_bytes: int | None = None,
        chooser=None,
        speculation=None,
    ):
        super().__init__(engine, metrics, max_queue, speculation)
        self.chooser = chooser  # a server.threads.SessionChooser where the engine has two sessions
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.budget = plan_budget(engine, max_batch, kv_budget_bytes)
        self.initial_capacity = min(initial_capacity, self.budget.pool_capacity)
        self.pool = engine.new_pool(max_batch, self.initial_capacity, self.budget.pool_capacity)
        self.active: list[Handle] = []  # decoding in the pool; active[i].row == i
        self.lane: list[Handle] = []  # long sequences, each in its own one-row pool (h.lane_pool)
        self.prefilling: list[Handle] = []  # short prompts in the prefill call now running
        self.lane_chunk = prefill_chunk  # tokens of the lane's next prefill chunk while streams decode
        self.share_since, self.lane_time = time.perf_counter(), 0.0  # since when both have work; the lane's part
        self.released = True  # memory given back since the last work
        self.lane_used = False  # a lane sequence ran since the last release
        if prefix_cache_bytes is None:
            prefix_cache_bytes = PREFIX_CACHE_MB * 2**20
        self.prefix = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.decoded_exact = decoded_kv_exact(engine)  # whether decoded positions may be stored

    def active_count(self) -> int:
        return len(self.active) + len(self.lane)

    def idle(self) -> bool:
        return not self.active and not self.lane and not self.waiting

    def check(self, n_prompt: int, max_tokens: int) -> str | None:
        """Why a request of `n_prompt` tokens and `max_tokens` can never be served within the KV
        budget (a message for a 400), or None."""
        need = (n_prompt + max_tokens) * self.budget.per_position
        if need <= max(self.budget.lane_bytes, self.budget.pool_capacity * self.budget.per_position):
            return None
        return (
            f"the prompt and max_tokens need {need / 2**20:.0f} MB of KV cache, more than this server's budget "
            f"allows one sequence ({self.budget.lane_bytes / 2**20:.0f} MB; see --kv-budget-mb); lower max_tokens "
            "or shorten the prompt"
        )

    def kv_bytes(self) -> int:
        """Bytes of KV cache held now: the pool and every lane sequence's own rows."""
        lanes = [h.lane_pool for h in list(self.lane)]  # read from the metrics' thread: one snapshot
        return self.pool.nbytes + sum(p.nbytes for p in lanes if p is not None)

    def prefix_bytes(self) -> int:
        return self.prefix.nbytes if self.prefix is not None else 0

    def step(self) -> None:
        for h in [h for h in (*self.active, *self.lane) if h.cancelled]:
            self._leave(h)
        self._admit()
        if self.active:
            self._decode()
        now = time.perf_counter()
        others = now - self.share_since - self.lane_time  # wall time of all but the lane since both had work
        if self.lane and (not self.active or self.lane_time <= self._lane_share() * others):
            self._lane_step()
            self.lane_time += time.perf_counter() - now
        if not self.lane or not self.active:  # the share is counted only while both have work
            self.share_since, self.lane_time = time.perf_counter(), 0.0
        if self.idle() and not self.released:
            self._release()

    def _lane_share(self) -> float:
        """LANE_SHARE, times one plus the prompts waiting for the lane (at most LANE_SHARE_MAX):
        one long prompt leaves streams 3/4 of their rate; a queue of them gets more time."""
        queued = sum(1 for h in self.waiting if not self._for_pool(h))
        return min(LANE_SHARE * (1 + queued), LANE_SHARE_MAX)

    def _release(self) -> None:
        """Give memory back when nothing runs: the pool back to its first size, the engine's
        binding dropped, the C heap trimmed."""
        grown = self.pool.capacity > self.initial_capacity
        if grown:
            self.pool.resize(self.initial_capacity)
        if grown or self.lane_used:  # the binding may hold a large cache: let it go
            self.engine.release()
        draft = self.speculation.draft_engine if self.speculation is not None else None
        if draft is not None and hasattr(draft, "release"):  # its binding holds the last drafter's cache
            draft.release()
        if grown or self.lane_used:
            gc.collect()  # pools and their views refer to each other: an idle server allocates nothing to trigger it
            _malloc_trim()
        self.released, self.lane_used = True, False

    # ---- admission ------------------------------------------------------------------------------
    def _pending(self) -> list[Handle]:
        """The waiting handles still wanted, oldest first (cancelled ones retire here)."""
        for h in [h for h in self.waiting if h.cancelled]:
            self.waiting.remove(h)
            self._retire(h)
        return list(self.waiting)

    def _for_pool(self, h: Handle) -> bool:
        """A prompt short (once its cached prefix is left out) whose whole sequence fits a pool
        row prefills straight into the pool."""
        n = len(h.state.prompt_ids)
        if n + h.state.params.max_tokens > self.budget.pool_capacity:
            return False
        return n <= self.prefill_chunk or n - self._cached(h) <= self.prefill_chunk

    def _cached(self, h: Handle) -> int:
        """Prompt tokens of `h` the prefix store holds now that it may reuse (`exact_split`)."""
        if self.prefix is None:
            return 0
        if h.cached[0] != self.prefix.version:  # asked again only once blocks came or went
            n = len(h.state.prompt_ids)
            held = self.prefix.match(h.state.prompt_ids[:-2])
            h.cached = (self.prefix.version, exact_split(n, held, self.prefix.block))
        return h.cached[1]

    def _admit(self) -> None:
        """Lane sequences that now fit move into free pool rows; waiting short prompts prefill
        together into the pool; the oldest waiting long one enters the lane if memory allows."""
        if self.waiting or self.lane:
            self.released = False
        for h in [h for h in self.lane if h.prefilled == len(h.state.prompt_ids) and self._fits_pool(h)]:
            if len(self.active) >= self.max_batch:
                break
            self._to_pool(h)
        self._prefill_batch()
        if any(h.prefilled < len(h.state.prompt_ids) for h in self.lane):
            return  # one long prompt prefills at a time
        for h in self._pending():
            if not self._for_pool(h):
                self._enter_lane(h)
                return

    def _fits_pool(self, h: Handle) -> bool:
        return len(h.state.prompt_ids) + h.state.params.max_tokens <= self.budget.pool_capacity

    def _enter_lane(self, h: Handle) -> None:
        """Give `h` its own row sized to its whole sequence, if the lane's memory allows."""
        need = len(h.state.prompt_ids) + h.state.params.max_tokens
        per = self.budget.per_position
        if need * per > self.budget.lane_bytes and not self._fits_pool(h):
            self.waiting.remove(h)
            self._retire(h, Failed(self.check(len(h.state.prompt_ids), h.state.params.max_tokens) or "too long"))
            return
        used = sum(x.lane_pool.nbytes for x in self.lane if x.lane_pool is not None)
        if used + need * per > self.budget.lane_bytes and self.lane:
            return  # waits for lane memory
        self.waiting.remove(h)
        h.lane_pool = self.engine.new_pool(1, need, need)
        h.prefilled = self._reuse(h, h.lane_pool, 0)
        self.lane.append(h)
        self.lane_used = True

    def _to_pool(self, h: Handle) -> None:
        """Move a lane sequence (prefilled) into the next free pool row and drop its own row."""
        h.row = len(self.active)
        self.pool.take_row(h.lane_pool, 0, h.row)
        self.lane.remove(h)
        h.lane_pool = None
        self.active.append(h)

    def _prefill_batch(self) -> None:
        """Prefill waiting short prompts into the next free rows: each whose prefix the store
        holds on its own over those blocks (its first token out at once), then the others
        together (right-padded: rows that start empty)."""
        solo, batch = self._pick_prefills()
        for h in solo:
            self._prefill_rows([h])
        if batch:
            self._prefill_rows(batch)

    def _prefill_rows(self, batch: list[Handle]) -> None:
        """Prefill `batch` into the next free rows: one prompt over its cached prefix, or several
        from empty rows; they join the decode batch, their prompts' blocks go to the store."""
        start = len(self.active)
        for i, h in enumerate(batch):
            self.waiting.remove(h)
            h.row = start + i
            self.pool.clear_row(h.row)
        self.prefilling = batch  # off `waiting` and not yet active: an engine fault must still reach them
        if len(batch) == 1:
            reused = [self._reuse(batch[0], self.pool, start)]
        else:  # rows of a right-padded batch start empty: none looked up
            reused = [0] * len(batch)
            for _ in batch:
                self._count_lookup(0)
        ids = [h.state.prompt_ids[n:] for h, n in zip(batch, reused)]
        logits = self.engine.prefill(self.pool.rows(start, start + len(batch)), ids)
        self.prefilling = []
        for h in batch:
            assert h.row == len(self.active)
            self.active.append(h)
            h.prefilled = len(h.state.prompt_ids)
            self._remember(h, self.pool, h.row)
        self._sample(batch, logits)

    def _pick_prefills(self) -> tuple[list[Handle], list[Handle]]:
        """(prompts to prefill alone over their cached prefix, prompts to prefill together): the
        oldest waiting ones for the pool, up to about `prefill_chunk` tokens in all."""
        solo: list[Handle] = []
        batch: list[Handle] = []
        width = alone = 0  # the batch's width; the tokens the solo prompts prefill
        for h in self._pending():
            if len(self.active) + len(solo) + len(batch) >= self.max_batch:
                break
            if not self._for_pool(h):
                continue
            n, cached = len(h.state.prompt_ids), self._cached(h)
            tokens = alone + n - cached + width * len(batch) if cached else alone + max(width, n) * (len(batch) + 1)
            if (solo or batch) and tokens > self.prefill_chunk:
                break
            if cached:
                solo.append(h)
                alone += n - cached
            else:
                batch.append(h)
                width = max(width, n)
        return solo, batch

    # ---- the prefix cache -----------------------------------------------------------------------
    def _reuse(self, h: Handle, pool, row: int) -> int:
        """Copy the stored blocks of h's prompt prefix that it may reuse (`exact_split`) into
        `row` of `pool`, which is empty; returns the prompt tokens they hold."""
        if self.prefix is None:
            return 0
        held, blocks = self.prefix.lookup(h.state.prompt_ids[:-2])
        n = exact_split(len(h.state.prompt_ids), held, self.prefix.block)
        blocks = blocks[: n // self.prefix.block]
        if n:
            pool.write_prefix(row, blocks)
        self._count_lookup(n)
        return n

    def _count_lookup(self, reused: int) -> None:
        if self.metrics and self.prefix is not None:
            self.metrics.prefix_lookup(reused)

    def _remember(self, h: Handle, pool, row: int) -> None:
        """Store the whole blocks of `row` of `pool` (h's KV) that a prefill of the same tokens
        would write: its prompt, and its decoded positions where the engine makes them equal."""
        if self.prefix is None or h.prefilled < len(h.state.prompt_ids):
            return
        n = int(pool.lengths[row]) if self.decoded_exact else len(h.state.prompt_ids)
        self.prefix.insert(h.state.tokens[:n], lambda start, stop: pool.read_positions(row, start, stop))

    # ---- the work of one step -------------------------------------------------------------------
    def _lane_step(self) -> None:
        """One chunk of the prefilling lane sequence, sized to keep the streams' pauses short,
        and one decode step of each lane sequence past its prompt."""
        for h in [h for h in self.lane if h.prefilled == len(h.state.prompt_ids)]:
            self._sample([h], self.engine.decode(h.lane_pool.rows(0, 1), [h.state.next_token]))
        h = next((h for h in self.lane if h.prefilled < len(h.state.prompt_ids)), None)
        if h is None:
            return
        size = _exact_chunk(
            len(h.state.prompt_ids) - h.prefilled, self.lane_chunk if self.active else self.prefill_chunk
        )
        ids = h.state.prompt_ids[h.prefilled : h.prefilled + size]
        t = time.perf_counter()
        logits = self.engine.prefill(h.lane_pool.rows(0, 1), [ids])
        per_token = (time.perf_counter() - t) / len(ids)
        self.lane_chunk = max(MIN_CHUNK, min(self.prefill_chunk, int(LANE_SLICE_S / per_token)))
        h.prefilled += len(ids)
        if h.prefilled == len(h.state.prompt_ids):
            self._remember(h, h.lane_pool, 0)
            self._sample([h], logits)

    def _drafter(self, h: Handle):
        """h's drafter, made the first time it decodes alone (None: it decodes plainly)."""
        s = self.speculation
        if h.spec is None and not h.spec_off:
            if s is None or not speculates(self.engine, h.state):
                h.spec_off = True
            else:
                h.spec = s.start(h.state.tokens, len(h.state.prompt_ids) + h.state.params.max_tokens)
        return h.spec

    def _decode(self) -> None:
        """One batched decode step of every active sequence (rows 0..n-1); a sequence alone with
        a drafter verifies its pending token and a draft in one pass instead, where one pays."""
        lone = self.active[0] if len(self.active) == 1 else None
        spec = self._drafter(lone) if lone is not None else None
        if spec is not None:
            try:
                draft = next_draft(self.engine, spec, lone.state)
            except Exception:  # the drafter's own fault (its model): this sequence goes on plainly
                log.exception("drafting failed for request %d; it decodes without speculation", lone.id)
                lone.spec, lone.spec_off, spec, draft = None, True, None, []
            if draft:
                self._verify(lone, draft)
                return
        tokens = [h.state.next_token for h in self.active]
        trial = False
        if self.chooser is not None:
            session = self.chooser.choose(len(tokens), time.perf_counter(), self.engine.passes)
            trial = session != self.chooser.current
            self.engine.use(session)
        t0 = time.perf_counter()
        logits = self.engine.decode(self.pool.rows(0, len(self.active)), tokens)
        if spec is not None and not trial:  # what a plain pass costs (on the session in use), for the draft length
            spec.update(0, 0, time.perf_counter() - t0)
        if self.metrics:
            self.metrics.decode_step(len(tokens))
        self._sample(list(self.active), logits)

    def _verify(self, h: Handle, draft: list[int]) -> None:
        """One pass over h's pending token and `draft` (h alone in row 0): h takes the rows in
        turn while its sampled tokens agree with the draft (what `sequence_deltas` does); the
        positions of the rejected drafts are dropped."""
        rows, spec = self.pool.rows(0, 1), h.spec  # (h's drafter goes when it leaves in this pass)
        keep = int(self.pool.lengths[0]) + 1  # the pending token's position stays
        t0 = time.perf_counter()
        logits = self.engine.verify(rows, [h.state.next_token, *draft])
        seconds = time.perf_counter() - t0
        if self.metrics:
            self.metrics.decode_step(1)
        accepted = 0
        for i, row in enumerate(logits):
            self._sample([h], row[None])
            if h.row < 0 or i == len(draft) or h.state.tokens[-1] != draft[i]:
                break  # it finished (and left), or the model's token is not the draft's
            accepted += 1
        spec.update(len(draft), accepted, seconds)
        if h.row == 0:
            self.engine.truncate(rows, 0, keep + accepted)

    def _sample(self, handles: list[Handle], logits: np.ndarray) -> None:
        leaving = []
        for h, row in zip(handles, logits):
            try:
                delta = h.state.accept(row)
            except Exception as e:  # this sequence's own fault (its sampler, its grammar): it alone fails
                log.exception("sampling failed for request %d", h.id)
                self._retire(h, Failed(f"sampling failed: {type(e).__name__}: {str(e)[:200]}"))
                leaving.append(h)
                continue
            self.emit(h, delta)
            if delta.finish_reason is not None:
                leaving.append(h)
        for h in leaving:
            self._leave(h)

    def _leave(self, h: Handle) -> None:
        """Free h's memory now: a lane sequence drops its own row; in the pool, the last active
        row moves into h's."""
        if h.lane_pool is not None:
            if self.decoded_exact:
                self._remember(h, h.lane_pool, 0)
            self.lane.remove(h)
            h.lane_pool = None
            self._retire(h)
            return
        if self.decoded_exact:
            self._remember(h, self.pool, h.row)
        last = len(self.active) - 1
        i = h.row
        if i != last:
            self.pool.move_row(last, i)
            moved = self.active[last]
            moved.row, self.active[i] = i, moved
        self.active.pop()
        self.pool.clear_row(last)
        h.row = -1
        self._retire(h)

    def fail_active(self, error: Failed) -> None:
        for h in [*self.active, *self.lane, *self.prefilling]:
            h.lane_pool = None
            self._retire(h, error)
        self.active, self.lane, self.prefilling = [], [], []
        self.pool.lengths[:] = 0


class SerialScheduler(Scheduler):
    """One sequence at a time through any Engine (new_cache / prefill / decode), queued FIFO.
    Each starts from the last one's KV cache where their prompts agree, unless
    `prefix_cache_bytes` is 0; a kept cache larger than that budget (where the engine says its
    size: ONNX Runtime) is dropped."""

    def __init__(
        self, engine, metrics=None, max_queue: int = 256, prefix_cache_bytes: int | None = None, speculation=None
    ):
        super().__init__(engine, metrics, max_queue, speculation)
        self.current: Handle | None = None
        self.prefix = PrefixCache() if prefix_cache_bytes != 0 else None
        self.prefix_budget = PREFIX_CACHE_MB * 2**20 if prefix_cache_bytes is None else prefix_cache_bytes

    def prefix_bytes(self) -> int:
        """Bytes of the kept cache, where the engine says a position's size (else 0: its own)."""
        cache = self.prefix.cache if self.prefix is not None else None
        per = getattr(self.engine, "kv_bytes_per_position", None)
        return cache.batch_size * cache.capacity * per if cache is not None and per else 0

    def active_count(self) -> int:
        return int(self.current is not None)

    def idle(self) -> bool:
        return not self.waiting

    def step(self) -> None:
        h = self._next_waiting()
        if h is None:
            return
        self.waiting.popleft()
        self.current = h  # an engine fault leaves it here for fail_active
        steps = sequence_deltas(self.engine, h.state, self.prefix, self.speculation)
        try:
            for i, delta in enumerate(steps):
                if i == 0 and self.metrics and self.prefix is not None:
                    self.metrics.prefix_lookup(self.prefix.reused)
                self.emit(h, delta)
                if h.cancelled:
                    break
                self._take_inbox(block=False)  # keeps the queue depth honest
                if self.metrics and delta.finish_reason is None:
                    self.metrics.decode_step(1)
        finally:
            steps.close()
        if self.prefix_bytes() > self.prefix_budget:
            self.prefix.cache, self.prefix.tokens = None, []
        self._retire(h)
        self.current = None

    def fail_active(self, error: Failed) -> None:
        if self.current is not None:
            self._retire(self.current, error)
            self.current = None
