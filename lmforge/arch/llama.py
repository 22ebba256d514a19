"""Llama (Llama 2/3, SmolLM2, TinyLlama): the reference layout; Llama 3 rope scaling."""
from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, spec_from_hf

ARCH = Arch(
    model_type="llama",
    gguf_arch="llama",
    hf_names=LLAMA_HF,
    gguf_names=LLAMA_GGUF,
    spec_from_hf=lambda cfg: spec_from_hf(cfg, "llama"),
    permute_qk=True,
)
