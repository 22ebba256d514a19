"""Schedulers: one background thread owns the engine; requests come in as `Handle`s.

`BatchScheduler` (ONNX Runtime, CPU) does continuous batching over a `KVPool` of `max_batch`
rows. Active sequences occupy rows 0..n-1 and decode together in one batched step (a view of that
prefix, so idle rows cost nothing). Newcomers prefill straight into the next free rows: several
short prompts in one right-padded batch, a long prompt alone in chunks, one chunk between decode
steps so the others keep streaming. They join the decode batch at the next step. A sequence that
finishes or is cancelled leaves at once: the last active row is copied into its slot (one copy
per layer of the used positions), keeping the prefix dense.

`SerialScheduler` serves any engine of the Engine protocol (llama.cpp) one sequence at a time.

Both keep every sequence's own sampler and stops (`SequenceState`), so a greedy sequence gets the
same tokens batched as alone.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from lmforge.generate import Delta, SequenceState, sequence_deltas
from lmforge.sampling import SamplingParams

log = logging.getLogger("lmforge.server")

PREFILL_CHUNK = 256  # tokens per prefill call: bounds how long decoding sequences wait


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
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.scheduler: Scheduler | None = None

    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            if self.scheduler is not None:
                self.scheduler.wake()


class Scheduler:
    """The thread, the inbox and the bookkeeping both schedulers share."""

    def __init__(self, engine, metrics=None, max_queue: int = 256):
        self.engine = engine
        self.metrics = metrics
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
    ):
        super().__init__(engine, metrics, max_queue)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.initial_capacity = initial_capacity
        self.pool = engine.new_pool(max_batch, initial_capacity)
        self.active: list[Handle] = []  # decoding; active[i].row == i
        self.filling: Handle | None = None  # a long prompt being prefilled in chunks, row len(active)
        self.prefilling: list[Handle] = []  # short prompts in the prefill call now running

    def active_count(self) -> int:
        return len(self.active) + (self.filling is not None)

    def idle(self) -> bool:
        return not self.active and self.filling is None and not self.waiting

    def step(self) -> None:
        for h in [h for h in self.active if h.cancelled]:
            self._leave(h)
        if self.filling is not None and self.filling.cancelled:
            h, self.filling = self.filling, None
            self.pool.clear_row(h.row)
            self._retire(h)
        self._admit()
        if self.active:
            self._decode()
        if self.idle() and self.pool.capacity > self.initial_capacity:
            self.pool.resize(self.initial_capacity)  # give long sequences' memory back when idle

    def _admit(self) -> None:
        """One prefill call: the next chunk of a long prompt, or a batch of waiting prompts."""
        if self.filling is None:
            h = self._next_waiting()
            if h is None or len(self.active) >= self.max_batch:
                return
            if len(h.state.prompt_ids) > self.prefill_chunk:
                self.waiting.popleft()
                self.filling, h.row, h.prefilled = h, len(self.active), 0
            else:
                self._prefill_batch()
                return
        h = self.filling
        ids = h.state.prompt_ids[h.prefilled : h.prefilled + self.prefill_chunk]
        logits = self.engine.prefill(self.pool.rows(h.row, h.row + 1), [ids])
        h.prefilled += len(ids)
        if h.prefilled == len(h.state.prompt_ids):
            self.filling = None
            self._join([h], logits)

    def _prefill_batch(self) -> None:
        """Prefill waiting short prompts together (right-padded) into the next free rows."""
        batch: list[Handle] = []
        width = 0
        while len(self.active) + len(batch) < self.max_batch:
            h = self._next_waiting()
            if h is None:
                break
            n = len(h.state.prompt_ids)
            if n > self.prefill_chunk or (batch and max(width, n) * (len(batch) + 1) > self.prefill_chunk):
                break
            width = max(width, n)
            batch.append(self.waiting.popleft())
        start = len(self.active)
        for i, h in enumerate(batch):
            h.row = start + i
            self.pool.clear_row(h.row)
        self.prefilling = batch  # off `waiting` and not yet active: an engine fault must still reach them
        logits = self.engine.prefill(self.pool.rows(start, start + len(batch)), [h.state.prompt_ids for h in batch])
        self.prefilling = []
        self._join(batch, logits)

    def _join(self, handles: list[Handle], logits: np.ndarray) -> None:
        """Prefilled sequences (in the rows right after the active ones) join the decode batch
        and sample their first tokens from `logits` (one row each)."""
        for h in handles:
            assert h.row == len(self.active)
            self.active.append(h)
            h.prefilled = len(h.state.prompt_ids)
        self._sample(handles, logits)

    def _decode(self) -> None:
        """One batched decode step of every active sequence (rows 0..n-1)."""
        tokens = [h.state.next_token for h in self.active]
        logits = self.engine.decode(self.pool.rows(0, len(self.active)), tokens)
        if self.metrics:
            self.metrics.decode_step(len(tokens))
        self._sample(list(self.active), logits)

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
        """Free h's row now: the last active row moves into it; a filling row follows."""
        last = len(self.active) - 1
        i = h.row
        if i != last:
            self.pool.move_row(last, i)
            moved = self.active[last]
            moved.row, self.active[i] = i, moved
        self.active.pop()
        self.pool.clear_row(last)
        if self.filling is not None:  # it sat right after the old last row
            self.pool.move_row(self.filling.row, last)
            self.filling.row = last
        h.row = -1
        self._retire(h)

    def fail_active(self, error: Failed) -> None:
        for h in [*self.active, *([self.filling] if self.filling else []), *self.prefilling]:
            self._retire(h, error)
        self.active, self.filling, self.prefilling = [], None, []
        self.pool.lengths[:] = 0


class SerialScheduler(Scheduler):
    """One sequence at a time through any Engine (new_cache / prefill / decode), queued FIFO."""

    def __init__(self, engine, metrics=None, max_queue: int = 256):
        super().__init__(engine, metrics, max_queue)
        self.current: Handle | None = None

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
        steps = sequence_deltas(self.engine, h.state)
        try:
            for delta in steps:
                self.emit(h, delta)
                if h.cancelled:
                    break
                self._take_inbox(block=False)  # keeps the queue depth honest
                if self.metrics and delta.finish_reason is None:
                    self.metrics.decode_step(1)
        finally:
            steps.close()
        self._retire(h)
        self.current = None

    def fail_active(self, error: Failed) -> None:
        if self.current is not None:
            self._retire(self.current, error)
            self.current = None
