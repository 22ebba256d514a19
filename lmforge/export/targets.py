"""Deployment targets: named presets of dtype, quantization and execution provider."""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Target:
    """One preset. `provider` is the execution provider the folder is built for."""

    name: str
    dtype: str          # activations, I/O and KV cache: "float32" | "float16"
    provider: str       # "cpu" | "cuda" | "dml"
    description: str


TARGETS = {t.name: t for t in (
    Target("cpu-fp32", "float32", "cpu", "fp32 weights and I/O for the CPU provider (reference quality)"),
    Target("cuda-fp16", "float16", "cuda", "fp16 weights, I/O and KV cache for the CUDA provider"),
)}

DEFAULT_TARGET = "cpu-fp32"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise LmforgeError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)} (see --list-targets)")
    return TARGETS[name]
