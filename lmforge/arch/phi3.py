"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv and gate_up projections, `su`/`longrope` scaling,
partial rotary (Phi-4-mini rotates 3/4 of each head).

The fused tensors stay fused in the stream (`layers.{i}.qkv` rows: q, then k, then v;
`layers.{i}.gate_up` rows: gate, then up): `Arch.parts` tells consumers so, and writers split
them if they want."""

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, spec_from_hf

_FUSED = {"layers.{i}.q", "layers.{i}.k", "layers.{i}.v", "layers.{i}.gate", "layers.{i}.up"}
_SKIP = {k for k in LLAMA_HF if k.endswith(".bias")} | _FUSED

HF = {k: v for k, v in LLAMA_HF.items() if k not in _SKIP}
HF["layers.{i}.qkv"] = "model.layers.{i}.self_attn.qkv_proj.weight"
HF["layers.{i}.gate_up"] = "model.layers.{i}.mlp.gate_up_proj.weight"

GGUF = {k: v for k, v in LLAMA_GGUF.items() if k not in _SKIP}
GGUF["layers.{i}.qkv"] = "blk.{i}.attn_qkv.weight"
GGUF["layers.{i}.gate_up"] = "blk.{i}.ffn_up.weight"  # llama.cpp keeps gate|up fused here


def _llamacpp_name(name: str, tokens) -> str:
    """general.name llama.cpp loads: it sets token attributes of Phi-3 models by name and stops
    loading when a name containing "phi3" meets a vocabulary without those tokens."""
    needed = {"<unk>", "<s>", "</s>", "<|endoftext|>"}
    if any(k in name.lower() for k in ("phi3", "phi-3")) and not needed <= set(tokens):
        return name.lower().replace("phi-3", "phi").replace("phi3", "phi")
    return name


def _spec(cfg: dict):
    window = cfg.get("sliding_window")
    # Phi-3's sliding_window equals its context in published configs: not a real window.
    if window and window >= int(cfg.get("max_position_embeddings") or 0):
        window = None
    return spec_from_hf(cfg, "phi3", sliding_window=int(window) if window else None)


ARCH = Arch(
    model_type="phi3",
    name="phi3",
    gguf_arch="phi3",
    hf_class="Phi3ForCausalLM",
    hf_names=HF,
    gguf_names=GGUF,
    spec_from_hf=_spec,
    gguf_name_rule=_llamacpp_name,
)
