"""One sequence's generation state, fed one row of logits at a time.

The batched scheduler cannot pull from `stream_generate` (one generator per engine call), so this
is the same per-token logic as a push API: sample, EOS, stop strings held back until they can no
longer begin (generate.py's `_stop_hold`/`_find_stop`), the streaming detokenizer, max tokens.
The texts equal `stream_generate`'s for the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmforge.generate import _find_stop, _stop_hold
from lmforge.sampling import make_sampler


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for; validated by the API layer."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class TokenLogprob:
    """A generated token, its logprob, and the most likely alternatives [(id, logprob)]."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """What one step adds to a sequence: text (maybe empty), tokens with logprobs when asked,
    and on the last step the finish reason ("stop" | "length") and the token counts."""

    text: str
    tokens: list[TokenLogprob]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (B, V)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class SequenceState:
    """Turns logits into tokens and text for one request; `accept` returns the Delta of a step."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams, eos_token_ids):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        greedy = params.temperature <= 0 or params.top_p <= 0
        self.sampler = make_sampler(0.0 if greedy else params.temperature, 1.0 if greedy else params.top_p,
                                    seed=params.seed)
        self.eos = frozenset(eos_token_ids)
        self.stops = [s for s in params.stop if s]
        self.detok = tokenizer.detokenizer()
        self.text, self.emitted = "", 0
        self.n = 0  # generated tokens, EOS not counted (as stream_generate)
        self.counts: dict[int, int] = {}  # token -> times generated, for the OpenAI penalties
        self.finish_reason: str | None = None
        self.next_token: int | None = None  # the token the next decode step feeds

    def _process(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        if not (p.logit_bias or (self.counts and (p.presence_penalty or p.frequency_penalty))):
            return logits
        logits = logits.astype(np.float32, copy=True)
        for token, bias in p.logit_bias:
            logits[token] += bias
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            freq = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            logits[ids] -= p.presence_penalty + p.frequency_penalty * freq
        return logits

    def accept(self, logits: np.ndarray) -> Delta:
        """Sample the next token from one row of logits (V,) and advance; sets `finish_reason`
        on the last step and `next_token` otherwise."""
        p = self.params
        logits = self._process(logits)
        token = self.sampler(logits)
        info = []
        if p.logprobs:
            lp = log_softmax_rows(logits[None])[0]
            top = []
            if p.top_logprobs:
                best = np.argpartition(-lp, p.top_logprobs)[: p.top_logprobs]
                best = best[np.argsort(-lp[best], kind="stable")]
                top = [(int(t), float(lp[t])) for t in best]
            info = [TokenLogprob(token, float(lp[token]), top)]
        if token in self.eos:
            return self._finish(self.text[self.emitted:], [], "stop")
        self.n += 1
        self.counts[token] = self.counts.get(token, 0) + 1
        self.text += self.detok.add(token)
        cut = _find_stop(self.text, self.stops, self.emitted)
        if cut >= 0:
            return self._finish(self.text[self.emitted:cut], info, "stop")
        safe = len(self.text) - _stop_hold(self.text, self.stops)
        piece, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        if self.n >= p.max_tokens:
            return self._finish(piece + self.text[self.emitted:] + self.detok.flush(), info, "length")
        self.next_token = token
        return Delta(piece, info)

    def _finish(self, text: str, info: list[TokenLogprob], reason: str) -> Delta:
        self.finish_reason = reason
        self.next_token = None
        return Delta(text, info, reason, len(self.prompt_ids), self.n)
