"""Llama (Llama 2/3, SmolLM2, TinyLlama): the reference layout; Llama 3 rope scaling."""

import math

import numpy as np

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, hf_window_config, spec_from_hf
from lmforge.spec import ModelSpec, RopeScaling


def llama3_inv_freq(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3's rope scaling of the inverse frequencies `inv`, in inv's dtype, as transformers
    computes it: long wavelengths divided by the factor, short ones kept, a smooth blend between.
    The ONNX rope tables use it directly; the GGUF writer stores inv / this (`rope_freqs`)."""
    low_wavelen = s.original_context_length / s.low_freq_factor
    high_wavelen = s.original_context_length / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(inv.dtype)


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    cfg.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
    hf_window_config(spec, cfg)


ARCH = Arch(
    model_type="llama",
    name="llama",
    gguf_arch="llama",
    hf_class="LlamaForCausalLM",
    hf_names=LLAMA_HF,
    gguf_names=LLAMA_GGUF,
    spec_from_hf=lambda cfg: spec_from_hf(cfg, "llama"),
    permute_qk=True,
    hf_config=_hf_config,
)
