"""Mistral: the Llama layout plus an optional sliding attention window on every layer.

llama.cpp stores Mistral as `llama` (with the q/k row permutation)."""
from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, spec_from_hf


def _spec(cfg: dict):
    window = cfg.get("sliding_window")
    return spec_from_hf(cfg, "mistral", sliding_window=int(window) if window else None)


ARCH = Arch(
    model_type="mistral",
    gguf_arch="llama",
    hf_names=LLAMA_HF,
    gguf_names=LLAMA_GGUF,
    spec_from_hf=_spec,
    permute_qk=True,
)
