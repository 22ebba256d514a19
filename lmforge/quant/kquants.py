"""K-quant super-block encoders and decoders (Q4_K, Q5_K, Q6_K) in vectorised NumPy.

The encoders follow llama.cpp's reference quantizers, the ones it runs when no importance
matrix is given (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c), down to float32 operation
order, so that they produce llama.cpp's bytes (every block of the default model's weights,
benchmarks/results/codec_accuracy.md); Q5_K's search uses C's own grid (rmin -0.5, 15 steps).

Two habits keep the float32 arithmetic in C's order:
- every sub-block is a column: values live in `(n, S)` arrays (n values per sub-block, S
  sub-blocks), and sums reduce over axis 0, which NumPy adds one row at a time, like the C
  loop (a reduction over the last axis would add pairwise and round differently);
- integers meet floats only as float32 (`l.astype(float32)`), never as int64/float64.

Block layouts (ggml-common.h), 256 values per super-block:
- block_q4_K (144 B): d f16, dmin f16, scales[12] (8 x 6-bit scale + 8 x 6-bit min), qs[128]
- block_q5_K (176 B): d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]
- block_q6_K (210 B): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round(v) in the low mantissa bits
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: the float magic-number trick, so round-half-to-even for
    |v| < 2**22 and the very same (meaningless) answer as C beyond. float32 in, int32 out."""
    return ((np.asarray(v, dtype=F32) + _MAGIC).view(np.int32) & 0x7FFFFF) - 0x400000


