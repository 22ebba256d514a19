"""Gemma 3 text models: scaled embeddings, (1 + w) RMSNorm, q/k norms, four norms per layer,
GELU-tanh MLP, interleaved sliding-window and global layers with their own rope bases.

HF checkpoints store the norm weights w and the forward multiplies by 1 + w (NORM_OFFSET, as
`ModelSpec.norm_offset`); llama.cpp stores 1 + w, which `Arch.from_gguf`/`to_gguf` undo and redo."""

import math

from lmforge.arch import Arch
from lmforge.arch.common import GGUF_WINDOW, LLAMA_GGUF, LLAMA_HF, f32, rope_parameters, spec_from_hf
from lmforge.spec import ModelSpec

_BIASES = {k for k in LLAMA_HF if k.endswith(".bias")}

HF = {k: v for k, v in LLAMA_HF.items() if k not in _BIASES and k != "layers.{i}.mlp_norm"}
HF.update(
    {
        "layers.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "layers.{i}.post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
        "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
        "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    }
)

GGUF = {k: v for k, v in LLAMA_GGUF.items() if k not in _BIASES}
GGUF.update(
    {
        "layers.{i}.post_attn_norm": "blk.{i}.post_attention_norm.weight",
        "layers.{i}.post_mlp_norm": "blk.{i}.post_ffw_norm.weight",
        "layers.{i}.q_norm": "blk.{i}.attn_q_norm.weight",
        "layers.{i}.k_norm": "blk.{i}.attn_k_norm.weight",
    }
)

LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
HF_LAYER_TYPES = {v: k for k, v in LAYER_TYPES.items()}
DEFAULT_PATTERN = 6  # every 6th layer is global (llama.cpp assumes this when the GGUF is silent)
NORM_OFFSET = 1.0  # RMSNorm multiplies by (1 + w)
# llama.cpp's Gemma 3 keys under `gemma3.`
GGUF_PATTERN, GGUF_LOCAL_THETA = "attention.sliding_window_pattern", "rope.freq_base_swa"


def pattern_layer_types(n_layers: int, period: int = DEFAULT_PATTERN) -> tuple[str, ...]:
    """Gemma 3's interleaving: layer i is global when (i + 1) is a multiple of `period`."""
    return tuple("full" if (i + 1) % period == 0 else "sliding" for i in range(n_layers))


def _spec(cfg: dict):
    cfg = {**cfg, **cfg.get("text_config", {})}  # multimodal configs nest the text model
    n_layers = int(cfg["num_hidden_layers"])
    if cfg.get("layer_types"):
        layer_types = tuple(LAYER_TYPES[t] for t in cfg["layer_types"])
    else:
        period = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or DEFAULT_PATTERN
        layer_types = pattern_layer_types(n_layers, int(period))
    local = rope_parameters(cfg, "sliding_attention")
    local_theta = (
        local.get("rope_theta")
        if isinstance(cfg.get("rope_parameters"), dict) and "sliding_attention" in cfg["rope_parameters"]
        else None
    )
    local_theta = local_theta or cfg.get("rope_local_base_freq") or 10000.0
    hidden = int(cfg["hidden_size"])
    return spec_from_hf(
        cfg,
        "gemma3",
        rope_layer_type="full_attention",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        layer_types=layer_types,
        rope_local_theta=float(local_theta),
        qk_norm=True,
        post_norms=True,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256),
        embedding_scale=math.sqrt(hidden),
        norm_offset=NORM_OFFSET,
    )


def _gguf_spec(g, fields: dict) -> dict:
    """Gemma 3's fields from GGUF metadata (`g(key, default)` reads `gemma3.{key}`)."""
    hidden, n_heads, n_layers = fields["hidden_size"], fields["n_heads"], fields["n_layers"]
    pattern = g(GGUF_PATTERN)
    if isinstance(pattern, list):
        layer_types = tuple("sliding" if p else "full" for p in pattern)
    else:
        layer_types = pattern_layer_types(n_layers, int(pattern) if pattern else DEFAULT_PATTERN)
    return dict(
        layer_types=layer_types,
        rope_local_theta=f32(g(GGUF_LOCAL_THETA, 10000.0)),
        # llama.cpp scales by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): hidden/heads
        query_pre_attn_scalar=float(hidden // n_heads if n_layers == 62 else fields["head_dim"]),
        embedding_scale=math.sqrt(hidden),
        norm_offset=NORM_OFFSET,
    )


def _gguf_metadata(spec: ModelSpec) -> dict:
    """Gemma 3's keys: llama.cpp wants a window even for models without one, and the pattern."""
    return {
        GGUF_WINDOW: (spec.sliding_window or spec.context_length, "uint32"),
        GGUF_PATTERN: ([t == "sliding" for t in spec.layer_types], "array"),
        GGUF_LOCAL_THETA: (spec.rope_local_theta or 10000.0, "float32"),
    }


def gemma_hf_config(spec: ModelSpec, cfg: dict, **extra) -> None:
    """The config.json keys Gemma 2 and 3 share (their activation's name, the attention scalar, the
    window and layer pattern), plus each one's own `extra`."""
    scalar = spec.query_pre_attn_scalar
    cfg.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
        sliding_window=spec.sliding_window,
        layer_types=[HF_LAYER_TYPES[t] for t in spec.layer_types],
        **extra,
    )
    del cfg["hidden_act"]


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    gemma_hf_config(spec, cfg, rope_local_base_freq=spec.rope_local_theta)


ARCH = Arch(
    model_type="gemma3_text",
    name="gemma3",
    gguf_arch="gemma3",
    hf_class="Gemma3ForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    activation="gelu_tanh",
    gguf_spec=_gguf_spec,
    gguf_metadata=_gguf_metadata,
    hf_config=_hf_config,
    hf_prefixes=("model.language_model.", "language_model.model."),
    hf_ignore=(r".*rotary_emb\.inv_freq$", r"^(model\.)?(vision_tower|multi_modal_projector)\..*"),
)
