"""Which ggml type each tensor gets, following llama.cpp's quantizer (`llama_tensor_get_type`).

A file type names a default type for 2-D weights; the `_m` mixes give some tensors more bits
(attn_v, or the fused attn_qkv, and ffn_down in the first and last eighth of the layers and
every third one between; the output head); 1-D tensors (norms, biases, rope factors) stay F32.
K-quants need rows that are a multiple of 256; otherwise llama.cpp falls back to a legacy type
of about the same size (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and lmforge does too.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class FileType:
    name: str
    ftype: F
    default: Q
    mix: str | None = None  # "m": the _M mix of K-quant file types


FILE_TYPES = {
    t.name: t
    for t in (
        FileType("f32", F.ALL_F32, Q.F32),
        FileType("f16", F.MOSTLY_F16, Q.F16),
        FileType("bf16", F.MOSTLY_BF16, Q.BF16),
        FileType("q8_0", F.MOSTLY_Q8_0, Q.Q8_0),
        FileType("q4_0", F.MOSTLY_Q4_0, Q.Q4_0),
        FileType("q4_1", F.MOSTLY_Q4_1, Q.Q4_1),
        FileType("q5_0", F.MOSTLY_Q5_0, Q.Q5_0),
        FileType("q5_1", F.MOSTLY_Q5_1, Q.Q5_1),
        FileType("q4_k_m", F.MOSTLY_Q4_K_M, Q.Q4_K, "m"),
        FileType("q5_k_m", F.MOSTLY_Q5_K_M, Q.Q5_K, "m"),
        FileType("q6_k", F.MOSTLY_Q6_K, Q.Q6_K),
    )
}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# the _M mixes: tensor kind -> type it is raised to in `use_more_bits` layers (llama.cpp treats
# Phi-3's fused attn_qkv as attn_v)
MORE_BITS = {
    "q4_k_m": {"attn_v": Q.Q6_K, "attn_qkv": Q.Q6_K, "ffn_down": Q.Q6_K},
    "q5_k_m": {"attn_v": Q.Q6_K, "attn_qkv": Q.Q6_K, "ffn_down": Q.Q6_K},
}


def get_file_type(name: str) -> FileType:
    """The file type for `--gguf NAME`, or a user error listing the valid ones."""
    if name not in FILE_TYPES:
        raise LmforgeError(f"unknown GGUF type {name!r}; choose one of: {', '.join(FILE_TYPES)}")
    return FILE_TYPES[name]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every
    third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# llama.cpp's quantizer for models of exactly 8 experts (Mixtral): kind -> (file types, type)
EIGHT_EXPERTS = {
    "attn_v": (None, Q.Q8_0),  # "bumping this to Q8_0 trades just ~128MB", whatever the file type
    "attn_k": (None, Q.Q8_0),
    "attn_output": (("q4_k_m",), Q.Q5_K),
}


def tensor_type(
    gguf_name: str, shape: tuple[int, ...], ft: FileType, n_layers: int, has_output: bool, n_experts: int = 0
) -> tuple[Q, str | None]:
    """(ggml type, fallback note or None) for one tensor of numpy shape `shape` (rows, cols) of a
    model of `n_layers` layers and `n_experts` experts per layer."""
    if len(shape) < 2 or "_norm" in gguf_name or not gguf_name.endswith(".weight") or gguf_name.startswith("rope_"):
        return Q.F32, None
    if ".ffn_gate_inp." in gguf_name:  # the MoE router: llama.cpp's quantizer leaves it as it is
        return Q.F32, None
    new = ft.default
    if new in FLOAT_TYPES:
        return new, None
    cols = shape[-1]
    kind = gguf_name.split(".")[-2].removesuffix("_exps")  # llama.cpp matches "ffn_down" in ffn_down_exps too
    if gguf_name == "output.weight" or (not has_output and gguf_name == "token_embd.weight"):
        # the head: Q6_K unless the default's blocks do not fit the row (then Q8_0)
        if cols % GGML_QUANT_SIZES[new][0] != 0:
            new = Q.Q8_0
        elif new != Q.Q8_0:
            new = Q.Q6_K
    elif ft.name in MORE_BITS and kind in MORE_BITS[ft.name]:
        layer = int(gguf_name.split(".")[1])
        if use_more_bits(layer, n_layers):
            new = MORE_BITS[ft.name][kind]
    if n_experts == 8 and kind in EIGHT_EXPERTS and ft.name in (EIGHT_EXPERTS[kind][0] or (ft.name,)):
        new = EIGHT_EXPERTS[kind][1]
    note = None
    if new in K_QUANTS and cols % 256 != 0:
        fallback = FALLBACK[new]
        if cols % GGML_QUANT_SIZES[fallback][0] != 0:
            fallback = Q.F16
        note = f"{gguf_name}: rows of {cols} are not a multiple of 256, required for {new.name}; using {fallback.name}"
        new = fallback
    elif cols % GGML_QUANT_SIZES[new][0] != 0:
        note = f"{gguf_name}: rows of {cols} do not fit {new.name} blocks of {GGML_QUANT_SIZES[new][0]}; using F16"
        new = Q.F16
    return new, note
