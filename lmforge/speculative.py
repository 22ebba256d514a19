"""Speculative decoding: draft tokens cheaply, verify them in one pass of the target model.

A drafter proposes a continuation of the sequence; the engine runs the pending token and the k
drafted ones in one forward pass (`engine.verify`) and returns k + 1 rows of logits. The rows go
through the sequence's `SequenceState` one at a time, exactly as plain decoding would feed them,
until the sampled token differs from the draft; the cache is then cut back to the tokens kept
(`engine.truncate`), so it holds what plain decoding's would.

With an n-gram draft (a point mass q on the drafted token) "sample from the target's p, keep the
draft if the sample equals it" is the speculative-sampling rule itself: the draft is kept with
probability p(d) = min(1, p(d)/q(d)), and a rejection's sample is distributed as p without d,
renormalised: the residual max(0, p - q). Every token is therefore drawn from the target's
distribution, with the same random numbers as plain decoding.

The draft length is not fixed: each step drafts the k that maximises the expected tokens per
unit of verify time, from the recent acceptance rate of that kind of draft (its n-gram order, and
whether the last verify kept its whole draft) and the measured cost of a pass of k + 1 tokens
against a pass of one. Where no k pays, it decodes plainly.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError

MODES = ("ngram", "draft", "off")
DRAFT_MAX = 16  # default ceiling of the adaptive draft length
MAX_ORDER = 6  # longest n-gram the prompt lookup matches
# shortest: a lone matching token foretells too little to pay for a verify (the default model's
# greedy answers to benchmarks/speculative.py's workloads, replayed through this drafter at
# cpu-int4's measured verify costs: drafting from 1-gram matches too lost 4-5% on code, extraction
# and open text, 1.5% on the chat)
MIN_ORDER = 2
_PRIOR_RATE = 0.6  # acceptance rate assumed before (or long after) any evidence
_DECAY = 0.8  # weight of older evidence at each update: the rate follows the recent past


@dataclass
class SpecStats:
    """Counts over every sequence decoded with one `Speculation`: forward passes after prefill,
    tokens they produced, passes that verified drafts, drafted and accepted tokens."""

    passes: int = 0
    tokens: int = 0
    verifies: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens a pass that verified drafts produced, on average (accepted drafts + 1)."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else 0.0

    def summary(self) -> str:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return (
            f"speculative: {self.tokens_per_pass:.2f} tokens per pass, {self.tokens_per_verify:.2f} per verify "
            f"({self.verifies} verifies of {self.passes} passes; {self.accepted}/{self.drafted} drafts accepted, "
            f"{rate:.0%})"
        )


@dataclass
class VerifyCost:
    """Seconds a pass takes against its token count m, learnt online as t(m) = t(1) * (1 + slope
    * (m - 1)): the slope is the median over the pass sizes seen of their median time's excess
    over a one-token pass's, so that passes slowed by a busy machine do not swing it."""

    slope: float = 0.15  # extra cost of each further token, as a share of a one-token pass
    samples: dict[int, deque] = field(default_factory=dict)  # m -> recent seconds

    def ratio(self, m: int) -> float:
        """The cost of a pass of m tokens in one-token passes."""
        return 1.0 + self.slope * (m - 1)

    def observe(self, m: int, seconds: float) -> None:
        self.samples.setdefault(m, deque(maxlen=9)).append(seconds)
        one = self.samples.get(1, ())
        if len(one) < 3 or m == 1 and len(self.samples) == 1:
            return
        base = statistics.median(one)
        slopes = [
            (statistics.median(t) / base - 1.0) / (k - 1) for k, t in self.samples.items() if k > 1 and len(t) >= 3
        ]
        if slopes:
            self.slope = min(1.0, max(0.02, statistics.median(slopes)))

    @property
    def t1(self) -> float:
        """Median seconds of a one-token pass (0: not measured yet)."""
        one = self.samples.get(1, ())
        return statistics.median(one) if one else 0.0


