"""GGML block codecs in vectorised NumPy: float32 <-> ggml's quantized blocks, byte for byte.

One small class per ggml type, each with `quantize_blocks` / `dequantize_blocks` on
`(n_blocks, block_size)` float32 <-> `(n_blocks, type_size)` uint8 arrays in the byte layout of
ggml's block structs (ggml-common.h), and `CODECS`, the table from `gguf.GGMLQuantizationType`
to codec. `quantize` / `dequantize` apply a codec to a whole tensor in bounded slabs.

The encoders reproduce llama.cpp's reference quantizers (the ones it runs without an
importance matrix: `quantize_row_*_ref` in ggml-quants.c) in float32, in C's operation order,
so they give llama.cpp's bytes; tests/test_ggml_codecs.py checks that against the C library.
K-quants (Q4_K, Q5_K, Q6_K) live in `lmforge.quant.kquants`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmforge.errors import LmforgeError
from lmforge.quant import kquants

_f32 = np.float32
SLAB_VALUES = 1 << 18  # values per slab: temporaries stay a few MB for any tensor size


class QuantizationError(LmforgeError, ValueError):
    """A tensor cannot be stored in the requested ggml type (shape or type not supported)."""


class BlockCodec:
    """A ggml block type: `block_size` values <-> `type_size` bytes. Subclasses name `qtype`."""

    qtype: GGMLQuantizationType
    block_size: int
    type_size: int

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]

    @classmethod
    def quantize_blocks(cls, x: np.ndarray) -> np.ndarray:
        """(n_blocks, block_size) float32 -> (n_blocks, type_size) uint8."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, q: np.ndarray) -> np.ndarray:
        """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n, 1) float32 -> (n, 2) uint8: GGML_FP32_TO_FP16 (round to nearest even), little-endian."""
    with np.errstate(over="ignore"):
        return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _f16_read(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32."""
    return np.ascontiguousarray(b).view("<f2").astype(_f32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`, elementwise."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, _f32(1) / d, _f32(0))


def _abs_max_signed(x: np.ndarray) -> np.ndarray:
    """(n, k) -> (n, 1): the first value of largest magnitude, with its sign; +0.0 for a block of
    zeros whatever their sign, as C's running max starts at +0.0 (it sets the sign of d)."""
    v = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    return np.where(v != 0, v, _f32(0))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16): byte j holds value j (low nibble) and value j + 16 (high)."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 -> (n, 32) uint8 codes, inverse of `_pack_nibbles`."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> (n, 4): the 5th bit of value j at bit j of a little-endian uint32."""
    return np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) uint8 -> (n, 32) uint8 with value 16 where the 5th bit is set."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def unpack_q5(q: np.ndarray, head: int) -> np.ndarray:
    """(n, head + 20) uint8 blocks of Q5_0 (head 2) or Q5_1 (head 4) -> (n, 32) 5-bit codes."""
    return _unpack_nibbles(q[:, head + 4 :]) | _unpack_high_bits(q[:, head : head + 4])


def _trunc_u8(v: np.ndarray) -> np.ndarray:
    """C's float -> int8/uint8 conversion of a non-negative value (truncates toward zero)."""
    return v.astype(np.int32).astype(np.uint8)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: half away from zero (np.rint would round half to even)."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= _f32(0.5), t + np.sign(v), t)


# ---------------------------------------------------------------------------------------------
# float types
# ---------------------------------------------------------------------------------------------


class F32(BlockCodec, qtype=GGMLQuantizationType.F32):
    """float32, stored as is."""

    @classmethod
    def quantize_blocks(cls, x):
        return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, q):
        return np.ascontiguousarray(q).view("<f4").astype(_f32)


class F16(BlockCodec, qtype=GGMLQuantizationType.F16):
    """IEEE half, round to nearest even (ggml_fp32_to_fp16_row)."""

    @classmethod
    def quantize_blocks(cls, x):
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(x.astype("<f2")).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, q):
        return np.ascontiguousarray(q).view("<f2").astype(_f32)


