"""Gemma 3 text models: scaled embeddings, (1 + w) RMSNorm, q/k norms, four norms per layer,
GELU-tanh MLP, interleaved sliding-window and global layers with their own rope bases."""
import math

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, rope_parameters, spec_from_hf

_BIASES = {k for k in LLAMA_HF if k.endswith(".bias")}

HF = {k: v for k, v in LLAMA_HF.items() if k not in _BIASES and k != "layers.{i}.mlp_norm"}
HF.update({
    "layers.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "layers.{i}.post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
    "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
})

GGUF = {k: v for k, v in LLAMA_GGUF.items() if k not in _BIASES}
GGUF.update({
    "layers.{i}.post_attn_norm": "blk.{i}.post_attention_norm.weight",
    "layers.{i}.post_mlp_norm": "blk.{i}.post_ffw_norm.weight",
    "layers.{i}.q_norm": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.k_norm": "blk.{i}.attn_k_norm.weight",
})

LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
DEFAULT_PATTERN = 6  # every 6th layer is global (llama.cpp assumes this when the GGUF is silent)


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
    local_theta = local.get("rope_theta") if isinstance(cfg.get("rope_parameters"), dict) \
        and "sliding_attention" in cfg["rope_parameters"] else None
    local_theta = local_theta or cfg.get("rope_local_base_freq") or 10000.0
    hidden = int(cfg["hidden_size"])
    return spec_from_hf(
        cfg, "gemma3",
        rope_layer_type="full_attention",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        layer_types=layer_types,
        rope_local_theta=float(local_theta),
        qk_norm=True,
        post_norms=True,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256),
        embedding_scale=math.sqrt(hidden),
        norm_offset=1.0,
    )


ARCH = Arch(
    model_type="gemma3_text",
    gguf_arch="gemma3",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    activation="gelu_tanh",
    gguf_norm_offset=1.0,
    hf_prefixes=("model.language_model.", "language_model.model."),
    hf_ignore=(r".*rotary_emb\.inv_freq$", r"^(model\.)?(vision_tower|multi_modal_projector)\..*"),
    aliases=("gemma3",),
)
