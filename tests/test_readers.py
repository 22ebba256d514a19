"""HF and GGUF readers against transformers' weights and against each other."""

import dataclasses
import math

import numpy as np
import pytest

from lmforge.checkpoint import open_checkpoint
from lmforge.checkpoint.hf import HFCheckpoint
from tests import gguf_ref, tiny


@pytest.fixture(scope="session")
def reference(tiny_case):
    return tiny.reference_state_dict(tiny_case[1])


def test_hf_reader_equals_transformers(tiny_case, reference):
    (arch, dtype, sharded, variant), folder = tiny_case
    ckpt = open_checkpoint(folder)
    assert isinstance(ckpt, HFCheckpoint)
    seen = set()
    for name, arr in ckpt.tensors():
        src = ckpt.arch.source_name(name, "hf")
        np.testing.assert_array_equal(arr.astype(np.float32), reference[src], err_msg=name)
        seen.add(src)
    # every weight transformers holds is in the stream (a tied head only once)
    expected = {k for k in reference if not (ckpt.spec.tied_embeddings and k == "lm_head.weight")}
    assert seen == expected


def _floats_close(a, b):
    return math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b


def test_gguf_spec_and_tensors_match_hf(tiny_case, reference, tmp_path):
    (arch, dtype, sharded, variant), folder = tiny_case
    path = gguf_ref.write(folder, tmp_path / "model.gguf")
    hf, gg = open_checkpoint(folder), open_checkpoint(path)
    a, b = hf.spec, gg.spec
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "rope_scaling" and x is not None:
            for g in dataclasses.fields(x):
                u, v = getattr(x, g.name), getattr(y, g.name)
                if isinstance(u, tuple):
                    np.testing.assert_allclose(u, v, rtol=1e-6, err_msg=g.name)
                else:
                    assert _floats_close(u, v), (g.name, u, v)
        else:
            assert _floats_close(x, y), (f.name, x, y)
    assert {t.name for t in gg.infos} == {t.name for t in hf.infos}
    for name, arr in gg.tensors():
        ref = reference[hf.arch.source_name(name, "hf")]
        if arch == "gemma3" and name.endswith("norm"):
            # llama.cpp stores 1 + w in f32; w comes back within float32 rounding at 1.0
            np.testing.assert_allclose(arr, ref, rtol=0, atol=2**-23, err_msg=name)
        else:
            np.testing.assert_array_equal(arr, ref, err_msg=name)


def test_llama3_rope_scaling_from_config(tiny_factory):
    folder = tiny_factory(("llama", "float32", False, "llama3"))
    s = open_checkpoint(folder).spec.rope_scaling
    assert (s.kind, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_context_length) == (
        "llama3",
        8.0,
        1.0,
        4.0,
        64,
    )


def test_phi3_longrope_partial_rotary(tiny_factory):
    folder = tiny_factory(("phi3", "float32", False, "longrope"))
    spec = open_checkpoint(folder).spec
    assert spec.partial_rotary_factor == 0.5 and spec.rotary_dim == 16
    s = spec.rope_scaling
    assert s.kind == "longrope" and len(s.short_factor) == spec.rotary_dim // 2
    assert s.factor == 4.0 and s.original_context_length == 64
    assert math.isclose(s.attention_factor, math.sqrt(1 + math.log(4) / math.log(64)))


def test_gemma3_layer_types_and_extras(tiny_factory):
    spec = open_checkpoint(tiny_factory(("gemma3", "float32", False, None))).spec
    assert spec.layer_types == ("sliding", "full")
    assert spec.rope_local_theta == 10000.0 and spec.rope_theta == 1000000.0
    assert spec.qk_norm and spec.post_norms and spec.norm_offset == 1.0 and spec.activation == "gelu_tanh"
    assert spec.embedding_scale == 8.0  # sqrt(64)


def test_default_model_raw_blocks_dequantize_to_stream(default_model_path):
    """Raw Q4_1/Q8_0 blocks (rows un-permuted) decode to exactly what the float stream gives."""
    import gguf

    ckpt = open_checkpoint(default_model_path)
    for name in ("layers.0.q", "layers.0.k", "layers.0.v", "embed", "layers.3.down"):
        raw = ckpt.read_raw(name)
        qtype = gguf.GGMLQuantizationType[raw.qtype]
        deq = gguf.quants.dequantize(raw.blocks, qtype).reshape(raw.shape)
        np.testing.assert_array_equal(deq, ckpt.read(name), err_msg=name)
    assert ckpt.read_raw("layers.0.q").qtype == "Q4_1"


def test_unpermute_inverts_llamacpp_permute():
    from lmforge.arch.common import permute_qk, unpermute_qk

    w = np.random.default_rng(0).standard_normal((4 * 16, 8)).astype(np.float32)
    for heads in (1, 2, 4):
        p = gguf_ref.llamacpp_permute(w, heads, heads)
        np.testing.assert_array_equal(permute_qk(w, heads), p)
        np.testing.assert_array_equal(unpermute_qk(p, heads), w)
