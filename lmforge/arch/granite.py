"""IBM Granite 3 (dense): the Llama layout with four multipliers: token embeddings times
`embedding_multiplier`, attention softmax scale `attention_multiplier` (instead of
1/sqrt(head_dim)), attention and MLP outputs times `residual_multiplier` before each residual
add, logits divided by `logits_scaling`. llama.cpp's `granite` stores them as keys and keeps
Llama's q/k row interleave."""

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, f32, spec_from_hf
from lmforge.spec import ModelSpec

# llama.cpp's key under `granite.` -> (config.json key, ModelSpec field)
MULTIPLIERS = {
    "embedding_scale": ("embedding_multiplier", "embedding_scale"),
    "attention.scale": ("attention_multiplier", "attention_scale"),
    "residual_scale": ("residual_multiplier", "residual_scale"),
    "logit_scale": ("logits_scaling", "logit_scale"),
}


def _spec(cfg: dict) -> ModelSpec:
    fields = {field: float(cfg.get(key) or 1.0) for key, field in MULTIPLIERS.values()}
    return spec_from_hf(cfg, "granite", **fields)


def _gguf_spec(g, fields: dict) -> dict:
    return {field: f32(g(key, 1.0)) for key, (_, field) in MULTIPLIERS.items()}


def _gguf_metadata(spec: ModelSpec) -> dict:
    return {key: (getattr(spec, field) or 1.0, "float32") for key, (_, field) in MULTIPLIERS.items()}


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    cfg.update({key: getattr(spec, field) or 1.0 for key, field in MULTIPLIERS.values()})
    cfg.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)


ARCH = Arch(
    model_type="granite",
    name="granite",
    gguf_arch="granite",
    hf_class="GraniteForCausalLM",
    hf_names=LLAMA_HF,
    gguf_names=LLAMA_GGUF,
    spec_from_hf=_spec,
    permute_qk=True,
    gguf_spec=_gguf_spec,
    gguf_metadata=_gguf_metadata,
    hf_config=_hf_config,
)
