"""The Engine protocol every backend implements (ONNX Runtime now, llama.cpp later).

An engine owns its KV cache. A cache holds `batch_size` rows; each row has its own length.
`prefill` appends a prompt (or a chunk) to each row and returns the next-token logits of each
row's last token; `decode` appends one token per row and returns the next logits.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    vocab_size: int
    context_length: int
    device: str
    eos_token_ids: tuple[int, ...]

    def new_cache(self, batch_size: int = 1, capacity: int = 256): ...

    def prefill(self, cache, token_ids: list[list[int]]) -> np.ndarray:
        """Append each row's tokens; returns float32 logits (batch, vocab) of each row's last token."""

    def decode(self, cache, token_ids: list[int]) -> np.ndarray:
        """Append one token per row; returns float32 logits (batch, vocab)."""
