"""Mixtral: the Llama layout (Mistral's window) whose MLP is a mixture of experts: a router
(n_experts, hidden) picks the top `num_experts_per_tok` experts of its softmax per token, their
weights renormalized to sum to one; each expert is a SiLU-gated MLP (w1 gate, w3 up, w2 down).

HF stores one matrix per expert; the stream holds them stacked, (n_experts, rows, cols), as
llama.cpp's merged `ffn_*_exps` tensors do. llama.cpp writes Mixtral as `llama` (q/k rows
interleaved) with `expert_count` and `expert_used_count`, which tell it apart on reading."""

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, gguf_window_dropped, spec_from_hf
from lmforge.spec import ModelSpec

_DENSE = ("layers.{i}.gate", "layers.{i}.up", "layers.{i}.down")
_MOE = "model.layers.{i}.block_sparse_moe"
HF = {k: v for k, v in LLAMA_HF.items() if k not in _DENSE}
HF.update(
    {
        "layers.{i}.router": f"{_MOE}.gate.weight",  # (n_experts, hidden)
        "layers.{i}.gate_exps": f"{_MOE}.experts.{{j}}.w1.weight",  # (n_experts, intermediate, hidden)
        "layers.{i}.up_exps": f"{_MOE}.experts.{{j}}.w3.weight",  # (n_experts, intermediate, hidden)
        "layers.{i}.down_exps": f"{_MOE}.experts.{{j}}.w2.weight",  # (n_experts, hidden, intermediate)
    }
)
GGUF = {k: v for k, v in LLAMA_GGUF.items() if k not in _DENSE}
GGUF.update(
    {
        "layers.{i}.router": "blk.{i}.ffn_gate_inp.weight",
        "layers.{i}.gate_exps": "blk.{i}.ffn_gate_exps.weight",
        "layers.{i}.up_exps": "blk.{i}.ffn_up_exps.weight",
        "layers.{i}.down_exps": "blk.{i}.ffn_down_exps.weight",
    }
)
# llama.cpp's keys under `llama.` -> ModelSpec field
EXPERT_KEYS = {"expert_count": "n_experts", "expert_used_count": "n_experts_used"}


def _spec(cfg: dict) -> ModelSpec:
    window = cfg.get("sliding_window")
    return spec_from_hf(
        cfg,
        "mixtral",
        sliding_window=int(window) if window else None,
        n_experts=int(cfg.get("num_local_experts") or 8),  # transformers' defaults
        n_experts_used=int(cfg.get("num_experts_per_tok") or 2),
    )


def _gguf_metadata(spec: ModelSpec) -> dict:
    meta = gguf_window_dropped(spec, "llama")
    meta.update({key: (getattr(spec, field), "uint32") for key, field in EXPERT_KEYS.items()})
    return meta


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    cfg.update(num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_used)
    cfg["sliding_window"] = spec.sliding_window


ARCH = Arch(
    model_type="mixtral",
    name="mixtral",
    gguf_arch="llama",
    hf_class="MixtralForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    permute_qk=True,
    gguf_spec=lambda g, fields: {field: int(g(key)) for key, field in EXPERT_KEYS.items()},
    gguf_metadata=_gguf_metadata,
    hf_config=_hf_config,
    genai_type="decoder",  # onnxruntime-genai 0.18 has no type of its own for it
    gguf_claims=lambda g: bool(g("expert_count")),
)
