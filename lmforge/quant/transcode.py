"""Exact transcoding of GGUF quantized blocks into MatMulNBits codes.

- Q4_0 (d, 32 x 4-bit, value = (q - 8) d): 4-bit codes, block 32, implicit zero point 8: the
  dequantized weights are bit-identical.
- Q8_0 (d, 32 x int8): 8-bit codes q + 128, implicit zero point 128: bit-identical.
- Q4_1 (d, m, value = q d + m) and Q4_K (super-blocks of 8 x 32 with 6-bit scales and mins,
  value = (d sc) q - dmin m): 4-bit codes, block 32, implicit zero point 8, scale d (or d sc)
  and a per-block offset m + 8 d (or -dmin m + 8 d sc) that the graph adds (see NBits): equal
  to gguf-py's dequantization up to float32 rounding of the offset.
"""

from __future__ import annotations

import numpy as np

from lmforge.quant.nbits import NBits

EXACT_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")


def _f16(col: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(col).view(np.float16).astype(np.float32)[..., 0]


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-value layout: byte j holds value j (low nibble) and value j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _centered(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, k: int) -> NBits:
    """value = q scale + offset as (q - 8) scale + (offset + 8 scale): the integer part stays
    centred, which keeps int8-activation kernels (accuracy_level 4) as accurate as for RTN."""
    return NBits(q, scale, None, 4, k, offsets=(offset + 8 * scale).astype(np.float32))


def transcode(qtype: str, blocks: np.ndarray, shape: tuple[int, int]) -> NBits:
    """GGUF rows `blocks` (N, bytes_per_row) of type `qtype` for a weight of `shape` (N, K)."""
    n, k = shape
    if qtype == "Q4_0":
        b = blocks.reshape(n, k // 32, 18)
        d = _f16(b[..., 0:2])
        q = _nibbles_split(b[..., 2:])
        return NBits(q.astype(np.uint8), d, None, 4, k)
    if qtype == "Q8_0":
        b = blocks.reshape(n, k // 32, 34)
        d = _f16(b[..., 0:2])
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return NBits(q, d, None, 8, k)
    if qtype == "Q4_1":
        b = blocks.reshape(n, k // 32, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        q = _nibbles_split(b[..., 4:]).astype(np.uint8)
        return _centered(q, d, m, k)
    if qtype == "Q4_K":
        b = blocks.reshape(n, k // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc_raw = b[..., 4:16].reshape(n, -1, 3, 4)
        lo, mid, hi = sc_raw[..., 0, :], sc_raw[..., 1, :], sc_raw[..., 2, :]
        sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)  # (n, sb, 8)
        mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1).astype(np.float32)
        qs = b[..., 16:].reshape(n, -1, 4, 32)  # 4 chunks of 64 values
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 8, 32)  # (n, sb, 8 sub-blocks, 32)
        scale = (d[..., None] * sc).astype(np.float32).reshape(n, -1)  # d * sc, exact in float32
        offset = -(dmin[..., None] * mn).astype(np.float32).reshape(n, -1)  # value = q * scale + offset
        q = q.reshape(n, -1, 32).astype(np.uint8)
        return _centered(q, scale, offset, k)
    raise ValueError(f"no exact transcoding for {qtype}")
