"""Sampling: one `SamplingParams` for every caller (library, CLI, server, batch), validated once,
and the pure functions over one row of float32 logits that apply it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import numpy as np

from lmforge.errors import LmforgeError

Sampler = Callable[[np.ndarray], int]

REPETITION_WINDOW = 64  # tokens the repetition penalty looks back over (llama.cpp's repeat_last_n)


class SamplingError(LmforgeError):
    """A sampling option out of range; `param` names it (the server answers 400 with it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Every option that shapes a generation, under the names the CLI (`--top-k`), the Python API
    (`top_k=`), the server (`"top_k"`) and batch records all use.

    Applied per token in this order: logit_bias, repetition_penalty (transformers' rule over the
    last 64 tokens, prompt included), presence/frequency penalties (OpenAI's rule over generated
    tokens), the output constraint's mask (json_schema, regex or grammar: lmforge.constrain), then
    temperature, top_k, top_p, min_p and a seeded draw (greedy at temperature 0)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: str | None = None  # a JSON Schema (dict or JSON text; kept as text) the output must follow
    regex: str | None = None  # a regular expression the whole output must match
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) the output must follow

    def __post_init__(self):
        # Normalise the containers callers naturally pass (a dict of biases, a list or str of stops).
        object.__setattr__(self, "logit_bias", _biases(self.logit_bias))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop or ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise SamplingError("stop", "stop must be a string or a list of strings")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.logprobs, bool):
            raise SamplingError("logprobs", "logprobs must be true or false")
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", _schema_text(self.json_schema))
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise SamplingError(name, f"{name} must be a non-empty string")
        given = [n for n in CONSTRAINTS if getattr(self, n) is not None]
        if len(given) > 1:
            raise SamplingError(given[1], f"give one of {', '.join(CONSTRAINTS)}, not {' and '.join(given)}")
        for name, lo, hi, kind in _RANGES:
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            value = _int(value, name) if kind is int else _num(value, name)
            if not (lo <= value <= hi):
                bound = f"in [{lo}, {hi}]" if hi < math.inf else f">= {lo}"
                raise SamplingError(name, f"{name} must be {bound}, got {value}")
        if self.repetition_penalty <= 0:
            raise SamplingError("repetition_penalty", "repetition penalty (repetition_penalty) must be > 0")

    @classmethod
    def from_options(cls, options: Mapping) -> SamplingParams:
        """SamplingParams from keyword options; an unknown name is a user error naming the valid ones."""
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise SamplingError(
                unknown[0], f"unknown sampling option {unknown[0]!r}; valid: {', '.join(sorted(OPTION_NAMES))}"
            )
        return cls(**options)

    @property
    def greedy(self) -> bool:
        # below 1e-6 the draw is the argmax anyway, and logits / 1e-320 would overflow to inf
        return self.temperature < 1e-6

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(option, source) of the output constraint, if any: json_schema, regex or grammar."""
        return next(((n, getattr(self, n)) for n in CONSTRAINTS if getattr(self, n) is not None), None)


OPTION_NAMES = frozenset(f.name for f in fields(SamplingParams))
CONSTRAINTS = ("json_schema", "regex", "grammar")
ANY_JSON_OBJECT = '{"type": "object"}'  # OpenAI's response_format json_object
_RANGES = (  # (name, min, max, type): OpenAI's documented limits where it has them
    ("max_tokens", 1, math.inf, int),
    ("temperature", 0.0, 2.0, float),
    ("top_p", 0.0, 1.0, float),
    ("top_k", 0, math.inf, int),
    ("min_p", 0.0, 1.0, float),
    ("repetition_penalty", 0.0, math.inf, float),
    ("presence_penalty", -2.0, 2.0, float),
    ("frequency_penalty", -2.0, 2.0, float),
    ("seed", -math.inf, math.inf, int),
    ("top_logprobs", 0, 20, int),
)


def _biases(bias) -> tuple[tuple[int, float], ...]:
    """logit_bias as ((token id, bias), ...) from a mapping or pairs; ids may be digit strings (JSON keys)."""
    try:
        pairs = [(t, v) for t, v in (bias.items() if isinstance(bias, Mapping) else bias)]
    except (TypeError, ValueError):
        raise SamplingError("logit_bias", 'logit_bias must map token ids to biases, e.g. {"2": -100}') from None
    out = []
    for token, value in pairs:
        # ASCII digits only: "²".isdigit() is true but int() refuses it, and int("٣") is 3
        token = int(token) if isinstance(token, str) and token.isascii() and token.isdigit() else token
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
            raise SamplingError("logit_bias", f"logit_bias key {token!r} is not a token id")
        value = _num(value, "logit_bias")
        if not -100 <= value <= 100:
            raise SamplingError("logit_bias", f"logit_bias for {token} must be in [-100, 100], got {value}")
        out.append((int(token), value))
    return tuple(out)


def response_format_options(fmt) -> dict:
    """OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema":
    {"name", "schema", "strict"}}) as SamplingParams options; SamplingError names the field."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise SamplingError("response_format", "response_format.type must be text, json_object or json_schema")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": ANY_JSON_OBJECT}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise SamplingError("response_format", "response_format json_schema needs a 'json_schema' object")
    return {"json_schema": spec.get("schema") if spec.get("schema") is not None else ANY_JSON_OBJECT}


