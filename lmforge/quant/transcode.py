"""Exact transcoding of GGUF quantized blocks into MatMulNBits codes.

Every ggml type with a linear dequantization, value = scale * (q - centre) [+ offset] per block,
becomes MatMulNBits codes at the type's own block size (32, or 16 for the sub-blocks of Q6_K,
Q3_K and Q2_K). ONNX Runtime's MatMulNBits takes 2, 4 or 8 bits, so 4-bit types keep 4-bit
codes, 5- and 6-bit types are stored as 8-bit codes and 2- and 3-bit K-quants as 4-bit codes
(the code shifted so that the type's centre sits at the implicit zero point, 8 or 128):

- Q4_0 (value = d (q - 8)), Q8_0 (d q), Q5_0 (d (q - 16)), Q6_K (d sc (q - 32)) and Q3_K
  (d (sc - 32) (q - 4)): codes, scale, implicit zero point. ONNX Runtime computes
  (q - zero point) * scale, the same single float32 product as ggml's: bit-identical weights.
- Q4_1 (value = d q + m), Q5_1, Q4_K, Q5_K and Q2_K (value = d sc q - dmin m): codes centred
  the same way, scale d (or d sc), and a per-block offset (m + centre d, or -dmin m + centre
  d sc) that the graph adds (see NBits): equal to ggml's dequantization up to the float32
  rounding of that offset.

Types without such a form (IQ*, ...) are dequantized and quantized again by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmforge.quant import kquants
from lmforge.quant.ggml import unpack_q5
from lmforge.quant.nbits import NBits


def _f16(col: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n,) float32."""
    return np.ascontiguousarray(col).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-value layout: byte j holds value j (low nibble) and value j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# Each decoder: (n_blocks, type_size) uint8 -> codes (n_blocks, sub-blocks, sub-block size) in
# [0, 2^source bits), scales and offsets (n_blocks, sub-blocks) with value = scale * code + offset
# (offset None: value = scale * (code - centre)). Table: type -> (decoder, source bits, NBits bits).
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _q4_0(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 2:])[:, None], _f16(b[:, 0:2])[:, None], None


def _q8_0(b: np.ndarray) -> Decoded:
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)[:, None], _f16(b[:, 0:2])[:, None], None


def _q5_0(b: np.ndarray) -> Decoded:
    return unpack_q5(b, 2)[:, None], _f16(b[:, 0:2])[:, None], None


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 4:])[:, None], _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q5_1(b: np.ndarray) -> Decoded:
    return unpack_q5(b, 4)[:, None], _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q4_k(b: np.ndarray) -> Decoded:
    codes, dl, ml = kquants.q4_k_codes(b)
    return codes, dl[..., 0], -ml[..., 0]


def _q5_k(b: np.ndarray) -> Decoded:
    codes, dl, ml = kquants.q5_k_codes(b)
    return codes, dl[..., 0], -ml[..., 0]


def _q2_k(b: np.ndarray) -> Decoded:
    codes, dl, ml = kquants.q2_k_codes(b)
    return codes, dl[..., 0], -ml[..., 0]


def _q3_k(b: np.ndarray) -> Decoded:
    codes, dl = kquants.q3_k_codes(b)
    return codes, dl[..., 0], None


def _q6_k(b: np.ndarray) -> Decoded:
    codes, dl = kquants.q6_k_codes(b)
    return codes, dl[..., 0], None


DECODERS: dict[str, tuple[Callable[[np.ndarray], Decoded], int, int]] = {
    "Q4_0": (_q4_0, 4, 4),
    "Q4_1": (_q4_1, 4, 4),
    "Q4_K": (_q4_k, 4, 4),
    "Q8_0": (_q8_0, 8, 8),
    "Q5_0": (_q5_0, 5, 8),
    "Q5_1": (_q5_1, 5, 8),
    "Q5_K": (_q5_k, 5, 8),
    "Q6_K": (_q6_k, 6, 8),
    "Q2_K": (_q2_k, 2, 4),
    "Q3_K": (_q3_k, 3, 4),
}
EXACT_TYPES = tuple(DECODERS)
BIT_IDENTICAL = ("Q4_0", "Q8_0", "Q5_0", "Q6_K", "Q3_K")  # no offset: ggml's very product


def bytes_per_weight(qtype: str) -> tuple[float, float]:
    """(GGUF bytes, transcoded MatMulNBits bytes incl. float32 scales and offsets) per weight."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    decoder, _, bits = DECODERS[qtype]
    codes, _, offset = decoder(np.zeros((1, size), np.uint8))
    sub = codes.shape[-1]
    return size / block, bits / 8 + (4 if offset is None else 8) / sub


def transcode(qtype: str, blocks: np.ndarray, shape: tuple[int, int]) -> NBits:
    """GGUF rows `blocks` (N, bytes_per_row) of type `qtype` for a weight of `shape` (N, K).

    Codes are centred: value = (code - 2^(bits-1)) scale [+ offset], with the source's centre
    (2^(source bits - 1)) at the implicit zero point, which keeps int8-activation kernels
    (accuracy_level 4) as accurate as for RTN."""
    if qtype not in DECODERS:
        raise ValueError(f"no exact transcoding for {qtype}")
    n, k = shape
    decoder, src_bits, bits = DECODERS[qtype]
    size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    codes, scale, offset = decoder(np.ascontiguousarray(blocks).reshape(-1, size))
    sub = codes.shape[-1]
    centre, shift = 2 ** (src_bits - 1), 2 ** (bits - 1) - 2 ** (src_bits - 1)
    q = codes.reshape(n, k // sub, sub)
    if shift:
        q = q + np.uint8(shift)
    scale = scale.reshape(n, -1).astype(np.float32)
    if offset is not None:
        offset = (offset.reshape(n, -1) + np.float32(centre) * scale).astype(np.float32)
    return NBits(q.astype(np.uint8, copy=False), scale, None, bits, k, offsets=offset)