@dataclass
class Speculation:
    """How to speculate, shared by the calls of one Model or command: mode "ngram" (prompt
    lookup) or "draft" (a draft model: `draft_engine`), `draft_max` (the ceiling of the adaptive
    draft length), and what it learnt: the verify cost and the running statistics."""

    mode: str = "ngram"
    draft_max: int = DRAFT_MAX
    draft_engine: object | None = None
    cost: VerifyCost = field(default_factory=VerifyCost)
    stats: SpecStats = field(default_factory=SpecStats)

    def __post_init__(self):
        check_options(self.mode, self.draft_max)
        if self.mode == "draft" and self.draft_engine is None:
            raise LmforgeError("--speculative draft needs a draft model: give --draft MODEL")

    def start(self, tokens: list[int], capacity: int) -> NgramSpeculator | DraftModelSpeculator:
        """The per-sequence drafter for a sequence that begins with `tokens` and may grow to
        `capacity` tokens."""
        if self.mode == "draft":
            return DraftModelSpeculator(self.draft_engine, tokens, capacity, self.draft_max, self.cost, self.stats)
        return NgramSpeculator(tokens, self.draft_max, self.cost, self.stats)


def check_options(mode: str, draft_max: int) -> None:
    """A user error for an unknown mode or a draft length below 1."""
    if mode not in MODES:
        raise LmforgeError(f"unknown --speculative {mode!r}; choose one of: {', '.join(MODES)}")
    if isinstance(draft_max, bool) or not isinstance(draft_max, int) or draft_max < 1:
        raise LmforgeError(f"--draft-max must be an integer >= 1, got {draft_max!r}")


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one verify of k drafts yields when each draft is kept with probability `rate`
    (given the ones before it were): the kept drafts and the target's own next token."""
    if rate >= 1.0:
        return k + 1.0
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


