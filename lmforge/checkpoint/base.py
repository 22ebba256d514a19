"""What every checkpoint reader returns: a spec, tensor infos, and a lazy tensor stream."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.arch import Arch
from lmforge.spec import ModelSpec


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: canonical name, name in the file, numpy-order shape, stored type."""

    name: str
    source_name: str
    shape: tuple[int, ...]
    dtype: str  # "F32", "BF16", "F16", "Q4_1", ...
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A model on disk. Subclasses fill the attributes and implement `tensors()`."""

    format: str  # "hf" | "gguf"
    path: Path
    arch: Arch
    spec: ModelSpec
    infos: list[TensorInfo]
    file_bytes: int

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (canonical name, array) one tensor at a time, in HF layout and row order."""
        raise NotImplementedError

    def tokenizer(self):
        """The model's tokenizer as an `lmforge.tokenizer.Tokenizer`."""
        raise NotImplementedError

    def chat_template(self) -> str | None:
        """The Jinja chat template the checkpoint carries, or None."""
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.infos)

    def summary(self) -> dict:
        """The fields `lmforge inspect --json` prints."""
        s = self.spec
        types: dict[str, int] = {}
        for t in self.infos:
            types[t.dtype] = types.get(t.dtype, 0) + 1
        return {
            "path": str(self.path),
            "format": self.format,
            "arch": s.arch,
            "n_layers": s.n_layers,
            "hidden_size": s.hidden_size,
            "n_heads": s.n_heads,
            "n_kv_heads": s.n_kv_heads,
            "head_dim": s.head_dim,
            "intermediate_size": s.intermediate_size,
            "vocab_size": s.vocab_size,
            "context_length": s.context_length,
            "rope_theta": s.rope_theta,
            "rope_scaling": s.rope_scaling.kind if s.rope_scaling else None,
            "tied_embeddings": s.tied_embeddings,
            "sliding_window": s.sliding_window,
            "n_tensors": len(self.infos),
            "n_params": self.n_params,
            "file_bytes": self.file_bytes,
            "tensor_types": dict(sorted(types.items())),
        }
