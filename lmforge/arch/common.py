"""Shared pieces of the architecture tables: the Llama-style name maps, config parsing, llama.cpp's
metadata keys and its q/k row layout."""

from __future__ import annotations

import logging
import math

import numpy as np

from lmforge.errors import CheckpointError
from lmforge.spec import ModelSpec, RopeScaling

log = logging.getLogger(__name__)

# canonical -> HF name, for the Llama layout that Mistral, Qwen2 and SmolLM2 share.
LLAMA_HF = {
    "embed": "model.embed_tokens.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.q": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.k": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.v": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.o": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.o.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "layers.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}

# canonical -> GGUF name (llama.cpp's tensor names).
LLAMA_GGUF = {
    "embed": "token_embd.weight",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm.weight",
    "layers.{i}.q": "blk.{i}.attn_q.weight",
    "layers.{i}.k": "blk.{i}.attn_k.weight",
    "layers.{i}.v": "blk.{i}.attn_v.weight",
    "layers.{i}.o": "blk.{i}.attn_output.weight",
    "layers.{i}.q.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.k.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.v.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.o.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.mlp_norm": "blk.{i}.ffn_norm.weight",
    "layers.{i}.gate": "blk.{i}.ffn_gate.weight",
    "layers.{i}.up": "blk.{i}.ffn_up.weight",
    "layers.{i}.down": "blk.{i}.ffn_down.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
}

# llama.cpp metadata key under `{arch}.` -> (ModelSpec attribute, GGUF value type), in the
# order llama.cpp's converter writes them; the GGUF reader and writer share it.
GGUF_KEYS = {
    "context_length": ("context_length", "uint32"),
    "embedding_length": ("hidden_size", "uint32"),
    "block_count": ("n_layers", "uint32"),
    "feed_forward_length": ("intermediate_size", "uint32"),
    "attention.head_count": ("n_heads", "uint32"),
    "attention.head_count_kv": ("n_kv_heads", "uint32"),
    "attention.key_length": ("head_dim", "uint32"),
    "attention.value_length": ("head_dim", "uint32"),
    "attention.layer_norm_rms_epsilon": ("norm_eps", "float32"),
    "rope.dimension_count": ("rotary_dim", "uint32"),
    "rope.freq_base": ("rope_theta", "float32"),
    "vocab_size": ("vocab_size", "uint32"),
}
GGUF_WINDOW = "attention.sliding_window"

# q/k rows llama.cpp interleaves (for families with `permute_qk`): kind -> ModelSpec head count
GGUF_QK_HEADS = {"q": "n_heads", "k": "n_kv_heads"}

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _require(cfg: dict, key: str):
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"config.json lacks {key!r}; is this a complete HF checkpoint?")
    return cfg[key]


def rope_parameters(cfg: dict, layer_type: str | None = None) -> dict:
    """Rope settings from either transformers 5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys, merged into one dict."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type and layer_type in params:
        params = params[layer_type]
    merged = {}
    if cfg.get("rope_theta") is not None:
        merged["rope_theta"] = cfg["rope_theta"]
    if isinstance(cfg.get("rope_scaling"), dict):
        merged.update(cfg["rope_scaling"])
    if isinstance(params, dict) and not (set(params) & {"full_attention", "sliding_attention"}):
        merged.update(params)
    return merged


def rope_scaling(cfg: dict, params: dict) -> RopeScaling | None:
    """Normalize a rope-scaling dict to `RopeScaling` (None for the default rotary)."""
    kind = params.get("rope_type") or params.get("type") or "default"
    kind = {"su": "longrope"}.get(kind, kind)
    if kind == "default":
        return None
    orig = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if kind == "linear":
        return RopeScaling("linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            original_context_length=int(orig),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
        )
    if kind == "longrope":
        max_pos = cfg["max_position_embeddings"]
        factor = float(params.get("factor") or max_pos / orig)
        attn = params.get("attention_factor")
        if attn is None:  # transformers' and llama.cpp's default magnitude correction
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return RopeScaling(
            "longrope",
            factor=factor,
            original_context_length=int(orig),
            short_factor=tuple(float(x) for x in params["short_factor"]),
            long_factor=tuple(float(x) for x in params["long_factor"]),
            attention_factor=float(attn),
        )
    if kind == "yarn":
        return RopeScaling(
            "yarn",
            factor=float(params["factor"]),
            original_context_length=int(orig),
            attention_factor=params.get("attention_factor"),
        )
    key = "rope_parameters" if isinstance(cfg.get("rope_parameters"), dict) else "rope_scaling"
    raise CheckpointError(
        f"config.json field {key}.rope_type is {kind!r}, which lmforge does not support; "
        "it knows linear, llama3, longrope, yarn"
    )


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


# config.json keys that ask for layers lmforge does not build yet -> what they are
UNSUPPORTED_KEYS = {
    "num_local_experts": "mixture-of-experts layers",
    "num_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers",
}


def spec_from_hf(cfg: dict, arch: str, **fields) -> ModelSpec:
    """The fields every Llama-style config.json shares; `fields` adds or overrides arch extras."""
    for key, what in UNSUPPORTED_KEYS.items():
        if cfg.get(key) and not fields.get("n_experts"):
            raise CheckpointError(
                f"config.json field {key!r} ({cfg[key]}) asks for {what}, which lmforge does not build"
            )
    hidden = int(_require(cfg, "hidden_size"))
    n_heads = int(_require(cfg, "num_attention_heads"))
    params = rope_parameters(cfg, fields.pop("rope_layer_type", None))
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    if act not in ACTIVATIONS:
        raise CheckpointError(f"unsupported activation {act!r} in config.json")
    base = dict(
        arch=arch,
        hidden_size=hidden,
        n_layers=int(_require(cfg, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        intermediate_size=int(_require(cfg, "intermediate_size")),
        vocab_size=int(_require(cfg, "vocab_size")),
        context_length=int(cfg.get("max_position_embeddings") or 2048),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        activation=ACTIVATIONS[act],
        rope_scaling=rope_scaling(cfg, params),
        partial_rotary_factor=float(params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id") if isinstance(cfg.get("pad_token_id"), int) else None,
    )
    base.update(fields)
    return ModelSpec(**base)


def f32(x) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave: rows (head, pair, half) -> (head, half, pair).

    Works on weights (rows, cols), biases (rows,) and raw block rows (rows, bytes)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row interleave (what its HF converter applies); inverse of `unpermute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_window_metadata(spec: ModelSpec) -> dict:
    """The family keys of a GGUF for most families: the sliding window, when the model has one."""
    return {GGUF_WINDOW: (spec.sliding_window, "uint32")} if spec.sliding_window else {}


def gguf_window_dropped(spec: ModelSpec, gguf_arch: str) -> dict:
    """`gguf_window_metadata` for a family written under an architecture that llama.cpp runs
    without a window (Mistral as `llama`): says so when a window is dropped."""
    if spec.sliding_window:
        log.warning(
            "llama.cpp's %s architecture has no sliding window; this model's window of %d tokens is dropped, "
            "so outputs differ once a sequence is longer",
            gguf_arch,
            spec.sliding_window,
        )
    return gguf_window_metadata(spec)


def hf_window_config(spec: ModelSpec, cfg: dict) -> None:
    """The family keys of config.json for most families: the sliding window, when there is one."""
    if spec.sliding_window:
        cfg["sliding_window"] = spec.sliding_window