class BF16(BlockCodec, qtype=GGMLQuantizationType.BF16):
    """bfloat16: the top half of a float32, round to nearest even, NaN kept quiet
    (ggml_compute_fp32_to_bf16)."""

    @classmethod
    def quantize_blocks(cls, x):
        u = np.ascontiguousarray(x, dtype=_f32).view(np.uint32)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        h = np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)
        return h.astype("<u2").view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, q):
        h = np.ascontiguousarray(q).view("<u2").astype(np.uint32)
        return (h << 16).view(_f32)


# ---------------------------------------------------------------------------------------------
# legacy blocks of 32 (quantize_row_q{4_0,4_1,5_0,5_1,8_0}_ref)
# ---------------------------------------------------------------------------------------------


class Q8_0(BlockCodec, qtype=GGMLQuantizationType.Q8_0):
    """block_q8_0 (34 B): d f16, qs[32] int8; value = q d."""

    @classmethod
    def quantize_blocks(cls, x):
        d = np.abs(x).max(axis=1, keepdims=True) / _f32(127)
        q = _roundf(x * _inverse(d)).astype(np.int8)
        return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, q):
        return q[:, 2:].view(np.int8).astype(_f32) * _f16_read(q[:, :2])


class Q4_0(BlockCodec, qtype=GGMLQuantizationType.Q4_0):
    """block_q4_0 (18 B): d f16, qs[16]; value = (q - 8) d, d = -max/8 from the signed max."""

    @classmethod
    def quantize_blocks(cls, x):
        d = _abs_max_signed(x) / _f32(-8)
        q = np.minimum(_trunc_u8(x * _inverse(d) + _f32(8.5)), 15)
        return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, q):
        return (_unpack_nibbles(q[:, 2:]).astype(_f32) - _f32(8)) * _f16_read(q[:, :2])


class Q4_1(BlockCodec, qtype=GGMLQuantizationType.Q4_1):
    """block_q4_1 (20 B): d f16, m f16, qs[16]; value = q d + m."""

    @classmethod
    def quantize_blocks(cls, x):
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (hi - lo) / _f32(15)
        q = np.minimum(_trunc_u8((x - lo) * _inverse(d) + _f32(0.5)), 15)
        return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, q):
        return _unpack_nibbles(q[:, 4:]).astype(_f32) * _f16_read(q[:, :2]) + _f16_read(q[:, 2:4])


class Q5_0(BlockCodec, qtype=GGMLQuantizationType.Q5_0):
    """block_q5_0 (22 B): d f16, qh[4] (5th bits), qs[16]; value = (q - 16) d."""

    @classmethod
    def quantize_blocks(cls, x):
        d = _abs_max_signed(x) / _f32(-16)
        q = np.minimum(_trunc_u8(x * _inverse(d) + _f32(16.5)), 31)
        return np.concatenate([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, q):
        codes = unpack_q5(q, 2)
        return (codes.astype(_f32) - _f32(16)) * _f16_read(q[:, :2])


class Q5_1(BlockCodec, qtype=GGMLQuantizationType.Q5_1):
    """block_q5_1 (24 B): d f16, m f16, qh[4], qs[16]; value = q d + m."""

    @classmethod
    def quantize_blocks(cls, x):
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (hi - lo) / _f32(31)
        q = _trunc_u8((x - lo) * _inverse(d) + _f32(0.5))  # C has no MIN(31, .) here
        return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, q):
        codes = unpack_q5(q, 4)
        return codes.astype(_f32) * _f16_read(q[:, :2]) + _f16_read(q[:, 2:4])


# ---------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256 (algorithms in kquants.py)
# ---------------------------------------------------------------------------------------------


class Q4_K(BlockCodec, qtype=GGMLQuantizationType.Q4_K):
    """block_q4_K (144 B): 8 x 32 values, 6-bit scales and mins; value = d sc q - dmin m."""

    quantize_blocks = staticmethod(kquants.quantize_q4_k)
    dequantize_blocks = staticmethod(kquants.dequantize_q4_k)


