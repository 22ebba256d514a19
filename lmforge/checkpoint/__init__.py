"""Reading sources: HF folders and GGUF files, behind one `Checkpoint` interface; `resolve`
turns MODEL (path, known name, catalogue name, Hub id) into local files."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.checkpoint.base import Checkpoint, TensorInfo
from lmforge.checkpoint.source import resolve, source_label
from lmforge.errors import CheckpointError

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "resolve", "source_label"]


def open_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """Open MODEL (local path, known name, catalogue name or Hub id) for reading."""
    path = resolve(model)
    if path.is_dir():
        from lmforge.checkpoint.hf import HFCheckpoint

        return HFCheckpoint(path)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        from lmforge.checkpoint.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    from lmforge.checkpoint.hf import PICKLE_SUFFIXES

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a pickle checkpoint; lmforge never unpickles: convert it to safetensors")
    raise CheckpointError(f"{path} is neither a GGUF file nor an HF checkpoint folder")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
