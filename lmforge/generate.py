"""The one per-token state machine and the loop that drives it on one sequence.

`SequenceState` turns one row of logits at a time into a token and a `Delta` of text: logits
processors and the sampler (`SamplingParams`), EOS, stop strings held back until they can no
longer begin, the streaming detokenizer, logprobs, max tokens and the finish reason. Every caller
drives it: `stream_generate` (library, CLI, batch) through `sequence_deltas`, the server's
schedulers row by row in a batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.sampling import LogitsProcessor, SamplingParams, log_softmax, make_sampler


class ContextLengthError(LmforgeError):
    """The prompt leaves no room in the model's context."""


def fit_to_context(n_prompt: int, params: SamplingParams, context_length: int) -> SamplingParams:
    """`params` with max_tokens cut to what the context leaves after the prompt."""
    if n_prompt >= context_length:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens but the model's context is {context_length}; shorten the prompt"
        )
    room = context_length - n_prompt
    return params if params.max_tokens <= room else replace(params, max_tokens=room)


@dataclass
class TokenLogprob:
    """A generated token, its logprob, and the most likely alternatives [(id, logprob)]."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """What one step adds to a sequence: text (maybe empty), the sampled token (EOS included),
    its logprobs when asked (EOS excluded), and on the last step the finish reason
    ("stop" | "length"); the token counts so far."""

    text: str
    token: int
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def _stop_hold(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could still begin a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Earliest index >= start where a stop string begins, or -1. Text before `start` was
    emitted only once no stop string could begin in it."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


def _top_logprobs(lp: np.ndarray, k: int) -> list[tuple[int, float]]:
    if not k:
        return []
    best = np.argpartition(-lp, k)[:k]
    best = best[np.argsort(-lp[best], kind="stable")]
    return [(int(t), float(lp[t])) for t in best]


class SequenceState:
    """One sequence's generation state, fed one row of logits at a time by `accept`.

    tokenizer None: tokens only, no text (parity checks). `vocab_size` (the logits' width) checks
    logit_bias ids and sizes the grammar's mask. A constraint that does not compile raises
    SamplingError here, before any engine work."""

    def __init__(
        self, tokenizer, prompt_ids: Sequence[int], params: SamplingParams, eos_token_ids, vocab_size: int | None = None
    ):
        self.prompt_ids = list(prompt_ids)
        self.tokens = list(prompt_ids)  # the prompt and every generated token, for the penalties
        self.params = params
        self.sample = make_sampler(params)
        self.process = LogitsProcessor(params, vocab_size)
        self.eos = frozenset(eos_token_ids)
        self.constraint = None
        if params.constraint is not None:
            from lmforge.constrain import Constraint

            self.constraint = Constraint(*params.constraint, tokenizer, vocab_size or tokenizer.vocab_size, self.eos)
        self.stops = [s for s in params.stop if s]
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.text, self.emitted = "", 0
        self.n = 0  # generated tokens, EOS not counted
        self.finish_reason: str | None = None
        self.next_token: int | None = None  # the token the next decode step feeds

    def accept(self, logits: np.ndarray) -> Delta:
        """Sample the next token from one row of logits (V,) and advance; sets `finish_reason`
        on the last step and `next_token` otherwise."""
        p = self.params
        logits = self.process(self.tokens, logits)
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        token = self.sample(logits)
        info = []
        if p.logprobs:
            lp = log_softmax(logits)
            info = [TokenLogprob(token, float(lp[token]), _top_logprobs(lp, p.top_logprobs))]
        if token in self.eos:  # the text held back ends here, a cut character too (as at max_tokens)
            rest = self.text[self.emitted :] + (self.detok.flush() if self.detok is not None else "")
            return self._finish(rest, token, [], "stop")
        self.n += 1
        self.tokens.append(token)
        self.process.generated(token)
        if self.detok is not None:
            self.text += self.detok.add(token)
        cut = _find_stop(self.text, self.stops, self.emitted)
        if cut >= 0:
            return self._finish(self.text[self.emitted : cut], token, info, "stop")
        safe = len(self.text) - _stop_hold(self.text, self.stops)
        piece, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        if self.n >= p.max_tokens:
            rest = self.text[self.emitted :] + (self.detok.flush() if self.detok is not None else "")
            return self._finish(piece + rest, token, info, "length")
        self.next_token = token
        if self.constraint is not None:  # only a sequence that goes on needs its next mask
            self.constraint.advance(token)
        return Delta(piece, token, info, None, len(self.prompt_ids), self.n)

    def _finish(self, text: str, token: int, info: list[TokenLogprob], reason: str) -> Delta:
        self.finish_reason = reason
        self.next_token = None
        return Delta(text, token, info, reason, len(self.prompt_ids), self.n)


@dataclass
class PrefixCache:
    """A KV cache kept from one call to the next and the tokens it holds: the next prompt
    prefills only what follows the longest prefix it shares with them (a chat that grows turn by
    turn prefills only the new turn)."""

    cache: object | None = None
    tokens: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens the last call took from the cache


def _live(engine, cache) -> bool:
    """Whether `cache` can still be used on `engine` (llama.cpp's single context serves only
    its newest cache; other engines' caches live until dropped)."""
    check = getattr(engine, "cache_is_live", None)
    return check is None or check(cache)


def decoded_kv_exact(engine) -> bool:
    """Whether a decoded position's KV equals what a prefill of the same tokens writes (to float
    rounding): only then may a kept cache hold decoded positions, else only prefilled ones
    (int8-compute int4 graphs and llama.cpp round a one-row pass unlike a prefill)."""
    return getattr(engine, "decoded_kv_exact", getattr(engine, "exact_verify", False))


PREFILL_TILE = 128  # ONNX Runtime's CPU attention takes a prefill's queries in tiles of this many


def exact_split(n: int, k: int, step: int = 1) -> int:
    """The largest k' <= k, a multiple of `step` (or 0), such that prefilling the last n - k' of n
    tokens over the first k' (as one pass wrote them) gives what one pass of all n gives. The pass
    must hold two tokens at least and end as one pass does: ONNX Runtime's CPU attention computes
    a tile of one query row (the last row of a pass of 128j + 1 tokens) as a decode step does,
    which rounds unlike a row of a larger tile (logits ~0.5 apart on the default int4 model)."""
    k = max(0, min(k, n - 2)) // step * step
    while k > 0 and ((n - k) % PREFILL_TILE == 1) != (n % PREFILL_TILE == 1):
        k -= step
    return k


def _draft_room(engine, state: SequenceState) -> int:
    """How many tokens may be drafted now: the tokens left, and at most one batch of the engine
    (llama.cpp's n_batch) for the pending token and the draft together."""
    room = state.params.max_tokens - state.n - 1
    batch = getattr(engine, "n_batch", None)
    return room if batch is None else min(room, batch - 1)


def _in_vocabulary(engine, draft: list[int]) -> list[int]:
    """The draft up to its first id outside the target's logits (a wider draft model's)."""
    for i, t in enumerate(draft):
        if not 0 <= t < engine.vocab_size:
            return draft[:i]
    return draft


def next_draft(engine, spec, state: SequenceState) -> list[int]:
    """The tokens `spec` (a drafter of lmforge.speculative) drafts after `state`'s pending token:
    within the tokens left and the engine's batch, and the target's vocabulary."""
    return _in_vocabulary(engine, spec.draft(state.tokens, _draft_room(engine, state)))


def _open_cache(engine, state: SequenceState, prefix: PrefixCache | None):
    """(cache, n): a cache for `state` whose first n prompt tokens are already in it (from
    `prefix`, cut back to the shared prefix, leaving at least two prompt tokens to prefill)."""
    prompt = state.prompt_ids
    need = len(prompt) + state.params.max_tokens  # drafts never reach past the last token's position
    cache = prefix.cache if prefix is not None else None
    n = 0
    fits = cache is not None and (need <= cache.capacity or hasattr(cache, "reserve"))  # ORT's caches grow
    if fits and _live(engine, cache):
        limit = min(len(prefix.tokens), len(prompt), int(cache.lengths[0]))
        while n < limit and prefix.tokens[n] == prompt[n]:
            n += 1
        n = exact_split(len(prompt), n)
        engine.truncate(cache, 0, n)
    else:
        cache = engine.new_cache(1, need)
    if prefix is not None:
        prefix.cache, prefix.tokens, prefix.reused = None, [], n  # until the sequence ends well
    return cache, n


def speculates(engine, state: SequenceState) -> bool:
    """Whether `state` may draft and verify on `engine`: the engine verifies several tokens in
    one pass, and no output constraint (a grammar's mask per drafted row costs more than
    speculation saves)."""
    return state.params.constraint is None and getattr(engine, "supports_verify", False)


def sequence_deltas(
    engine, state: SequenceState, prefix: PrefixCache | None = None, speculation=None
) -> Iterator[Delta]:
    """Drive `state` on its own cache of `engine`: prefill, then one forward pass per step until
    the state finishes: a decode of the pending token, or with `speculation` (a
    `lmforge.speculative.Speculation`) a verify of the pending token and the tokens drafted after
    it, whose rows the state takes in turn while they agree with the draft. `prefix` (a
    PrefixCache) gives a cache to start from and keeps this one. The caller may stop early."""
    if not speculates(engine, state):
        speculation = None
    capacity = len(state.prompt_ids) + state.params.max_tokens
    spec = speculation.start(state.tokens, capacity) if speculation is not None else None
    cache, start = _open_cache(engine, state, prefix)
    keep = len(state.prompt_ids)  # the cache's first `keep` positions hold state.tokens[:keep]
    clean, seconds, draft = False, 0.0, []  # clean: stopped at a yield, so the cache agrees with `keep`
    try:
        rows = engine.prefill(cache, [state.prompt_ids[start:]])
        while True:
            for i, row in enumerate(rows):
                clean = True
                delta = state.accept(row)
                yield delta
                if delta.finish_reason is not None or i == len(draft) or delta.token != draft[i]:
                    break
                clean = False
                keep += 1  # draft i was kept: its KV, written by this pass, stays
            if spec is not None and seconds:
                spec.update(len(draft), i, seconds)
            if delta.finish_reason is not None:
                return
            clean = False
            if draft:
                engine.truncate(cache, 0, keep)
            if spec is not None:
                draft = next_draft(engine, spec, state)
            t0 = time.perf_counter()
            pending = [state.next_token]
            rows = engine.verify(cache, pending + draft) if draft else engine.decode(cache, pending)
            seconds = time.perf_counter() - t0
            keep += 1
    finally:
        # a newer call may own the engine's context or have kept its cache already
        if prefix is not None and clean and prefix.cache is None and _live(engine, cache):
            if not decoded_kv_exact(engine):
                keep = min(keep, len(state.prompt_ids))  # only what prefill wrote
            engine.truncate(cache, 0, keep)
            prefix.cache, prefix.tokens = cache, state.tokens[:keep]


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: the step's Delta fields and the running statistics."""

    text: str
    token: int
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # "stop" | "length" | None while generating
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    ttft: float  # seconds from the call to the first generated token


def stream_generate(
    engine,
    tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    eos_token_ids: Sequence[int] | None = None,
    prefix: PrefixCache | None = None,
    speculation=None,
) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token (text may be empty while a character or
    a possible stop string is incomplete); the last one carries `finish_reason`.

    Args: an engine, a tokenizer (None: no text), the prompt's token ids, the sampling options,
    the EOS ids (default: the engine's); a PrefixCache to start from and keep the cache in; a
    `lmforge.speculative.Speculation` (None, an engine that cannot verify, or an output
    constraint: plain decoding). max_tokens is cut to what the context leaves."""
    prompt_ids = list(prompt_ids)
    params = fit_to_context(len(prompt_ids), params or SamplingParams(), engine.context_length)
    eos = engine.eos_token_ids if eos_token_ids is None else eos_token_ids
    state = SequenceState(tokenizer, prompt_ids, params, eos, engine.vocab_size)
    start = time.perf_counter()
    first = None
    steps = sequence_deltas(engine, state, prefix, speculation)
    try:
        for d in steps:
            now = time.perf_counter()
            first = first or now
            t_first, decode_time = first - start, now - first
            n = d.completion_tokens
            yield GenerationResponse(
                d.text,
                d.token,
                d.logprobs,
                d.finish_reason,
                d.prompt_tokens,
                n,
                d.prompt_tokens / t_first if t_first > 0 else 0.0,
                (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
                t_first,
            )
    finally:
        steps.close()


def greedy_tokens(engine, prompt_ids, n: int) -> list[int]:
    """n greedy tokens (no EOS stop): a helper for parity checks."""
    return [r.token for r in stream_generate(engine, None, prompt_ids, SamplingParams(max_tokens=n), ())]
