"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with a mixture-of-experts MLP in every
layer: a softmax router, the top `num_experts_per_tok` experts, their weights renormalized when
`norm_topk_prob` (llama.cpp's `qwen3moe` always renormalizes), SiLU-gated experts of
`moe_intermediate_size`. HF stores one matrix per expert; the stream stacks them as
llama.cpp's `ffn_*_exps`."""

import dataclasses

from lmforge.arch import Arch
from lmforge.arch.common import UNSUPPORTED_KEYS
from lmforge.arch.qwen3 import ARCH as QWEN3
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.spec import ModelSpec

_DENSE = ("layers.{i}.gate", "layers.{i}.up", "layers.{i}.down")
_MLP = "model.layers.{i}.mlp"
HF = {k: v for k, v in QWEN3.hf_names.items() if k not in _DENSE}
HF.update(
    {
        "layers.{i}.router": f"{_MLP}.gate.weight",  # (n_experts, hidden)
        "layers.{i}.gate_exps": f"{_MLP}.experts.{{j}}.gate_proj.weight",  # (n_experts, moe_intermediate, hidden)
        "layers.{i}.up_exps": f"{_MLP}.experts.{{j}}.up_proj.weight",  # (n_experts, moe_intermediate, hidden)
        "layers.{i}.down_exps": f"{_MLP}.experts.{{j}}.down_proj.weight",  # (n_experts, hidden, moe_intermediate)
    }
)
GGUF = {k: v for k, v in QWEN3.gguf_names.items() if k not in _DENSE}
GGUF.update(
    {
        "layers.{i}.router": "blk.{i}.ffn_gate_inp.weight",
        "layers.{i}.gate_exps": "blk.{i}.ffn_gate_exps.weight",
        "layers.{i}.up_exps": "blk.{i}.ffn_up_exps.weight",
        "layers.{i}.down_exps": "blk.{i}.ffn_down_exps.weight",
    }
)


def _spec(cfg: dict) -> ModelSpec:
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step") or 1) != 1:
        key = "mlp_only_layers" if cfg.get("mlp_only_layers") else "decoder_sparse_step"
        raise CheckpointError(f"config.json field {key!r} mixes dense and expert layers, which lmforge does not build")
    dense = {k: v for k, v in cfg.items() if k not in UNSUPPORTED_KEYS}
    return dataclasses.replace(
        QWEN3.spec_from_hf(dense),
        arch="qwen3moe",
        intermediate_size=int(cfg["moe_intermediate_size"]),
        n_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts")),
        n_experts_used=int(cfg["num_experts_per_tok"]),
        moe_renormalize=bool(cfg.get("norm_topk_prob", False)),
    )


def _gguf_spec(g, fields: dict) -> dict:
    return dict(
        intermediate_size=int(g("expert_feed_forward_length", fields["intermediate_size"])),
        n_experts=int(g("expert_count")),
        n_experts_used=int(g("expert_used_count")),
        moe_renormalize=True,
    )


def _gguf_metadata(spec: ModelSpec) -> dict:
    if not spec.moe_renormalize:
        raise LmforgeError(
            "llama.cpp's qwen3moe renormalizes the chosen experts' weights (norm_topk_prob true); this model does not"
        )
    meta = QWEN3.gguf_metadata(spec)
    meta.update(
        expert_count=(spec.n_experts, "uint32"),
        expert_used_count=(spec.n_experts_used, "uint32"),
        expert_feed_forward_length=(spec.intermediate_size, "uint32"),
    )
    return meta


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    QWEN3.hf_config(spec, cfg)
    cfg.update(
        num_experts=spec.n_experts,
        num_experts_per_tok=spec.n_experts_used,
        moe_intermediate_size=spec.intermediate_size,
        norm_topk_prob=spec.moe_renormalize,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


ARCH = Arch(
    model_type="qwen3_moe",
    name="qwen3moe",
    gguf_arch="qwen3moe",
    hf_class="Qwen3MoeForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    gguf_spec=_gguf_spec,
    gguf_metadata=_gguf_metadata,
    hf_config=_hf_config,
    genai_type="decoder",  # onnxruntime-genai 0.18 has no type of its own for it
)
