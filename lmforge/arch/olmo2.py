"""AI2 OLMo 2: no norm before attention or the MLP; an RMSNorm on each sublayer's output
before its residual add (`post_attention_layernorm`, `post_feedforward_layernorm`), and an
RMSNorm over the whole q and k projections (weights (heads * head_dim,), not per head).
llama.cpp's `olmo2` keeps HF's rotary layout."""

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, spec_from_hf

_PRE_NORMS = ("layers.{i}.attn_norm", "layers.{i}.mlp_norm")

HF = {k: v for k, v in LLAMA_HF.items() if k not in _PRE_NORMS}
HF.update(
    {
        "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",  # (n_heads * head_dim,)
        "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",  # (n_kv_heads * head_dim,)
        "layers.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
    }
)
GGUF = {k: v for k, v in LLAMA_GGUF.items() if k not in _PRE_NORMS}
GGUF.update(
    {
        "layers.{i}.q_norm": "blk.{i}.attn_q_norm.weight",
        "layers.{i}.k_norm": "blk.{i}.attn_k_norm.weight",
        "layers.{i}.post_attn_norm": "blk.{i}.post_attention_norm.weight",
        "layers.{i}.post_mlp_norm": "blk.{i}.post_ffw_norm.weight",
    }
)
NORMS = dict(pre_norms=False, post_norms=True, qk_norm=True)


def _hf_config(spec, cfg: dict) -> None:
    cfg["attention_bias"] = spec.attention_bias


ARCH = Arch(
    model_type="olmo2",
    name="olmo2",
    gguf_arch="olmo2",
    hf_class="Olmo2ForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=lambda cfg: spec_from_hf(cfg, "olmo2", **NORMS),
    gguf_spec=lambda g, fields: NORMS,
    hf_config=_hf_config,
    genai_type="decoder",  # onnxruntime-genai 0.18 has no type of its own for it
)