class Q5_K(BlockCodec, qtype=GGMLQuantizationType.Q5_K):
    """block_q5_K (176 B): as Q4_K with a 5th bit per value in qh."""

    quantize_blocks = staticmethod(kquants.quantize_q5_k)
    dequantize_blocks = staticmethod(kquants.dequantize_q5_k)


class Q6_K(BlockCodec, qtype=GGMLQuantizationType.Q6_K):
    """block_q6_K (210 B): 16 x 16 values, int8 scales; value = d sc (q - 32)."""

    quantize_blocks = staticmethod(kquants.quantize_q6_k)
    dequantize_blocks = staticmethod(kquants.dequantize_q6_k)


CODECS: dict[GGMLQuantizationType, type[BlockCodec]] = {
    c.qtype: c for c in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
}


# ---------------------------------------------------------------------------------------------
# whole tensors
# ---------------------------------------------------------------------------------------------


def _codec(qtype) -> type[BlockCodec]:
    """The codec for a `GGMLQuantizationType`, its value or its name ("Q4_K")."""
    try:
        qtype = GGMLQuantizationType[qtype] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
        return CODECS[qtype]
    except (KeyError, ValueError):
        name = getattr(qtype, "name", qtype)
        raise QuantizationError(
            f"ggml type {name!r} has no codec in lmforge; choose one of {', '.join(t.name for t in CODECS)}"
        ) from None


def quantize(tensor: np.ndarray, qtype) -> np.ndarray:
    """Quantize a tensor row by row, as llama.cpp lays out a GGUF tensor.

    Args: tensor (rows, n_per_row), any float dtype; qtype a `GGMLQuantizationType` or its name.
    Returns: (rows, n_per_row // block_size * type_size) uint8.
    Raises: QuantizationError when n_per_row is not a multiple of the type's block size.
    """
    codec = _codec(qtype)
    if tensor.ndim != 2:
        raise QuantizationError(
            f"quantize expects a 2-D (rows, n_per_row) tensor, got shape {tensor.shape}; reshape it first"
        )
    rows, n_per_row = tensor.shape
    if n_per_row % codec.block_size:
        raise QuantizationError(
            f"rows of {n_per_row} values do not split into {codec.qtype.name} blocks of "
            f"{codec.block_size}; keep this tensor in F16/F32 or pick a type with smaller blocks"
        )
    out = np.empty((rows, n_per_row // codec.block_size * codec.type_size), dtype=np.uint8)
    blocks = tensor.reshape(-1, codec.block_size)  # (n_blocks, block_size), a view if contiguous
    out_blocks = out.reshape(-1, codec.type_size)
    step = max(1, SLAB_VALUES // codec.block_size)
    for b in range(0, blocks.shape[0], step):
        slab = np.ascontiguousarray(blocks[b : b + step], dtype=_f32)
        out_blocks[b : b + step] = codec.quantize_blocks(slab)
    return out


def dequantize(data: np.ndarray, qtype, shape) -> np.ndarray:
    """Decode ggml blocks back to float32.

    Args: data uint8 holding the blocks of a tensor (any shape, e.g. (rows, row_bytes));
    qtype a `GGMLQuantizationType` or its name; shape the float tensor's shape.
    Returns: float32 array of `shape`.
    """
    codec = _codec(qtype)
    n_values = int(np.prod(shape, dtype=np.int64))
    if data.nbytes != n_values // codec.block_size * codec.type_size or n_values % codec.block_size:
        raise QuantizationError(
            f"{data.nbytes} bytes of {codec.qtype.name} blocks cannot hold a tensor of shape "
            f"{tuple(shape)} ({n_values} values); check the type and shape"
        )
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, codec.type_size)
    out = np.empty((blocks.shape[0], codec.block_size), dtype=_f32)
    step = max(1, SLAB_VALUES // codec.block_size)
    for b in range(0, blocks.shape[0], step):
        out[b : b + step] = codec.dequantize_blocks(blocks[b : b + step])
    return out.reshape(shape)
