"""A test-only HF -> GGUF (f32) writer that follows llama.cpp's `convert_hf_to_gguf.py`:
gguf-py's own tensor-name map, q/k rows permuted for Llama-family attention, Gemma norms
stored as 1 + w, Phi-3 rope factors as tensors. Independent of lmforge's readers on purpose:
weights come from the `safetensors` package, hyper-parameters straight from config.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

GGUF_ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "phi3": "PHI3", "gemma3_text": "GEMMA3"}


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's converter."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def write(folder: Path, out: Path, vocab: dict | None = None) -> Path:
    """Write `folder`'s checkpoint as an F32 GGUF at `out`; `vocab` adds tokenizer metadata."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[model_type])
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    global_rope = rope.get("full_attention", rope)
    partial = global_rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0

    w = gguf.GGUFWriter(out, arch_name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * partial))
    w.add_rope_freq_base(global_rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if cfg.get("pad_token_id") is not None:  # llama.cpp's converter takes config.json's pad id too
        w.add_pad_token_id(cfg["pad_token_id"])
    if cfg.get("sliding_window") and model_type in ("mistral", "gemma3_text"):
        w.add_sliding_window(cfg["sliding_window"])
    if model_type == "gemma3_text":
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    extra = {}
    if global_rope.get("rope_type") == "longrope":
        orig = cfg["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / orig
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
        extra["rope_factors_long.weight"] = np.asarray(global_rope["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.asarray(global_rope["short_factor"], dtype=np.float32)
    if vocab:
        for key, value in vocab.items():
            w.add_key_value(key, value[0], value[1])

    names = gguf.get_tensor_name_map(arch, n_layers)
    tensors = hf_tensors(folder)
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for name, data in tensors.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        if model_type in ("llama", "mistral"):
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = llamacpp_permute(data, n_head, n_head)
            if name.endswith(("k_proj.weight", "k_proj.bias")):
                data = llamacpp_permute(data, n_head, n_kv)
        if model_type == "gemma3_text" and name.endswith("norm.weight"):
            data = data + 1
        w.add_tensor(new, np.ascontiguousarray(data, dtype=np.float32))
    for name, data in extra.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_vocab_only(out: Path, tokenizer_meta: dict, n_vocab: int) -> Path:
    """A GGUF holding tiny `llama` hyper-parameters and a tokenizer, no tensors: enough for
    llama.cpp's `vocab_only` load. `tokenizer_meta` maps keys to (value, GGUFValueType)."""
    import gguf

    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    for key, (value, vtype) in tokenizer_meta.items():
        w.add_key_value(key, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def spm_vocab_meta(sp_model: Path) -> dict:
    """Tokenizer metadata of a SentencePiece model, as llama.cpp's converter writes it."""
    import gguf
    import sentencepiece as spm

    T = gguf.GGUFValueType
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    return {
        "tokenizer.ggml.model": ("llama", T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY),
        "tokenizer.ggml.scores": (scores, T.ARRAY),
        "tokenizer.ggml.token_type": (types, T.ARRAY),
        "tokenizer.ggml.bos_token_id": (sp.bos_id(), T.UINT32),
        "tokenizer.ggml.eos_token_id": (sp.eos_id(), T.UINT32),
        "tokenizer.ggml.unknown_token_id": (sp.unk_id(), T.UINT32),
        "tokenizer.ggml.add_bos_token": (True, T.BOOL),
        "tokenizer.ggml.add_space_prefix": (True, T.BOOL),
    }


def bpe_vocab_meta(meta: dict, pre: str) -> dict:
    """A byte-level BPE vocabulary (e.g. SmolLM2's) re-labelled with another `pre` tokenizer."""
    import gguf

    T = gguf.GGUFValueType
    return {
        "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.pre": (pre, T.STRING),
        "tokenizer.ggml.tokens": (meta["tokenizer.ggml.tokens"], T.ARRAY),
        "tokenizer.ggml.token_type": (meta["tokenizer.ggml.token_type"], T.ARRAY),
        "tokenizer.ggml.merges": (meta["tokenizer.ggml.merges"], T.ARRAY),
        "tokenizer.ggml.bos_token_id": (meta["tokenizer.ggml.bos_token_id"], T.UINT32),
        "tokenizer.ggml.eos_token_id": (meta["tokenizer.ggml.eos_token_id"], T.UINT32),
        "tokenizer.ggml.add_bos_token": (False, T.BOOL),
    }
