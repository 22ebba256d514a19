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


LLAMA3_BANDS = (1.0, 4.0)  # (low_freq_factor, high_freq_factor) of every published Llama 3.x


def llama3_from_freq_factors(theta: float, rotary_dim: int, factors: np.ndarray) -> RopeScaling | None:
    """Llama 3 rope scaling back from the per-frequency divisors llama.cpp stores (`rope_freqs`),
    for writing config.json: Llama 3.x's bands, the factor that divides the longest wavelengths,
    and the original context that places the blend between; None when no such scaling gives
    exactly these divisors."""
    low, high = LLAMA3_BANDS
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    wavelen, f = 2 * math.pi / inv, np.asarray(factors, dtype=np.float64)
    factor = float(f.max())
    if factor <= 1.0:
        return None
    blend = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if blend.any():  # 1/f = (1 - s) / factor + s, s = (orig / wavelen - low) / (high - low)
        s = (1 / f[blend] - 1 / factor) / (1 - 1 / factor)
        orig = float(np.mean(wavelen[blend] * (s * (high - low) + low)))
    else:  # no wavelength in the blend: any context between the kept and the divided ones will do
        orig = float(wavelen[f <= 1 + 1e-6].max()) * high if (f <= 1 + 1e-6).any() else float(wavelen.min()) * low
    candidate = RopeScaling(
        "llama3", factor=factor, original_context_length=round(orig), low_freq_factor=low, high_freq_factor=high
    )
    redone = inv / llama3_inv_freq(inv, candidate)
    return candidate if np.allclose(redone, f, rtol=1e-5, atol=0) else None


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