class NgramIndex:
    """Where each n-gram (n = MIN_ORDER..MAX_ORDER) of a growing token list last occurred, so that the
    continuation of the list's suffix can be looked up in O(MAX_ORDER)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.indexed = 0  # tokens whose n-grams ending before them are in the index
        self.next_at: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_ORDER + 1)]

    def extend(self, tokens: list[int]) -> None:
        """Catch up with `tokens` (the old list extended): index every n-gram that has a token after it."""
        self.tokens = tokens
        for j in range(max(1, self.indexed), len(tokens)):  # n-grams ending at j - 1, continued at j
            for n in range(MIN_ORDER, min(MAX_ORDER, j) + 1):
                self.next_at[n][tuple(tokens[j - n : j])] = j
        self.indexed = len(tokens)

    def lookup(self, limit: int) -> tuple[int, list[int]]:
        """(order, continuation of up to `limit` tokens) of the longest n-gram suffix of the list
        that occurred before; (0, []) when none did."""
        t = self.tokens
        for n in range(min(MAX_ORDER, len(t)), MIN_ORDER - 1, -1):
            j = self.next_at[n].get(tuple(t[len(t) - n :]))
            if j is not None:
                return n, t[j : j + limit]
        return 0, []


class _Adaptive:
    """The draft length rule shared by the drafters: acceptance rates per kind of draft (n-gram
    order and whether the last draft was kept whole; 0 for a draft model), decayed so they follow
    the recent past, and the verify cost."""

    def __init__(self, draft_max: int, cost: VerifyCost, stats: SpecStats, kinds: int):
        self.draft_max, self.cost, self.stats = draft_max, cost, stats
        self.kept = [0.0] * kinds  # decayed counts of kept drafts, per kind
        self.tried = [0.0] * kinds  # decayed counts of drafts that were checked
        self.kind = 0

    def best_length(self, kind: int, limit: int, per_draft: float = 0.0) -> int:
        """The k in 0..limit with the most expected tokens per unit of time, drafting costing
        `per_draft` one-token passes per token; 0 also lets old evidence fade, so that this kind
        of draft is tried again later."""
        rate = (self.kept[kind] + _PRIOR_RATE) / (self.tried[kind] + 1.0)
        ratio = self.cost.ratio
        best = max(range(limit + 1), key=lambda k: expected_tokens(rate, k) / (ratio(k + 1) + per_draft * k))
        if best == 0:
            self.kept[kind] *= _DECAY
            self.tried[kind] *= _DECAY
        self.kind = kind
        return best

    def update(self, drafted: int, accepted: int, seconds: float) -> None:
        """Record a pass that verified `drafted` tokens and kept `accepted` of them in `seconds`."""
        self.cost.observe(drafted + 1, seconds)
        s = self.stats
        s.passes += 1
        s.tokens += accepted + 1
        if drafted:
            o = self.kind
            self.kept[o] = _DECAY * self.kept[o] + accepted
            self.tried[o] = _DECAY * self.tried[o] + accepted + (accepted < drafted)
            s.verifies += 1
            s.drafted += drafted
            s.accepted += accepted


class NgramSpeculator(_Adaptive):
    """Prompt-lookup drafts for one sequence: the continuation of the longest earlier match of
    the sequence's suffix, its length chosen per kind of draft: the n-gram order, and whether the
    last verify kept its whole draft (a sequence copying a passage tends to go on copying it;
    replayed as for MIN_ORDER, keeping that apart gained 12% on extraction, 1% on code and chat)."""

    def __init__(self, tokens: list[int], draft_max: int, cost: VerifyCost, stats: SpecStats):
        super().__init__(draft_max, cost, stats, 2 * (MAX_ORDER + 1))
        self.index = NgramIndex()
        self.index.extend(tokens)
        self.copying = 0  # 1: the last verify kept every drafted token

    def draft(self, tokens: list[int], room: int) -> list[int]:
        """The tokens to verify after `tokens` (whose last one is the pending token), at most
        `room`; [] when drafting does not pay."""
        self.index.extend(tokens)
        order, cont = self.index.lookup(min(self.draft_max, room))
        return cont[: self.best_length(order + self.copying * (MAX_ORDER + 1), len(cont))] if cont else []

    def update(self, drafted: int, accepted: int, seconds: float) -> None:
        super().update(drafted, accepted, seconds)
        if drafted:
            self.copying = int(accepted == drafted)


class DraftModelSpeculator(_Adaptive):
    """Drafts from a small model with the target's vocabulary, on its own cache: its greedy
    continuation. A deterministic draft is a point mass q, so the sampled-token comparison is the
    speculative-sampling rule here too."""

    def __init__(self, engine, tokens: list[int], capacity: int, draft_max: int, cost: VerifyCost, stats: SpecStats):
        super().__init__(draft_max, cost, stats, 1)
        self.engine = engine
        self.capacity = min(capacity, engine.context_length)
        self.cache = engine.new_cache(1, self.capacity)
        self.fed: list[int] = []  # the tokens in the draft model's cache
        self.step = 0.0  # seconds of one draft decode step (0: not measured yet)

    def draft(self, tokens: list[int], room: int) -> list[int]:
        per_draft = self.step / self.cost.t1 if self.step and self.cost.t1 else 0.3
        room = min(room, self.engine.context_length - len(tokens))  # a draft model's context may be shorter
        k = self.best_length(0, min(self.draft_max, room), per_draft) if room > 0 else 0
        if not k:
            return []
        e, n = self.engine, 0
        check = getattr(e, "cache_is_live", None)
        if check is not None and not check(self.cache):  # llama.cpp's one context served another sequence since
            self.cache, self.fed = e.new_cache(1, self.capacity), []
        limit = min(len(self.fed), len(tokens) - 1)
        while n < limit and self.fed[n] == tokens[n]:
            n += 1
        e.truncate(self.cache, 0, n)
        logits = e.prefill(self.cache, [tokens[n:]])[0]
        self.fed = list(tokens)
        out = [int(logits.argmax())]
        t0 = time.perf_counter()
        for _ in range(k - 1):
            self.fed.append(out[-1])
            out.append(int(e.decode(self.cache, [out[-1]])[0].argmax()))
        if k > 1:
            step = (time.perf_counter() - t0) / (k - 1)
            self.step = step if not self.step else 0.8 * self.step + 0.2 * step
        return out
