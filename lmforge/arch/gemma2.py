"""Gemma 2: Gemma 3's layer (scaled embeddings, (1 + w) RMSNorm, four norms per layer, GELU-tanh
MLP) without q/k norms, with soft-capped attention scores and logits (cap * tanh(x / cap)),
sliding-window and global layers alternating, one rope base for both.

llama.cpp's `gemma2` alternates the layers itself (even layers slide) and scales queries by
1/sqrt(head_dim), except for the 27B model (46 layers): hidden / heads."""

import math

from lmforge.arch import Arch
from lmforge.arch.common import GGUF_WINDOW, f32, spec_from_hf
from lmforge.arch.gemma3 import GGUF as GEMMA3_GGUF
from lmforge.arch.gemma3 import HF as GEMMA3_HF
from lmforge.arch.gemma3 import LAYER_TYPES, NORM_OFFSET, gemma_hf_config
from lmforge.errors import LmforgeError
from lmforge.spec import ModelSpec

_QK_NORMS = ("layers.{i}.q_norm", "layers.{i}.k_norm")
HF = {k: v for k, v in GEMMA3_HF.items() if k not in _QK_NORMS}
GGUF = {k: v for k, v in GEMMA3_GGUF.items() if k not in _QK_NORMS}
# llama.cpp's keys under `gemma2.` -> ModelSpec field
SOFTCAPS = {"attn_logit_softcapping": "attn_softcap", "final_logit_softcapping": "final_softcap"}
LARGE_LAYERS = 46  # Gemma 2 27B: llama.cpp scales its queries by hidden / heads


def alternating(n_layers: int) -> tuple[str, ...]:
    """Gemma 2's layers: even ones slide, odd ones attend globally."""
    return tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))


def _spec(cfg: dict) -> ModelSpec:
    n_layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    layer_types = tuple(LAYER_TYPES[t] for t in types) if types else alternating(n_layers)
    return spec_from_hf(
        cfg,
        "gemma2",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        layer_types=layer_types,
        post_norms=True,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256),
        embedding_scale=math.sqrt(int(cfg["hidden_size"])),
        norm_offset=NORM_OFFSET,
        **{field: float(cfg[key]) if cfg.get(key) else None for key, field in SOFTCAPS.items()},
    )


def _gguf_spec(g, fields: dict) -> dict:
    hidden, n_layers = fields["hidden_size"], fields["n_layers"]
    scalar = hidden // fields["n_heads"] if n_layers == LARGE_LAYERS else fields["head_dim"]
    return dict(
        layer_types=alternating(n_layers),
        post_norms=True,
        query_pre_attn_scalar=float(scalar),
        embedding_scale=math.sqrt(hidden),
        norm_offset=NORM_OFFSET,
        **{field: f32(g(key)) if g(key) else None for key, field in SOFTCAPS.items()},
    )


def _gguf_metadata(spec: ModelSpec) -> dict:
    if spec.layer_types != alternating(spec.n_layers):
        raise LmforgeError("llama.cpp's gemma2 alternates sliding and global layers; this model's differ")
    meta = {GGUF_WINDOW: (spec.sliding_window or spec.context_length, "uint32")}
    meta.update({key: (getattr(spec, field), "float32") for key, field in SOFTCAPS.items() if getattr(spec, field)})
    return meta


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    gemma_hf_config(spec, cfg, **{key: getattr(spec, field) for key, field in SOFTCAPS.items()})


ARCH = Arch(
    model_type="gemma2",
    name="gemma2",
    gguf_arch="gemma2",
    hf_class="Gemma2ForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    activation="gelu_tanh",
    gguf_spec=_gguf_spec,
    gguf_metadata=_gguf_metadata,
    hf_config=_hf_config,
)
