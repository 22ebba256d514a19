"""HF checkpoint folders (config.json + safetensors + tokenizer) from any source, streamed.

The safetensors header is computed from the tensor infos up front, then tensors are written one
at a time, so a model never has to fit in memory twice. Lets people fine-tune what they found
as GGUF, and feeds tools that only read HF folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lmforge.arch import get_arch
from lmforge.arch.llama import llama3_from_freq_factors
from lmforge.checkpoint import open_checkpoint
from lmforge.errors import LmforgeError
from lmforge.export.atomic import atomic_folder, check_output
from lmforge.spec import ModelSpec


def _rope_scaling(spec: ModelSpec) -> dict | None:
    rs = spec.rope_scaling
    if rs is None:
        return None
    if rs.kind == "freq_factors":  # llama.cpp's form of Llama 3's scaling: its parameters back
        rs = llama3_from_freq_factors(spec.rope_theta, spec.rotary_dim, np.asarray(rs.long_factor)) or rs
    if rs.kind == "linear":
        return {"rope_type": "linear", "factor": rs.factor}
    if rs.kind == "llama3":
        return {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_context_length,
        }
    if rs.kind == "longrope":
        return {
            "rope_type": "longrope",
            "short_factor": list(rs.short_factor),
            "long_factor": list(rs.long_factor),
            "original_max_position_embeddings": rs.original_context_length,
            "attention_factor": rs.attention_factor,
        }
    if rs.kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_context_length,
        }
    raise LmforgeError(
        f"writing an HF folder for rope scaling {rs.kind!r} (as GGUF stores it) is not supported; "
        "convert from the original HF checkpoint instead"
    )


def hf_config(spec: ModelSpec) -> dict:
    """config.json for `spec`, as transformers writes it: the Llama-style keys every family has,
    then the family's own (`Arch.hf_config`)."""
    arch = get_arch(spec.arch)
    cfg = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.context_length,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tied_embeddings,
        "vocab_size": spec.vocab_size,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        # pad_token_id: the source's, or None (not left out: Phi-3's class default, 32000, may lie
        # outside the vocabulary)
        "bos_token_id": spec.bos_token_id,
        "pad_token_id": spec.pad_token_id if (spec.pad_token_id or 0) < spec.vocab_size else None,
        "eos_token_id": spec.eos_token_ids[0] if len(spec.eos_token_ids) == 1 else list(spec.eos_token_ids),
    }
    scaling = _rope_scaling(spec)
    if scaling:
        cfg["rope_scaling"] = scaling
        if "original_max_position_embeddings" in scaling:
            cfg["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if spec.partial_rotary_factor != 1.0:
        cfg["partial_rotary_factor"] = spec.partial_rotary_factor
    arch.hf_config(spec, cfg)
    return cfg


def _hf_parts(ckpt, info) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of what `info` is in an HF folder: itself, or one matrix per expert when
    HF stores a stacked tensor (n_experts, ...) expert by expert (`{j}` in its name)."""
    name = ckpt.arch.source_name(info.name, "hf")
    if "{j}" not in name:
        return [(name, tuple(info.shape))]
    return [(name.replace("{j}", str(j)), tuple(info.shape[1:])) for j in range(info.shape[0])]


def write_safetensors(path: Path, ckpt) -> None:
    """Every tensor of `ckpt` as F32 under its HF name, written one at a time."""
    header, offset = {}, 0
    for info in ckpt.infos:
        for name, shape in _hf_parts(ckpt, info):
            nbytes = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for info in ckpt.infos:
            arr = np.ascontiguousarray(ckpt.read(info.name), dtype=np.float32)
            f.write(memoryview(arr).cast("B"))


def convert_to_hf(source, out, force: bool = False) -> Path:
    """Write SOURCE as an HF folder OUT (fp32 safetensors), atomically."""
    from lmforge.export.convert import write_tokenizer

    ckpt = open_checkpoint(source)
    out = check_output(Path(out), force, "model.safetensors", ckpt.path)
    cfg = hf_config(ckpt.spec)
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_safetensors(tmp / "model.safetensors", ckpt)
        write_tokenizer(ckpt, tmp)
    return out
