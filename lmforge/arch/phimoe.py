"""Phi-3.5-MoE: Llama-style attention with biases, LayerNorm (mean removed, with a bias) instead
of RMSNorm, an output head with a bias, and a mixture of 16 SiLU-gated experts per layer routed by
Microsoft's sparsemixer. At inference the sparsemixer takes the best expert, weighted by the
softmax of the router logits with those more than 2 x `router_jitter_noise` (relative) below it
masked out; then the best of the rest, weighted the same way with the first expert masked too.
Always two experts; the weights are not renormalized. Rotary: longrope whose magnitude is the
config's `short_mscale` / `long_mscale`.

HF stores one matrix per expert (Mixtral's names); the stream stacks them as llama.cpp's
`ffn_*_exps`. llama.cpp's `phimoe` graph differs from transformers': it runs the norms as
RMSNorm plus the bias and routes by the top 2 of one softmax, renormalized."""

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, spec_from_hf
from lmforge.arch.mixtral import GGUF as MIXTRAL_GGUF
from lmforge.arch.mixtral import HF as MIXTRAL_HF
from lmforge.errors import CheckpointError
from lmforge.spec import ModelSpec

_NORMS = ("layers.{i}.attn_norm", "layers.{i}.mlp_norm", "norm")
_EXTRA = [f"{n}.bias" for n in _NORMS] + ["lm_head.bias"]
HF = dict(MIXTRAL_HF)
HF.update({k: LLAMA_HF[k.removesuffix(".bias")].removesuffix(".weight") + ".bias" for k in _EXTRA})
GGUF = dict(MIXTRAL_GGUF)
GGUF.update({k: LLAMA_GGUF[k.removesuffix(".bias")].removesuffix(".weight") + ".bias" for k in _EXTRA})
EXPERT_KEYS = {"expert_count": "n_experts", "expert_used_count": "n_experts_used"}
JITTER = 0.01  # Phi-3.5-MoE's router_jitter_noise, for a GGUF that does not say it
JITTER_KEY = "expert_router_jitter"  # lmforge's own key: llama.cpp routes without it (see above)


def _spec(cfg: dict) -> ModelSpec:
    if int(cfg.get("num_experts_per_tok") or 2) != 2:
        raise CheckpointError(
            f"config.json field 'num_experts_per_tok' is {cfg['num_experts_per_tok']}; Phi-3.5-MoE's sparsemixer "
            "router always takes 2 experts"
        )
    window = cfg.get("sliding_window")
    if window and window < int(cfg.get("max_position_embeddings") or 0):  # Phi-3.5-MoE's equals its context
        raise CheckpointError(
            f"config.json field 'sliding_window' is {window}, below the context; lmforge builds Phi-3.5-MoE without one"
        )
    spec = spec_from_hf(
        cfg,
        "phimoe",
        n_experts=int(cfg.get("num_local_experts") or 16),  # transformers' defaults
        n_experts_used=2,
        moe_renormalize=False,
        moe_router="sparsemixer",
        router_jitter=float(cfg.get("router_jitter_noise", JITTER)),
        layer_norm=True,
        lm_head_bias=bool(cfg.get("lm_head_bias", False)),
    )
    return _mscale(cfg, spec)


def _mscale(cfg: dict, spec: ModelSpec) -> ModelSpec:
    """transformers scales Phi-3.5-MoE's rotary by `short_mscale` (or `long_mscale` past the
    original context), not longrope's own attention factor: one value both ways, or refused."""
    import dataclasses

    rs = spec.rope_scaling
    if rs is None or rs.kind != "longrope":
        return spec
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    short, long = params.get("short_mscale"), params.get("long_mscale")
    if short is None or long is None or float(short) != float(long):
        raise CheckpointError(
            f"config.json rope_scaling.short_mscale ({short}) and long_mscale ({long}) differ or are missing; "
            "lmforge builds one rotary magnitude"
        )
    return dataclasses.replace(spec, rope_scaling=dataclasses.replace(rs, attention_factor=float(short)))


def _gguf_metadata(spec: ModelSpec) -> dict:
    meta = {key: (getattr(spec, field), "uint32") for key, field in EXPERT_KEYS.items()}
    meta[JITTER_KEY] = (spec.router_jitter, "float32")
    return meta


def _gguf_spec(g, fields: dict) -> dict:
    spec = {field: int(g(key)) for key, field in EXPERT_KEYS.items()}
    jitter = float(g(JITTER_KEY, JITTER))
    return dict(spec, moe_renormalize=False, moe_router="sparsemixer", router_jitter=jitter, layer_norm=True)


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    cfg.update(
        num_local_experts=spec.n_experts,
        num_experts_per_tok=spec.n_experts_used,
        router_jitter_noise=spec.router_jitter,
        input_jitter_noise=0.0,
        attention_bias=spec.attention_bias,
        lm_head_bias=spec.lm_head_bias,
        sliding_window=None,
    )
    if "rope_scaling" in cfg:  # see _mscale
        mscale = cfg["rope_scaling"]["attention_factor"]
        cfg["rope_scaling"].update(short_mscale=mscale, long_mscale=mscale)


ARCH = Arch(
    model_type="phimoe",
    name="phimoe",
    gguf_arch="phimoe",
    hf_class="PhimoeForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    gguf_spec=_gguf_spec,
    gguf_metadata=_gguf_metadata,
    hf_config=_hf_config,
    genai_type="decoder",  # onnxruntime-genai 0.18 has no type of its own for it
)
