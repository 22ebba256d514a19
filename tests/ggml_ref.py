"""llama.cpp's own block codecs through ctypes: the outside reference for `lmforge.quant.ggml`.

The ggml library shipped inside llama-cpp-python holds the reference quantizers
(`ggml_quantize_chunk` with no importance matrix runs `quantize_row_*_ref`) and the row
dequantizers; this module calls them on NumPy arrays.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_F32P = ctypes.POINTER(ctypes.c_float)


@functools.cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        _F32P,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        _F32P,
    ]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_commit.restype = ctypes.c_char_p
    return lib


def ggml_commit() -> str:
    """The ggml commit the shared library was built from."""
    return _lib().ggml_commit().decode()


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """llama.cpp's quantizer (no imatrix) on (rows, n_per_row) float32 -> (rows, row_bytes) uint8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n_per_row = x.shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert n_per_row % block_size == 0, (n_per_row, block_size)
    out = np.empty((rows, n_per_row // block_size * type_size), dtype=np.uint8)
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data_as(_F32P), out.ctypes.data, 0, rows, n_per_row, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def dequantize(q: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    """llama.cpp's `dequantize_row_*` on (rows, row_bytes) uint8 -> (rows, n_per_row) float32."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    floats = {GGMLQuantizationType.F16: "ggml_fp16_to_fp32_row", GGMLQuantizationType.BF16: "ggml_bf16_to_fp32_row"}
    name = floats.get(qtype) or f"dequantize_row_q{qtype.name[1:]}"  # e.g. dequantize_row_q4_K
    fn = getattr(_lib(), name)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, _F32P, ctypes.c_int64]
    out = np.empty((q.shape[0], n_per_row), dtype=np.float32)
    fn(q.ctypes.data, out.ctypes.data_as(_F32P), out.size)
    return out


def step_sizes(q: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The quantization step of every value in llama.cpp's blocks `q`, (n_blocks, block_size)
    float32: |d| for blocks of 32, |d * sc| of the value's sub-block for K-quants, the spacing
    of the stored value for F16 / BF16."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    b = np.ascontiguousarray(q).reshape(-1, type_size)
    f16 = lambda c: np.ascontiguousarray(c).view("<f2").astype(np.float32)  # noqa: E731
    T = GGMLQuantizationType
    if qtype == T.F16:
        return np.spacing(b.view("<f2")).astype(np.float32)
    if qtype == T.BF16:
        # bfloat16 keeps 7 of float32's 23 mantissa bits: its spacing is 2**16 float32 spacings
        return np.spacing((b.view("<u2").astype(np.uint32) << 16).view(np.float32)) * np.float32(2**16)
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        return np.broadcast_to(np.abs(f16(b[:, :2])), (b.shape[0], block_size))
    if qtype in (T.Q4_K, T.Q5_K):
        d, s = f16(b[:, :2]), b[:, 4:16]
        sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
        return np.repeat(np.abs(d * sc), 32, axis=1)
    if qtype == T.Q6_K:
        d, sc = f16(b[:, 208:210]), b[:, 192:208].view(np.int8).astype(np.float32)
        return np.repeat(np.abs(d * sc), 16, axis=1)
    raise ValueError(f"no step size for {qtype.name}")


@dataclass
class Comparison:
    """Our encoding of a tensor beside llama.cpp's."""

    n_blocks: int
    identical: int  # blocks whose bytes are equal
    worst_steps: float  # largest |ours - llama.cpp| of a dequantized value, in llama.cpp's steps
    rmse_ours: float
    rmse_ref: float


def compare(x: np.ndarray, ours: np.ndarray, theirs: np.ndarray, qtype: GGMLQuantizationType) -> Comparison:
    """Compare two encodings (rows, row_bytes) of the same float32 rows `x` (rows, n_per_row)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    a, b = ours.reshape(-1, type_size), theirs.reshape(-1, type_size)
    same = (a == b).all(axis=1)
    ya = dequantize(ours, qtype, x.shape[1])
    yb = dequantize(theirs, qtype, x.shape[1])
    worst = 0.0
    if not same.all():
        diff = np.abs(ya.reshape(-1, block_size)[~same] - yb.reshape(-1, block_size)[~same]).astype(np.float64)
        step = step_sizes(b[~same], qtype).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(diff == 0, 0.0, diff / step)
        worst = float(ratio.max())
    rmse = lambda y: float(np.sqrt(np.mean(np.square(y.astype(np.float64) - x))))  # noqa: E731
    return Comparison(int(a.shape[0]), int(same.sum()), worst, rmse(ya), rmse(yb))
