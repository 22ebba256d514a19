"""Blockwise N-bit weights in ONNX Runtime's MatMulNBits layout, and round-to-nearest (RTN).

A weight W (N outputs, K inputs) is cut into blocks of `block_size` along K; each block has a
scale and a zero point and W[n, k] = (q[n, k] - zero_point) * scale. MatMulNBits takes
B (N, n_blocks, block_size * bits / 8) uint8 with the lower nibble first, scales (N, n_blocks),
and zero points either packed uint (N, ceil(n_blocks * bits / 8)) or float (N, n_blocks);
without zero points it assumes 2^(bits - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NBits:
    """Unpacked codes q (N, n_blocks, block_size) uint8, scales (N, n_blocks) float32, and
    zero points: None (implicit 2^(bits-1)), uint8 (N, n_blocks) integers, or float32 (N, n_blocks).

    `offsets` (N, n_blocks) float32, when set, adds a constant per block: W = (q - zp) * scale
    + offset. That is how GGUF's Q4_1/Q4_K (value = q d + m) stay exact while MatMulNBits keeps
    integer zero points: ONNX Runtime's CPU kernels fall back to a slow path for float zero points
    (7-16 tok/s against 172 on the default model, measured), so the graph adds the offsets as
    a small matmul of per-block input sums instead."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    K: int
    offsets: np.ndarray | None = None

    @property
    def N(self) -> int:
        return self.q.shape[0]

    @property
    def block_size(self) -> int:
        return self.q.shape[2]

    @property
    def zp_kind(self) -> str:
        if self.zero_points is None:
            return "none"
        return "float" if self.zero_points.dtype.kind == "f" else "uint"

    def float_zero_points(self) -> np.ndarray:
        if self.zero_points is None:
            return np.full(self.scales.shape, 2 ** (self.bits - 1), dtype=np.float32)
        return self.zero_points.astype(np.float32)

    def packed_b(self) -> np.ndarray:
        """B for MatMulNBits: (N, n_blocks, block_size * bits / 8) uint8."""
        if self.bits == 8:
            return self.q
        assert self.bits == 4
        return (self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points as MatMulNBits takes them (uint ones packed like B)."""
        if self.zero_points is None or self.zp_kind == "float":
            return self.zero_points
        zp = self.zero_points
        if self.bits == 8:
            return zp
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)

    def dequantize(self) -> np.ndarray:
        """W (N, K) float32, computed as (q - zero_point) * scale."""
        w = (self.q.astype(np.float32) - self.float_zero_points()[..., None]) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(self.N, -1)[:, : self.K]


def concat(parts: list[NBits]) -> NBits:
    """Stack along N (e.g. q, k, v into one packed QKV); zero-point kinds are unified."""
    kinds = {p.zp_kind for p in parts}
    if len(kinds) > 1 and "float" in kinds:
        zps = [p.float_zero_points() for p in parts]
    elif len(kinds) > 1:  # implicit and integer: spell the implicit one out
        zps = [
            p.zero_points if p.zero_points is not None else np.full(p.scales.shape, 2 ** (p.bits - 1), np.uint8)
            for p in parts
        ]
    else:
        zps = None if kinds == {"none"} else [p.zero_points for p in parts]
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])
    return NBits(
        np.concatenate([p.q for p in parts]),
        np.concatenate([p.scales for p in parts]),
        None if zps is None else np.concatenate(zps),
        parts[0].bits,
        parts[0].K,
        offsets,
    )


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    n, k = w.shape
    pad = (-k) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), w.dtype)], axis=1)
    return w.reshape(n, -1, block_size).astype(np.float32, copy=False)


ROWS = 1024  # rows quantized at a time: bounds the float temporaries of a large matrix


def rtn(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False, fit_scale: bool = True) -> NBits:
    """Round-to-nearest blockwise quantization of W (N, K), a slab of rows at a time; see
    `_rtn_rows`."""
    if w.shape[0] <= ROWS:
        return _rtn_rows(w, bits, block_size, symmetric, fit_scale)
    slabs = [_rtn_rows(w[r : r + ROWS], bits, block_size, symmetric, fit_scale) for r in range(0, w.shape[0], ROWS)]
    zps = None if slabs[0].zero_points is None else np.concatenate([x.zero_points for x in slabs])
    return NBits(np.concatenate([x.q for x in slabs]), np.concatenate([x.scales for x in slabs]), zps, bits, w.shape[1])


def _rtn_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool, fit_scale: bool) -> NBits:
    """Round-to-nearest blockwise quantization of W (N, K).

    symmetric: codes around the implicit zero point 2^(bits-1), chosen by ggml's Q4_0 rule (the
    block's largest-magnitude value maps to code 0, same rounding); with fit_scale, blocks of up
    to 32 have their scale refitted by least squares for those codes (default model, WikiText-2,
    40 windows: 28.56 against 28.76 without the refit and 28.74 for llama.cpp's Q4_0; at block
    128 the refit costs the outliers: 33.07 against 32.35, so larger blocks keep it off). asymmetric:
    the block's range (widened to include 0) spans all codes, with an integer zero point.
    (Searching the scale before rounding, to minimise the mean error, raised perplexity instead.)"""
    x = _blocks(w, block_size)
    top = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        idx = np.abs(x).argmax(axis=-1)[..., None]
        mx = np.take_along_axis(x, idx, axis=-1)[..., 0]
        scale = (mx / -half).astype(np.float32)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        q = np.clip(np.floor(x * inv[..., None] + (half + 0.5)), 0, top).astype(np.uint8)
        if fit_scale and block_size <= 32:  # least-squares scale for these codes: sum(x c) / sum(c c)
            c = q.astype(np.float32) - half
            den = (c * c).sum(axis=-1)
            scale = np.where(den > 0, (x * c).sum(axis=-1) / np.maximum(den, 1e-30), scale).astype(np.float32)
        return NBits(q, scale, None, bits, w.shape[1])
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    scale = ((hi - lo) / top).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    zp = np.clip(np.round(-lo * inv), 0, top).astype(np.uint8)
    q = np.clip(np.round(x * inv[..., None]) + zp[..., None], 0, top).astype(np.uint8)
    return NBits(q, scale, zp, bits, w.shape[1])
