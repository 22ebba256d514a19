"""HF checkpoint folders (config.json + safetensors + tokenizer) from any source, streamed.

The safetensors header is computed from the tensor infos up front, then tensors are written one
at a time, so a model never has to fit in memory twice. Lets people fine-tune what they found
as GGUF, and feeds tools that only read HF folders.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.checkpoint import open_checkpoint
from lmforge.checkpoint.spec import ModelSpec
from lmforge.errors import LmforgeError
from lmforge.export.atomic import atomic_folder, check_output

HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(spec: ModelSpec) -> dict:
    """config.json for a Llama-family spec (llama, mistral, qwen2)."""
    if spec.arch not in HF_CLASSES:
        raise LmforgeError(f"writing an HF folder for {spec.arch!r} is not supported yet; "
                           f"supported: {', '.join(HF_CLASSES)}")
    if spec.rope_scaling is not None:
        raise LmforgeError("writing an HF folder for a model with rope scaling is not supported yet")
    cfg = {
        "architectures": [HF_CLASSES[spec.arch]], "model_type": spec.arch,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "max_position_embeddings": spec.context_length, "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tied_embeddings,
        "vocab_size": spec.vocab_size, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_ids[0] if len(spec.eos_token_ids) == 1 else list(spec.eos_token_ids),
    }
    if spec.arch == "llama":
        cfg.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
    if spec.sliding_window:
        cfg["sliding_window"] = spec.sliding_window
    return cfg


def write_safetensors(path: Path, ckpt) -> None:
    """Every tensor of `ckpt` as F32 under its HF name, written one at a time."""
    header, offset = {}, 0
    for info in ckpt.infos:
        nbytes = 4 * info.n_elements
        header[ckpt.arch.source_name(info.name, "hf")] = {
            "dtype": "F32", "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
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
