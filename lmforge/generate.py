"""Generation as generators: `generate_step` yields token ids with their logprobs;
`stream_generate` adds text (streaming detokenizer), stop strings, EOS, limits and timing."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from lmforge.errors import LmforgeError
from lmforge.sampling import Sampler, log_softmax, make_sampler


def generate_step(engine, prompt_ids: Sequence[int], sampler: Sampler | None = None,
                  logits_processors=(), max_tokens: int = 256) -> Iterator[tuple[int, float]]:
    """Yield (token id, logprob) pairs: prefill the prompt, then one decode step per token.

    The generator stops after `max_tokens`; the caller stops it earlier for EOS or stops."""
    sampler = sampler or make_sampler()
    prompt_ids = list(prompt_ids)
    cache = engine.new_cache(1, len(prompt_ids) + max_tokens)
    logits = engine.prefill(cache, [prompt_ids])[0]
    tokens = list(prompt_ids)
    for _ in range(max_tokens):
        for proc in logits_processors:
            logits = proc(tokens, logits)
        token = sampler(logits)
        yield token, float(log_softmax(logits)[token])
        tokens.append(token)
        logits = engine.decode(cache, [token])[0]


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: the new text and the running statistics."""

    text: str
    token: int | None
    logprob: float | None
    finish_reason: str | None  # "stop" | "length" | None while generating
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    ttft: float  # seconds from the call to the first generated token


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


def stream_generate(engine, tokenizer, prompt_ids: Sequence[int], max_tokens: int = 256,
                    sampler: Sampler | None = None, logits_processors=(), stop: Sequence[str] = (),
                    eos_token_ids: Sequence[int] | None = None) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token (text may be empty while a character or
    a possible stop string is incomplete); the last one carries `finish_reason`."""
    prompt_ids = list(prompt_ids)
    n_prompt = len(prompt_ids)
    if n_prompt >= engine.context_length:
        raise LmforgeError(f"prompt has {n_prompt} tokens but the model's context is {engine.context_length}; "
                           "shorten the prompt")
    max_tokens = min(max_tokens, engine.context_length - n_prompt)
    eos = set(eos_token_ids if eos_token_ids is not None else engine.eos_token_ids)
    stops = [s for s in stop if s]
    detok = tokenizer.detokenizer()
    start = time.perf_counter()
    first = None
    text, emitted = "", 0
    n = 0
    steps = generate_step(engine, prompt_ids, sampler, logits_processors, max_tokens)

    def response(piece, token, logprob, reason):
        now = time.perf_counter()
        t_first = (first or now) - start
        decode_time = now - (first or now)
        return GenerationResponse(piece, token, logprob, reason, n_prompt, n,
                                  n_prompt / t_first if t_first > 0 else 0.0,
                                  (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0, t_first)

    try:
        for token, logprob in steps:
            if first is None:
                first = time.perf_counter()
            if token in eos:
                yield response(text[emitted:], token, logprob, "stop")
                return
            n += 1
            text += detok.add(token)
            cut = _find_stop(text, stops, emitted)
            if cut >= 0:
                yield response(text[emitted:cut], token, logprob, "stop")
                return
            safe = len(text) - _stop_hold(text, stops)
            piece, emitted = text[emitted:safe], max(emitted, safe)
            if n >= max_tokens:
                yield response(piece + text[emitted:] + detok.flush(), token, logprob, "length")
                return
            yield response(piece, token, logprob, None)
        yield response(text[emitted:] + detok.flush(), None, None, "length")
    finally:
        steps.close()


def greedy_tokens(engine, prompt_ids, n: int) -> list[int]:
    """n greedy tokens (no EOS stop): a helper for parity checks."""
    return [t for t, _ in generate_step(engine, prompt_ids, make_sampler(), max_tokens=n)]

