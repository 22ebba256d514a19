"""Rotary-embedding tables (cos/sin caches) from a ModelSpec, computed as transformers does
(float32 inverse frequencies, float32 angle products) so exported graphs match it closely."""

from __future__ import annotations

import numpy as np

from lmforge.arch.llama import llama3_inv_freq
from lmforge.errors import LmforgeError
from lmforge.spec import ModelSpec, RopeScaling


def base_inv_freq(theta: float, rotary_dim: int) -> np.ndarray:
    """1 / theta^(2i/d), float32, shape (rotary_dim/2,)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    return (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)


def inv_freqs(theta: float, rotary_dim: int, scaling: RopeScaling | None) -> dict[str, np.ndarray]:
    """Inverse frequencies per regime: {"": ...} or, for longrope, {"short": ..., "long": ...}."""
    inv = base_inv_freq(theta, rotary_dim)
    if scaling is None:
        return {"": inv}
    kind = scaling.kind
    if kind == "linear":
        return {"": (inv / np.float32(scaling.factor)).astype(np.float32)}
    if kind == "llama3":
        return {"": llama3_inv_freq(inv, scaling)}
    if kind == "freq_factors":
        return {"": (inv / np.asarray(scaling.long_factor, dtype=np.float32)).astype(np.float32)}
    if kind == "longrope":
        short = np.asarray(scaling.short_factor, dtype=np.float32)
        long = np.asarray(scaling.long_factor, dtype=np.float32)
        return {"short": (inv / short).astype(np.float32), "long": (inv / long).astype(np.float32)}
    raise LmforgeError(f"rope scaling {kind!r} is not supported by the ONNX exporter yet")


def cos_sin(inv: np.ndarray, n_positions: int, magnitude: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches of shape (n_positions, rotary_dim/2), float32."""
    positions = np.arange(n_positions, dtype=np.float32)[:, None]
    angles = (positions * inv[None, :]).astype(np.float32)
    m = np.float32(magnitude)
    return (np.cos(angles) * m).astype(np.float32), (np.sin(angles) * m).astype(np.float32)


def rope_tables(spec: ModelSpec, n_positions: int, local: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{regime: (cos, sin)} for global layers, or for sliding layers when `local` (Gemma 3's own
    base, no scaling). Longrope gives "short" and "long" regimes, switched on the total length."""
    if local and spec.rope_local_theta:
        return {"": cos_sin(base_inv_freq(spec.rope_local_theta, spec.rotary_dim), n_positions)}
    s = spec.rope_scaling
    magnitude = s.attention_factor if s is not None and s.attention_factor else 1.0
    return {k: cos_sin(v, n_positions, magnitude) for k, v in inv_freqs(spec.rope_theta, spec.rotary_dim, s).items()}
