"""AWQ on the CPU (Lin et al., 2023): activation-aware per-channel scales for int4 weights.

Per linear group, the mean |activation| of each input channel gives candidate scales
s = mean^alpha; a grid over alpha keeps the s whose quantized weights W s reproduce the group's
float outputs best on a sample of calibration rows. The 1/s goes into the op before the group
(RMSNorm weight, `up` rows, `v` rows), so the float model is unchanged. No GPU, no AutoAWQ.

This module is the pure search over numpy arrays; the calibration run that collects the
activations through lmforge's fp32 graph is `lmforge.export.awq`.
"""

from __future__ import annotations

import numpy as np

from lmforge.quant.nbits import rtn

GRID = np.linspace(0.0, 1.0, 21)


def scale_groups(spec, i: int) -> list[tuple[str, str | None]]:
    """(group, tensor whose rows/values take 1/s) for layer i of a ModelSpec. The `o` group needs
    one v row per input channel, so it is scaled only without grouped-query attention; groups
    whose feeding projection has a bias (v, up) are left alone, since the bias would need the 1/s too."""
    groups = []
    if spec.pre_norms:  # without them (OLMo 2) the group's input is the residual stream: nothing to fold 1/s into
        groups.append((f"layers.{i}.qkv", f"layers.{i}.attn_norm"))
    if spec.pre_norms and not spec.n_experts:  # experts stay float
        groups.append((f"layers.{i}.gate_up", f"layers.{i}.mlp_norm"))
    if not spec.mlp_bias and not spec.n_experts:
        groups.append((f"layers.{i}.down", f"layers.{i}.up"))
    if spec.n_heads == spec.n_kv_heads and not spec.qk_norm and not spec.attention_bias:
        groups.append((f"layers.{i}.o", f"layers.{i}.v"))
    return groups


def search_scale(w: np.ndarray, x: np.ndarray, mean_abs: np.ndarray, quant) -> tuple[np.ndarray, float, float]:
    """Best s for weight W (N, K) given sample inputs X (T, K) and per-channel mean |x|; `quant`
    gives bits, block_size and symmetric (a QuantOptions).
    Returns (s, relative error with s, relative error without scaling)."""
    y = x @ w.T
    denom = float((y * y).mean()) or 1.0
    best, best_err, base_err = np.ones(w.shape[1], np.float32), np.inf, np.inf
    m = np.maximum(mean_abs, 1e-8)
    for alpha in GRID:
        s = np.power(m, alpha)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        wq = rtn(w * s[None, :], quant.bits, quant.block_size, quant.symmetric).dequantize() / s[None, :]
        err = float(((x @ wq.T - y) ** 2).mean()) / denom
        if alpha == 0.0:
            base_err = err
        if err < best_err:
            best, best_err = s, err
    return best, best_err, base_err
