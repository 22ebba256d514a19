"""Qwen3 (dense): Qwen2's layout without q/k/v biases, with a per-head RMSNorm on q and on k
before rotary. llama.cpp's `qwen3` keeps HF's rotary layout (no q/k row interleave)."""

import dataclasses

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF
from lmforge.arch.qwen2 import ARCH as QWEN2

HF = {
    **LLAMA_HF,
    "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",  # (head_dim,)
    "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",  # (head_dim,)
}
GGUF = {
    **LLAMA_GGUF,
    "layers.{i}.q_norm": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.k_norm": "blk.{i}.attn_k_norm.weight",
}


def _spec(cfg: dict):
    """Qwen2's fields (its sliding-window layers too), biases as the config says, q/k norms."""
    spec = QWEN2.spec_from_hf(cfg)
    return dataclasses.replace(spec, arch="qwen3", attention_bias=bool(cfg.get("attention_bias", False)), qk_norm=True)


def _hf_config(spec, cfg: dict) -> None:
    QWEN2.hf_config(spec, cfg)
    cfg["attention_bias"] = spec.attention_bias


ARCH = Arch(
    model_type="qwen3",
    name="qwen3",
    gguf_arch="qwen3",
    hf_class="Qwen3ForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    hf_config=_hf_config,
)
