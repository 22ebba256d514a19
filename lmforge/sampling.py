"""Samplers and logits processors: pure functions over one row of float32 logits."""
from __future__ import annotations

from typing import Callable

import numpy as np

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[list[int], np.ndarray], np.ndarray]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - logits.max()
    return x - np.log(np.exp(x).sum())


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0) -> None:
    """User errors for sampling settings that would leave no token to draw."""
    from lmforge.errors import LmforgeError

    for ok, what in ((temperature >= 0, "temperature must be >= 0"), (0 < top_p <= 1, "top_p must be in (0, 1]"),
                     (top_k >= 0, "top_k must be >= 0 (0: off)"), (0 <= min_p <= 1, "min_p must be in [0, 1]"),
                     (repetition_penalty > 0, "repetition penalty must be > 0")):
        if not ok:
            raise LmforgeError(what)


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> np.ndarray:
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


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """A function logits -> token id: greedy at temperature 0, else a draw from the softmax of
    `filter_logits`. The same seed gives the same draws."""
    check_sampling(temperature, top_p, top_k, min_p)
    if temperature <= 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        z = filter_logits(logits, temperature, top_k, top_p, min_p)
        probs = np.exp(z - z.max())
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))

    return sample


def make_logits_processors(repetition_penalty: float = 1.0, context_size: int = 64) -> list[LogitsProcessor]:
    """Repetition penalty as in transformers/llama.cpp: over the last `context_size` tokens,
    positive logits are divided by the penalty and negative ones multiplied."""
    check_sampling(repetition_penalty=repetition_penalty)
    if repetition_penalty == 1.0:
        return []

    def penalize(tokens: list[int], logits: np.ndarray) -> np.ndarray:
        recent = np.unique(np.asarray(tokens[-context_size:], dtype=np.int64))
        if recent.size == 0:
            return logits
        logits = logits.copy()
        sel = logits[recent]
        logits[recent] = np.where(sel > 0, sel / repetition_penalty, sel * repetition_penalty)
        return logits

    return [penalize]
