"""Deployment targets: named presets of dtype, quantization and execution provider
(the four configurations Phi-3 ships in, plus fp32 for reference and a mobile form)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.export.weights import QuantOptions


@dataclass(frozen=True)
class Target:
    """One preset. `provider` is the execution provider the folder is built for; `quant` None
    keeps float weights; `ort_format` also writes an .ort file for mobile runtimes."""

    name: str
    dtype: str  # activations, I/O and KV cache: "float32" | "float16"
    provider: str  # "cpu" | "cuda" | "dml"
    quant: QuantOptions | None
    description: str
    ort_format: bool = False
    separate_rotary: bool = False  # q/k/v apart and RotaryEmbedding nodes (DirectML lacks the fused forms)


TARGETS = {
    t.name: t
    for t in (
        Target("cpu-fp32", "float32", "cpu", None, "fp32 weights and I/O (reference quality)"),
        Target(
            "cpu-int4",
            "float32",
            "cpu",
            QuantOptions("rtn", 4, 32, accuracy_level=4),
            "int4 RTN, block 32, accuracy level 4 (int8 activations), fp32 I/O",
        ),
        Target("cuda-fp16", "float16", "cuda", None, "fp16 weights, I/O and KV cache"),
        Target(
            "cuda-int4",
            "float16",
            "cuda",
            QuantOptions("rtn", 4, 32, accuracy_level=4),
            "int4 RTN, block 32, fp16 I/O and KV cache",
        ),
        Target(
            "dml-int4-awq",
            "float16",
            "dml",
            QuantOptions("awq", 4, 128, accuracy_level=4),
            "int4 AWQ, block 128, fp16 I/O, separate q/k/v and RotaryEmbedding for DirectML",
            separate_rotary=True,
        ),
        Target(
            "mobile-int4",
            "float32",
            "cpu",
            QuantOptions("rtn", 4, 32, accuracy_level=4),
            "cpu-int4 plus an .ort file for ONNX Runtime Mobile",
            ort_format=True,
        ),
    )
}

# What run/chat/serve/load convert to on the CPU when no target is given: int4 as Ollama and
# onnxruntime-genai ship by default (a quantized GGUF's blocks transcoded exactly), never an 8x fp32 copy.
DEFAULT_TARGET = "cpu-int4"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise LmforgeError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)} (see --list-targets)")
    return TARGETS[name]


def with_overrides(
    target: Target,
    quant: str | None = None,
    block_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    requantize: bool | None = None,
    head_bits: int | None = None,
) -> Target:
    """The preset with the user's quantization options applied (a float preset gains RTN)."""
    fields = {
        k: v
        for k, v in dict(
            method=quant,
            block_size=block_size,
            symmetric=symmetric,
            accuracy_level=accuracy_level,
            requantize=requantize,
            head_bits=head_bits,
        ).items()
        if v is not None
    }
    if not fields:
        return target
    base = target.quant or QuantOptions("rtn", 4, 32, accuracy_level=4 if target.provider == "cpu" else 0)
    return dataclasses.replace(target, quant=dataclasses.replace(base, **fields))
