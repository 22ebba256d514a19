"""The Engine protocol every backend implements: ONNX Runtime (`ort.OrtEngine`) and llama.cpp
(`llamacpp.LlamaCppEngine`); and the KV cache protocol of the caches they hand out.

An engine owns its KV cache. A cache holds `batch_size` rows; each row has its own length.
`prefill` appends a prompt (or a chunk) to each row and returns the next-token logits of each
row's last token; `decode` appends one token per row and returns the next logits.

Speculative decoding needs two more methods where `supports_verify` is true: `verify(cache,
tokens)` appends k tokens to a one-row cache in one pass and returns (k, vocab) logits, one row
after each; `truncate(cache, row, length)` forgets a row's positions from `length` on.
`exact_verify` says whether verified rows equal decode's to float rounding (then speculation
never changes greedy output, and is on by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

ENGINES = ("ort", "llamacpp")  # the backends, by the names --engine takes


class Cache(Protocol):
    """Rows of KV cache: `batch_size` rows of room for `capacity` positions; `lengths[i]` are in use in row i."""

    batch_size: int
    capacity: int
    lengths: np.ndarray  # (batch_size,) int64


class Engine(Protocol):
    vocab_size: int
    context_length: int
    device: str
    eos_token_ids: tuple[int, ...]

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> Cache:
        """An empty cache of `batch_size` rows with room for `capacity` positions each."""

    def prefill(self, cache: Cache, token_ids: list[list[int]]) -> np.ndarray:
        """Append each row's tokens; returns float32 logits (batch, vocab) of each row's last token,
        an array the caller owns (samplers write into its rows)."""

    def decode(self, cache: Cache, token_ids: list[int]) -> np.ndarray:
        """Append one token per row; returns float32 logits (batch, vocab), an array the caller owns."""