def _schema_text(schema) -> str:
    """A JSON Schema (a dict, or its JSON text) as JSON text; SamplingError unless it is an object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SamplingError("json_schema", f"json_schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise SamplingError("json_schema", "json_schema must be a JSON object (a schema)")
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise SamplingError("json_schema", f"json_schema cannot be written as JSON ({e})") from None


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SamplingError(name, f"{name} must be an integer, got {value!r}")
    return int(value)


def _num(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise SamplingError(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def filter_logits(
    logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> np.ndarray:
    """logits / temperature with every token outside the top_k, the top_p nucleus and the min_p
    band set to -inf (applied in that order, as transformers' warpers are). Float64."""
    z = logits.astype(np.float64) / temperature
    vocab = z.shape[-1]
    if top_k and 0 < top_k < vocab:
        kth = np.partition(z, vocab - top_k)[vocab - top_k]
        z = np.where(z < kth, -np.inf, z)
    if top_p < 1.0 or min_p > 0.0:
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
            drop = order[1:][before[1:] >= top_p]  # the most likely token always stays
            z[drop] = -np.inf
            probs[drop] = 0.0
        if min_p > 0.0:
            z = np.where(probs < min_p * probs.max(), -np.inf, z)
    return z


def make_sampler(params: SamplingParams) -> Sampler:
    """A function logits -> token id: greedy at temperature 0, else a draw from the softmax of
    `filter_logits`. The same seed gives the same draws."""
    if params.greedy:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)  # any int, as OpenAI's
    temperature, top_k, top_p, min_p = params.temperature, params.top_k, params.top_p, params.min_p

    def sample(logits: np.ndarray) -> int:
        z = filter_logits(logits, temperature, top_k, top_p, min_p)  # a fresh float64 array: worked in place
        z -= z.max()
        return draw(np.exp(z, out=z), rng.random())

    return sample


DRAW_BLOCK = 1024


def draw(weights: np.ndarray, u: float) -> int:
    """The token where the running sum of `weights` (>= 0, float64) first exceeds u times their
    total, for u in [0, 1): inverse-CDF sampling. In two levels, block sums and then one block's
    running sum, because numpy's cumsum is sequential: over a 49k vocabulary it took ~0.16 ms of a
    decode step's ~5 ms, this ~0.02. A token of weight 0 is never drawn."""
    n = len(weights)
    starts = np.arange(0, n, DRAW_BLOCK)
    cum = np.cumsum(np.add.reduceat(weights, starts))
    target = u * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
    while b > 0 and cum[b] == cum[b - 1]:  # u rounded onto the total: the last block with weight
        b -= 1
    block = weights[starts[b] : starts[b] + DRAW_BLOCK]
    run = np.cumsum(block)
    i = int(np.searchsorted(run, target - (cum[b - 1] if b else 0.0), side="right"))
    if i >= len(block) or block[i] == 0:  # the block's running sum rounds below its pairwise sum
        i = int(np.flatnonzero(block)[-1])
    return int(starts[b]) + i


def repetition_penalty(
    logits: np.ndarray, tokens: list[int], penalty: float, window: int = REPETITION_WINDOW
) -> np.ndarray:
    """transformers'/llama.cpp's rule over the last `window` tokens: positive logits are divided
    by the penalty and negative ones multiplied. Returns a new array."""
    out = logits.copy()
    _penalize(out, tokens, penalty, window)
    return out


def _penalize(logits: np.ndarray, tokens: list[int], penalty: float, window: int = REPETITION_WINDOW) -> None:
    """`repetition_penalty` in place."""
    recent = np.unique(np.asarray(tokens[-window:], dtype=np.int64))
    if recent.size:
        sel = logits[recent]
        logits[recent] = np.where(sel > 0, sel / penalty, sel * penalty)


class LogitsProcessor:
    """The logits-shaping options of one sequence (bias and penalties), with the counts of the
    tokens it generated; `__call__` is a no-op returning its input when no option is set."""

    def __init__(self, params: SamplingParams, vocab_size: int | None = None):
        self.params = params
        bias = params.logit_bias
        if vocab_size is not None and any(t >= vocab_size for t, _ in bias):
            bad = next(t for t, _ in bias if t >= vocab_size)
            raise SamplingError("logit_bias", f"logit_bias key {bad} is not a token id below {vocab_size}")
        self.bias_ids = np.array([t for t, _ in bias], dtype=np.int64)
        self.bias_values = np.array([b for _, b in bias], dtype=np.float32)
        self.counts: dict[int, int] = {}  # generated token -> times, for the OpenAI penalties
        self.active = (
            bool(bias) or params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)
        )

    def __call__(self, tokens: list[int], logits: np.ndarray) -> np.ndarray:
        """The processed copy of one row of logits (V,); `tokens` is the prompt and what followed."""
        if not self.active:
            return logits
        p = self.params
        logits = logits.astype(np.float32, copy=True)
        if self.bias_ids.size:
            np.add.at(logits, self.bias_ids, self.bias_values)
        if p.repetition_penalty != 1.0:
            _penalize(logits, tokens, p.repetition_penalty)  # on the copy made above
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            freq = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            logits[ids] -= p.presence_penalty + p.frequency_penalty * freq
        return logits

    def generated(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1
