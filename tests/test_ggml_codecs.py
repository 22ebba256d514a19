"""lmforge.quant.ggml against llama.cpp's own quantizer and dequantizer (ctypes, tests/ggml_ref.py)
and gguf-py's decoders, on real weights of the default model and on edge-case blocks."""

from __future__ import annotations

import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from lmforge.quant import ggml
from tests import ggml_ref

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZED = LEGACY + KQUANTS
# a few real tensors of each shape family; embed is cut to its first rows to stay fast
SAMPLE = {"layers.0.q": None, "layers.7.down": None, "layers.15.k": None, "layers.29.up": None, "embed": 2048}


@pytest.fixture(scope="module")
def weights(default_model_path) -> dict[str, np.ndarray]:
    """{name: (rows, 576 or 1536) float32} dequantized from the default GGUF."""
    from lmforge.checkpoint import open_checkpoint

    ckpt = open_checkpoint(default_model_path)
    return {name: np.ascontiguousarray(ckpt.read(name)[:rows]) for name, rows in SAMPLE.items()}


def rows_for(x: np.ndarray, qtype) -> np.ndarray:
    """Rows of 576 hold no whole super-block: K-quants get the flat data in rows of 256."""
    if qtype in KQUANTS:
        flat = x.reshape(-1)
        return flat[: flat.size // 256 * 256].reshape(-1, 256)
    return x


def edge_blocks() -> dict[str, np.ndarray]:
    """Blocks of 256 values that exercise the corners of the reference quantizers."""
    rng = np.random.default_rng(7)
    normal = lambda scale=1.0: (rng.standard_normal(256) * scale).astype(np.float32)  # noqa: E731
    cases = {
        "all_zero": np.zeros(256, np.float32),
        "negative_zero": np.full(256, -0.0, np.float32),
        "constant": np.full(256, 0.37, np.float32),
        "negative_constant": np.full(256, -1.25, np.float32),
        "negative_only": -np.abs(normal()) - 0.01,
        "positive_only": np.abs(normal()) + 0.5,
        "tiny": normal(1e-9),  # scales underflow float16
        "huge": normal(3e5),  # scales overflow float16
        "integers": rng.integers(-8, 8, 256).astype(np.float32),
        "half_ties": (rng.integers(-16, 16, 256) + 0.5).astype(np.float32),
    }
    outlier = normal(0.01)
    outlier[77] = 40.0
    cases["huge_outlier"] = outlier
    negative_outlier = normal(0.01)
    negative_outlier[200] = -1000.0
    cases["huge_negative_outlier"] = negative_outlier
    one_hot = np.zeros(256, np.float32)
    one_hot[5] = 1.0
    cases["one_hot"] = one_hot
    mixed = normal()
    mixed[:32], mixed[64:96] = 0.0, 5.0  # a zero sub-block and a constant one
    cases["mixed_sub_blocks"] = mixed
    return cases


# ---------------------------------------------------------------------------------------------
# layout: our bytes decode like llama.cpp's, and llama.cpp's bytes decode like ours
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QUANTIZED + [T.F16, T.BF16], ids=lambda t: t.name)
def test_layout_matches_gguf_and_llamacpp(qtype, weights):
    x = rows_for(weights["layers.0.q"], qtype)
    ours, theirs = ggml.quantize(x, qtype), ggml_ref.quantize(x, qtype)
    assert ours.shape == theirs.shape
    for q in (ours, theirs):
        y = ggml.dequantize(q, qtype, x.shape)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_array_equal(y, gguf.quants.dequantize(q, qtype).reshape(x.shape))
        np.testing.assert_array_equal(y, ggml_ref.dequantize(q, qtype, x.shape[1]))


def test_f32_round_trip(weights):
    x = weights["layers.15.k"]
    q = ggml.quantize(x, T.F32)
    assert q.dtype == np.uint8 and q.shape == (x.shape[0], x.shape[1] * 4)
    np.testing.assert_array_equal(ggml.dequantize(q, "F32", x.shape), x)


# ---------------------------------------------------------------------------------------------
# accuracy against llama.cpp's quantizer on real weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_blocks_match_llamacpp(qtype, weights):
    for name, x in weights.items():
        c = ggml_ref.compare(x, ggml.quantize(x, qtype), ggml_ref.quantize(x, qtype), qtype)
        assert c.identical / c.n_blocks >= 0.999, (name, c)
        assert c.worst_steps <= 1.0, (name, c)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_kquant_rmse_within_1pct_of_llamacpp(qtype, weights):
    for name, w in weights.items():
        x = rows_for(w, qtype)
        c = ggml_ref.compare(x, ggml.quantize(x, qtype), ggml_ref.quantize(x, qtype), qtype)
        assert c.rmse_ours <= 1.01 * c.rmse_ref, (name, c)


@pytest.mark.parametrize("qtype", QUANTIZED + [T.F16, T.BF16], ids=lambda t: t.name)
def test_edge_blocks_match_llamacpp(qtype):
    cases = edge_blocks()
    x = np.stack(list(cases.values()))  # (n_cases, 256)
    ours, theirs = ggml.quantize(x, qtype), ggml_ref.quantize(x, qtype)
    different = [name for name, a, b in zip(cases, ours, theirs) if not np.array_equal(a, b)]
    assert not different, f"{qtype.name}: bytes differ from llama.cpp for {different}"


# ---------------------------------------------------------------------------------------------
# whole-tensor API
# ---------------------------------------------------------------------------------------------


def test_slabs_do_not_change_bytes(weights, monkeypatch):
    x = weights["layers.7.down"]  # (576, 1536): many slabs of 1,024 values
    whole = {t: ggml.quantize(rows_for(x, t), t) for t in (T.Q4_1, T.Q6_K)}
    monkeypatch.setattr(ggml, "SLAB_VALUES", 1024)
    for t, q in whole.items():
        np.testing.assert_array_equal(ggml.quantize(rows_for(x, t), t), q)
        np.testing.assert_array_equal(
            ggml.dequantize(q, t, rows_for(x, t).shape), gguf.quants.dequantize(q, t).reshape(rows_for(x, t).shape)
        )


def test_memory_stays_bounded():
    x = np.random.default_rng(0).standard_normal((1024, 8192)).astype(np.float32)  # 32 MiB
    tracemalloc.start()
    try:
        q = ggml.quantize(x, T.Q4_K)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # output (4.5 MiB) plus slab temporaries; whole-tensor temporaries would take hundreds of MiB
    assert peak < q.nbytes + 32 * 2**20, peak


def test_user_errors():
    with pytest.raises(ggml.QuantizationError, match="blocks of 256"):
        ggml.quantize(np.zeros((2, 576), np.float32), T.Q4_K)
    with pytest.raises(ggml.QuantizationError, match="2-D"):
        ggml.quantize(np.zeros(64, np.float32), T.Q8_0)
    with pytest.raises(ggml.QuantizationError, match="no codec"):
        ggml.quantize(np.zeros((1, 256), np.float32), T.IQ2_XXS)
    with pytest.raises(ggml.QuantizationError, match="no codec"):
        ggml.dequantize(np.zeros((1, 18), np.uint8), "Q4_00", (1, 32))
    q = ggml.quantize(np.ones((2, 64), np.float32), "Q8_0")
    with pytest.raises(ggml.QuantizationError, match="cannot hold"):
        ggml.dequantize(q, "Q8_0", (1, 64))
    with pytest.raises(ggml.QuantizationError, match="cannot hold"):
        ggml.dequantize(q, "Q4_K", (2, 64))