def _columns(blocks: np.ndarray, n: int) -> np.ndarray:
    """(n_blocks, 256) -> (n, n_blocks * 256 / n): one sub-block of n values per column."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 with round-to-nearest-even, as GGML_FP32_TO_FP16 (inf past 65504)."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16)


# ---------------------------------------------------------------------------------------------
# scale searches (make_qkx2_quants, make_qx_quants), vectorised over sub-blocks
# ---------------------------------------------------------------------------------------------


def make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted grid search for an affine code `x ~ scale * L - the_min`, L in [0, nmax].

    Args: x, w (n, S) float32 values and weights, one sub-block per column; the grid tries
    inverse scales (nmax + rmin + rdelta * step) / (max - min) for step 0..nstep.
    Returns: L (n, S) float32 codes, scale (S,), the_min (S,) (>= 0), as make_qkx2_quants.
    """
    mn = x.min(axis=0)
    mn = np.where(mn > 0, F32(0), mn)  # the offset never goes above zero
    mx = x.max(axis=0)
    flat = mx == mn
    sum_w = w.sum(axis=0)
    sum_x = (w * x).sum(axis=0)
    with np.errstate(all="ignore"):  # inf/nan where C gets them too; masked below
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
        best = (w * np.square(scale * L + mn - x)).sum(axis=0)
        for step in range(nstep + 1):
            # C reads the running best min here, so later steps search around it
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            l = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
            wl = w * l
            sum_l, sum_l2, sum_xl = wl.sum(axis=0), (wl * l).sum(axis=0), (wl * x).sum(axis=0)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            err = (w * np.square(this_scale * l + this_min - x)).sum(axis=0)
            better = (D > 0) & (err < best)
            L = np.where(better, l, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L[:, flat] = 0
    scale = np.where(flat, F32(0), scale)
    return L, scale, -mn


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric code `x ~ scale * (L - nmax)`, L in [0, 2 nmax), weighted by x^2 (rmse_type 1).

    Args: x (n, S) float32, one sub-block per column. Returns: L (n, S) float32, scale (S,)
    (negative when the largest-magnitude value is positive, as in make_qx_quants).
    """
    ax = np.abs(x)
    mx = np.take_along_axis(x, ax.argmax(axis=0)[None], axis=0)[0]  # first value of largest |x|
    zero = ax.max(axis=0) < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def trial(iscale):
        l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        return l, (wx * l).sum(axis=0), ((w * l) * l).sum(axis=0)

    with np.errstate(all="ignore"):  # inf/nan where C gets them too; masked below
        L, sumlx, suml2 = trial(F32(-nmax) / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L += F32(nmax)
    L[:, zero] = 0
    return L, np.where(zero, F32(0), scale)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins
# ---------------------------------------------------------------------------------------------


def _quantize_qkx(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared half of quantize_row_q4_K_ref / q5_K_ref.

    Returns: head (n_blocks, 16) uint8 (d, dmin, scales[12]) and L (n_blocks, 256) uint8 codes
    in value order.
    """
    nb = blocks.shape[0]
    x = _columns(blocks, 32)  # (32, nb*8)
    av_x = np.sqrt(np.square(x).sum(axis=0) / F32(32))
    w = av_x + np.abs(x)  # no imatrix: favour large values
    L, scales, mins = make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # C stores nearest_int into a uint8_t before MIN(63, .): keep the wrap-around
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)  # (nb, 8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d, dmin = _f16(max_scale / F32(63)), _f16(max_min / F32(63))
    # requantize against the scales as stored; a sub-block whose scale rounds to 0 keeps its codes
    dl = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(-1)  # (nb*8,)
    ml = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(-1)
    with np.errstate(all="ignore"):
        l = np.clip(nearest_int((x + ml) / dl), 0, nmax).astype(F32)
    L = np.where(dl != 0, l, L).astype(np.uint8).T.reshape(nb, QK_K)
    head = np.empty((nb, 16), dtype=np.uint8)
    head[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    head[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
    head[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)  # get_scale_min_k4's layout
    head[:, 8:12] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    head[:, 12:16] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return head, L


def _scale_min_k4(head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_blocks, 16) d/dmin/scales -> per-sub-block scale d*sc and offset dmin*m, (n_blocks, 8, 1)."""
    d = head[:, 0:2].copy().view("<f2").astype(F32)
    dmin = head[:, 2:4].copy().view("<f2").astype(F32)
    s = head[:, 4:16]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return (d * sc.astype(F32))[..., None], (dmin * m.astype(F32))[..., None]


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: (n_blocks, 256) float32 -> (n_blocks, 144) uint8."""
    head, L = _quantize_qkx(blocks, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)  # 4 chunks of 64: low nibbles, then high
    return np.concatenate([head, (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def q4_k_codes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_blocks, 144) uint8 -> codes (n_blocks, 8, 32) uint8 in [0, 15], and each sub-block's
    scale d*sc and offset dmin*m (n_blocks, 8, 1): value = scale * code - offset."""
    dl, ml = _scale_min_k4(q)
    qs = q[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[:, None]
    return (qs & 0xF).reshape(-1, 8, 32), dl, ml


def dequantize_q4_k(q: np.ndarray) -> np.ndarray:
    """dequantize_row_q4_K: (n_blocks, 144) uint8 -> (n_blocks, 256) float32."""
    codes, dl, ml = q4_k_codes(q)
    return (dl * codes.astype(F32) - ml).reshape(-1, QK_K)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: (n_blocks, 256) float32 -> (n_blocks, 176) uint8."""
    head, L = _quantize_qkx(blocks, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 8, 32)  # sub-block j = 2 * chunk + half
    qh = np.bitwise_or.reduce((L >> 4) << np.arange(8, dtype=np.uint8)[:, None], axis=1)  # bit j
    L = (L & 0xF).reshape(-1, 4, 2, 32)
    return np.concatenate([head, qh, (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def q5_k_codes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_blocks, 176) uint8 -> codes (n_blocks, 8, 32) uint8 in [0, 31], scales d*sc and
    offsets dmin*m (n_blocks, 8, 1): value = scale * code - offset."""
    dl, ml = _scale_min_k4(q)
    qh = (q[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (nb, 8, 32)
    ql = (q[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[:, None]) & 0xF
    return ql.reshape(-1, 8, 32) | (qh << 4), dl, ml


def dequantize_q5_k(q: np.ndarray) -> np.ndarray:
    """dequantize_row_q5_K: (n_blocks, 176) uint8 -> (n_blocks, 256) float32."""
    codes, dl, ml = q5_k_codes(q)
    return (dl * codes.astype(F32) - ml).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------
# Q6_K: 16 sub-blocks of 16 with int8 scales
# ---------------------------------------------------------------------------------------------


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: (n_blocks, 256) float32 -> (n_blocks, 210) uint8."""
    nb = blocks.shape[0]
    x = _columns(blocks, 16)  # (16, nb*16)
    L, scales = make_qx_quants(x, 32)
    scales = scales.reshape(nb, 16)
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d = _f16(F32(1) / iscale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)  # (nb, 16)
        dl = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
        l = np.clip(nearest_int(x / dl), -32, 31).astype(F32) + F32(32)
    L = np.where(dl != 0, l, L).astype(np.uint8).T.reshape(nb, 2, 4, 32)  # (half, quarter, 32)
    ql = (L[:, :, 0:2] & 0xF) | ((L[:, :, 2:4] & 0xF) << 4)  # (nb, 2, 2, 32)
    qh = np.bitwise_or.reduce((L >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[:, None], axis=2)
    out = np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1
    )
    out[zero] = 0  # C zeroes a block with no scale
    return out


def q6_k_codes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_blocks, 210) uint8 -> codes (n_blocks, 16, 16) uint8 in [0, 63] and each sub-block's
    scale d*sc (n_blocks, 16, 1), exact in float32: value = scale * (code - 32)."""
    nb = q.shape[0]
    ql = q[:, :128].reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8)[:, None]
    ql = (ql & 0xF).reshape(nb, 2, 4, 32)
    qh = (q[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    codes = (ql | (qh << 4)).reshape(nb, 16, 16)  # (nb, 2, 4, 32) in value order
    sc = q[:, 192:208].view(np.int8).astype(F32)
    d = q[:, 208:210].copy().view("<f2").astype(F32)
    return codes, (d * sc).reshape(nb, 16, 1)


def dequantize_q6_k(q: np.ndarray) -> np.ndarray:
    """dequantize_row_q6_K: (n_blocks, 210) uint8 -> (n_blocks, 256) float32."""
    codes, dl = q6_k_codes(q)
    return (dl * (codes.astype(F32) - F32(32))).reshape(-1, QK_K)


# Q2_K and Q3_K are read only (transcoding GGUF files llama.cpp wrote); lmforge writes neither.
_SHIFT_2 = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1, 1)  # 4 crumbs of a byte


def q2_k_codes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """block_q2_K (84 B: scales[16] 4-bit scale | 4-bit min, qs[64], d f16, dmin f16) ->
    codes (n_blocks, 16, 16) uint8 in [0, 3], each sub-block's scale d*sc and offset dmin*m
    (n_blocks, 16, 1): value = scale * code - offset (dequantize_row_q2_K)."""
    nb = q.shape[0]
    codes = (q[:, 16:80].reshape(nb, 2, 1, 2, 16) >> _SHIFT_2) & 3  # (half of 128, crumb, 16-run, value)
    d = q[:, 80:82].copy().view("<f2").astype(F32)
    dmin = q[:, 82:84].copy().view("<f2").astype(F32)
    sc = q[:, :16]
    return codes.reshape(nb, 16, 16), (d * (sc & 0xF).astype(F32))[..., None], (dmin * (sc >> 4).astype(F32))[..., None]


def q3_k_codes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """block_q3_K (110 B: hmask[32] 3rd bits, qs[64] low 2 bits, scales[12] 16 x 6-bit, d f16) ->
    codes (n_blocks, 16, 16) uint8 in [0, 7] and each sub-block's scale d*(sc - 32)
    (n_blocks, 16, 1): value = scale * (code - 4) (dequantize_row_q3_K)."""
    nb = q.shape[0]
    low = (q[:, 32:96].reshape(nb, 2, 1, 2, 16) >> _SHIFT_2) & 3
    bit = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1, 1)  # hmask bit of (half, crumb)
    high = (q[:, 0:32].reshape(nb, 1, 1, 2, 16) >> bit) & 1
    codes = (low | (high << 2)).reshape(nb, 16, 16)
    s, k = q[:, 96:108], np.arange(16)
    lo4 = (s[:, k % 8] >> (4 * (k // 8)).astype(np.uint8)) & 0xF
    hi2 = (s[:, 8 + k % 4] >> (2 * (k // 4)).astype(np.uint8)) & 3
    sc = (lo4 | (hi2 << 4)).astype(F32) - F32(32)
    d = q[:, 108:110].copy().view("<f2").astype(F32)
    return codes, (d * sc)[..., None]
