"""Samplers and logits processors: pure functions over one row of float32 logits."""
from __future__ import annotations

from typing import Callable

import numpy as np

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[list[int], np.ndarray], np.ndarray]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - logits.max()
    return x - np.log(np.exp(x).sum())


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """A function logits -> token id.

    temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top_k
    tokens, the smallest set whose mass reaches top_p, and tokens whose probability is at least
    min_p times the most likely one. The same seed gives the same draws."""
    if temperature <= 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        scaled = logits.astype(np.float64) / temperature
        order = np.argsort(-scaled, kind="stable")
        if top_k and top_k > 0:
            order = order[:top_k]
        z = scaled[order]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        keep = len(order)
        if top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), top_p) + 1))
        if min_p > 0.0:
            keep = min(keep, max(1, int((probs >= min_p * probs[0]).sum())))
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[rng.choice(keep, p=probs)])

    return sample


def make_logits_processors(repetition_penalty: float = 1.0, context_size: int = 64) -> list[LogitsProcessor]:
    """Repetition penalty as in transformers/llama.cpp: over the last `context_size` tokens,
    positive logits are divided by the penalty and negative ones multiplied."""
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
