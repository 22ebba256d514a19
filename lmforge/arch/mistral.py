"""Mistral: the Llama layout plus an optional sliding attention window on every layer.

llama.cpp stores Mistral as `llama` (with the q/k row permutation) and runs it without the
window; lmforge's own GGUF files keep the window key, which tells a Mistral apart on reading."""

from lmforge.arch import Arch
from lmforge.arch.common import GGUF_WINDOW, LLAMA_GGUF, LLAMA_HF, gguf_window_dropped, spec_from_hf


def _spec(cfg: dict):
    window = cfg.get("sliding_window")
    return spec_from_hf(cfg, "mistral", sliding_window=int(window) if window else None)


ARCH = Arch(
    model_type="mistral",
    name="mistral",
    gguf_arch="llama",
    hf_class="MistralForCausalLM",
    hf_names=LLAMA_HF,
    gguf_names=LLAMA_GGUF,
    spec_from_hf=_spec,
    permute_qk=True,
    gguf_metadata=lambda spec: gguf_window_dropped(spec, "llama"),
    gguf_claims=lambda g: bool(g(GGUF_WINDOW)) and not g("expert_count"),  # with experts: Mixtral
)
