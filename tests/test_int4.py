"""int4: RTN codes against ONNX Runtime and gguf-py, exact GGUF transcoding against llama.cpp's own
quantizer, int4 graphs against fp32, AWQ folding, targets and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmforge.checkpoint import open_checkpoint
from lmforge.export.convert import convert
from lmforge.quant.nbits import rtn
from lmforge.quant.transcode import BIT_IDENTICAL, EXACT_TYPES, transcode
from lmforge.runtime.ort import OrtEngine
from tests import gguf_ref
from tests.test_errors import assert_user_error, run_cli
from tests.test_onnx_parity import prompt_ids, rel_err


def ort_dequantize(nb) -> np.ndarray:
    """W as ONNX Runtime's MatMulNBits computes it: the op applied to the identity matrix."""
    import onnxruntime as ort

    inits = [numpy_helper.from_array(nb.packed_b(), "B"), numpy_helper.from_array(nb.scales, "S")]
    inputs = ["A", "B", "S"]
    if nb.packed_zero_points() is not None:
        inits.append(numpy_helper.from_array(nb.packed_zero_points(), "Z"))
        inputs.append("Z")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["Y"],
        domain="com.microsoft",
        K=nb.K,
        N=nb.N,
        bits=nb.bits,
        block_size=nb.block_size,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "t",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, nb.K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, nb.N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"A": np.eye(nb.K, dtype=np.float32)})[0].T
    if nb.offsets is not None:
        y = y + np.repeat(nb.offsets, nb.block_size, axis=1)[:, : nb.K]
    return y


@pytest.mark.parametrize(
    "bits,block,symmetric,k",
    [
        (4, 32, True, 96),
        (4, 32, False, 96),
        (4, 128, True, 576),
        (4, 16, False, 40),
        (8, 32, True, 64),
        (4, 256, False, 512),
    ],
)
def test_rtn_codes_are_what_onnxruntime_computes(bits, block, symmetric, k):
    w = np.random.default_rng(bits + block + k).standard_normal((48, k)).astype(np.float32)
    nb = rtn(w, bits, block, symmetric)
    np.testing.assert_array_equal(ort_dequantize(nb), nb.dequantize())
    assert rel_err(nb.dequantize(), w) < (0.12 if bits == 4 else 0.01)


def test_symmetric_rtn_is_ggml_q4_0():
    """The same codes as ggml's Q4_0 quantizer (gguf-py's port of it); the scales differ only in
    that ggml stores them as float16."""
    import gguf

    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    ggml = transcode("Q4_0", blocks, w.shape)
    ours = rtn(w, 4, 32, symmetric=True, fit_scale=False)
    np.testing.assert_array_equal(ours.q, ggml.q)
    np.testing.assert_array_equal(ours.scales.astype(np.float16).astype(np.float32), ggml.scales)
    fitted = rtn(w, 4, 32, symmetric=True)  # same codes, least-squares scales: never a larger error
    np.testing.assert_array_equal(fitted.q, ggml.q)
    err = lambda nb: ((nb.dequantize() - w) ** 2).reshape(64, -1, 32).sum(-1)  # noqa: E731
    assert (err(fitted) <= err(ours) * (1 + 1e-6) + 1e-12).all() and err(fitted).sum() < 0.97 * err(ours).sum()


LLAMACPP_FTYPES = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q2_K", "Q3_K_M")


@pytest.fixture(scope="module")
def llamacpp_ggufs(tiny_factory, default_model_path, tmp_path_factory):
    """A tiny llama with rows of 256 as F32 GGUF, and llama.cpp's own quantizations of it."""
    pytest.importorskip("llama_cpp")
    from lmforge.checkpoint.gguf import read_metadata
    from tests.llamacpp_ref import llamacpp_quantize

    folder = tiny_factory(("llama", "float32", False, "k256"))
    root = tmp_path_factory.mktemp("ggufs")
    vocab = gguf_ref.bpe_vocab_meta(read_metadata(default_model_path), "smollm")
    f32 = gguf_ref.write(folder, root / "f32.gguf", vocab=vocab)
    return {"F32": f32, **{t: llamacpp_quantize(f32, root / f"{t}.gguf", t) for t in LLAMACPP_FTYPES}}


@pytest.mark.parametrize("ftype", LLAMACPP_FTYPES)
def test_transcoding_reproduces_gguf_weights(ftype, llamacpp_ggufs):
    """MatMulNBits (run by ONNX Runtime) on the transcoded codes against gguf-py's dequantization
    of llama.cpp's blocks: bit-identical for the types without offsets, else within float32 rounding."""
    import gguf

    ckpt = open_checkpoint(llamacpp_ggufs[ftype])
    seen = set()
    for info in ckpt.infos:
        if info.dtype in ("F32", "F16"):
            continue
        assert info.dtype in EXACT_TYPES, info
        raw = ckpt.read_raw(info.name)
        ref = gguf.quants.dequantize(raw.blocks, gguf.GGMLQuantizationType[raw.qtype]).reshape(raw.shape)
        nb = transcode(raw.qtype, raw.blocks, raw.shape)
        ours = ort_dequantize(nb)
        if raw.qtype in BIT_IDENTICAL:
            np.testing.assert_array_equal(ours, ref, err_msg=info.name)
        else:
            assert rel_err(ours, ref) <= 1e-6, (info.name, rel_err(ours, ref))
        seen.add(raw.qtype)
    assert seen >= {ftype.split("_M")[0]}


def _logits_agree(int4: Path, fp32: Path, bound: float) -> None:
    """Prefill of 20 tokens and 4 greedy decode steps of both folders: logits within `bound`."""
    a, b = OrtEngine(int4), OrtEngine(fp32)
    ids = prompt_ids(20, a.vocab_size, 7)
    ca, cb = a.new_cache(1, 30), b.new_cache(1, 30)
    la, lb = a.prefill(ca, [ids])[0], b.prefill(cb, [ids])[0]
    for _ in range(4):
        assert rel_err(la, lb) <= bound
        t = int(lb.argmax())
        la, lb = a.decode(ca, [t])[0], b.decode(cb, [t])[0]


@pytest.mark.parametrize("ftype", LLAMACPP_FTYPES)
def test_transcoded_graph_equals_dequantized_graph(ftype, llamacpp_ggufs, tmp_path):
    """The int4 graph built from GGUF blocks (accuracy level 0: float activations) against the
    fp32 graph of the same dequantized weights: every tensor transcoded (the _M mixes' Q4_K beside
    Q6_K in one q/k/v group included), none quantized again, logits equal to float rounding."""
    src = llamacpp_ggufs[ftype]
    r = run_cli("convert", src, "-o", tmp_path / "int4", "--target", "cpu-int4", "--accuracy-level", "0")
    assert r.returncode == 0, r.stderr
    int4 = tmp_path / "int4"
    fp32 = convert(src, tmp_path / "fp32", target="cpu-fp32", progress=False)
    meta = json.loads((int4 / "lmforge.json").read_text())
    stored = {i.dtype for i in open_checkpoint(src).infos} - {"F32", "F16"}
    assert set(meta["transcoded"]) == stored and meta["requantized"] == []
    assert "no exact MatMulNBits form" not in r.stderr
    _logits_agree(int4, fp32, 1e-5)


def test_untied_embedding_with_offsets_is_gathered_from_its_blocks(tiny_factory, default_model_path, tmp_path):
    """An untied Q4_1 token embedding (per-block offsets) stays in its 4-bit blocks, read by
    GatherBlockQuantized plus the gathered offsets, and gives the dequantized weights' logits."""
    pytest.importorskip("llama_cpp")
    import onnx

    from lmforge.checkpoint.gguf import read_metadata
    from tests.llamacpp_ref import llamacpp_quantize

    folder = tiny_factory(("llama", "float32", False, None))
    vocab = gguf_ref.bpe_vocab_meta(read_metadata(default_model_path), "smollm")
    f32 = gguf_ref.write(folder, tmp_path / "f32.gguf", vocab=vocab)
    src = llamacpp_quantize(f32, tmp_path / "q4_1.gguf", "Q4_1")
    ckpt = open_checkpoint(src)
    assert not ckpt.spec.tied_embeddings and ckpt.read_raw("embed").qtype == "Q4_1"
    int4 = convert(src, tmp_path / "int4", target="cpu-int4", accuracy_level=0, progress=False)
    graph = onnx.load(int4 / "model.onnx", load_external_data=False).graph
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}
    assert "embed" not in {t.name for t in graph.initializer}  # no float table
    _logits_agree(int4, convert(src, tmp_path / "fp32", target="cpu-fp32", progress=False), 1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma3"])
def test_cpu_int4_stays_close_to_fp32(arch, tiny_factory, tmp_path):
    src = tiny_factory((arch, "float32", False, None))
    int4 = OrtEngine(convert(src, tmp_path / "int4", target="cpu-int4", progress=False))
    fp32 = OrtEngine(convert(src, tmp_path / "fp32", progress=False))
    ids = prompt_ids(24, fp32.vocab_size, 9)
    a, b = int4.prefill(int4.new_cache(1, 24), [ids])[0], fp32.prefill(fp32.new_cache(1, 24), [ids])[0]
    err = rel_err(a, b)
    print(f"{arch}: cpu-int4 vs cpu-fp32 relative logits error {err:.4f}")
    assert err < 0.25  # measured 0.03-0.08 (gemma3: 0.21; its 8-bit error is 0.02, so this is 4-bit noise)
    assert (tmp_path / "int4" / "model.onnx.data").stat().st_size < 0.5 * (
        tmp_path / "fp32" / "model.onnx.data"
    ).stat().st_size


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied head
def test_head_bits_4_makes_a_4_bit_head(arch, tiny_factory, tmp_path):
    """`--head-bits 4` (onnxruntime-genai's builder's choice): the head's MatMulNBits (and a tied
    embedding's GatherBlockQuantized) hold 4-bit codes; logits stay near fp32; the file shrinks."""
    import onnx

    src = tiny_factory((arch, "float32", False, None))
    r = run_cli("convert", src, "-o", tmp_path / "h4", "--target", "cpu-int4", "--head-bits", "4")
    assert r.returncode == 0, r.stderr
    h8 = convert(src, tmp_path / "h8", target="cpu-int4", progress=False)
    fp32 = OrtEngine(convert(src, tmp_path / "fp32", progress=False))

    def head_bits(folder):
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        n = max(
            (n for n in graph.node if n.op_type == "MatMulNBits"),
            key=lambda n: next(a.i for a in n.attribute if a.name == "N"),
        )  # the vocabulary-wide one
        return next(a.i for a in n.attribute if a.name == "bits")

    assert (head_bits(tmp_path / "h4"), head_bits(h8)) == (4, 8)
    assert (tmp_path / "h4" / "model.onnx.data").stat().st_size < (h8 / "model.onnx.data").stat().st_size
    h4 = OrtEngine(tmp_path / "h4")
    ids = prompt_ids(24, fp32.vocab_size, 9)
    a, b = h4.prefill(h4.new_cache(1, 24), [ids])[0], fp32.prefill(fp32.new_cache(1, 24), [ids])[0]
    assert rel_err(a, b) < 0.25


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3"])
def test_awq_scales_fold_without_changing_the_float_model(arch, tiny_factory, tmp_path):
    """AWQ's s and 1/s cancel: the fp32 graph with scales folded in equals the plain one, and the
    int4 graph with AWQ stays close to fp32."""
    import onnx

    from lmforge.export.awq import compute_awq_scales
    from lmforge.export.onnx import GraphOptions, build
    from lmforge.export.weights import QuantOptions, WeightSource

    src = tiny_factory((arch, "float32", False, None))
    ckpt = open_checkpoint(src)
    scales = compute_awq_scales(ckpt, QuantOptions("awq", 4, 32), n_windows=4, window=64)
    assert scales.col and all(np.isfinite(s).all() and (s > 0).all() for s in scales.col.values())
    assert any(not np.allclose(s, 1.0) for s in scales.col.values())
    folded = tmp_path / "folded"
    folded.mkdir()
    graphs = build(ckpt, folded, GraphOptions(), WeightSource(ckpt, None, scales))
    onnx.save_model(graphs["full"], folded / "model.onnx")
    plain = convert(src, tmp_path / "plain", progress=False)
    import onnxruntime as ort

    ids = np.array([prompt_ids(16, ckpt.spec.vocab_size, 3)])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in range(ckpt.spec.n_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, ckpt.spec.n_kv_heads, 0, ckpt.spec.head_dim), np.float32)
    a = ort.InferenceSession(str(folded / "model.onnx")).run(["logits"], feed)[0]
    b = ort.InferenceSession(str(plain / "model.genai.onnx")).run(["logits"], feed)[0]
    assert rel_err(a, b) <= 1e-5


def test_awq_search_prefers_scaling_salient_channels():
    """A few input channels with large activations: the chosen scales protect them and beat plain RTN."""
    from lmforge.export.weights import QuantOptions
    from lmforge.quant.awq import search_scale

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    x[:, :4] *= 30.0
    w = rng.standard_normal((64, 128)).astype(np.float32)
    s, err, base = search_scale(w, x, np.abs(x).mean(axis=0), QuantOptions("awq", 4, 32))
    assert err < 0.8 * base and s[:4].mean() > s[4:].mean()


def test_mobile_target_writes_an_ort_file(tiny_factory, tmp_path):
    import onnxruntime as ort

    out = convert(tiny_factory(("llama", "float32", False, None)), tmp_path / "m", target="mobile-int4", progress=False)
    ort_files = list(out.glob("*.ort"))
    assert len(ort_files) == 1
    sess = ort.InferenceSession(str(ort_files[0]))
    assert {o.name for o in sess.get_outputs()} >= {"logits", "present.0.key"}


def test_every_target_folder_has_genai_config_and_passes_the_checker(tiny_factory, tmp_path):
    import onnx

    from lmforge.export.targets import TARGETS

    src = tiny_factory(("llama", "float32", False, None))
    for name in ("cpu-fp32", "cpu-int4", "cuda-fp16", "cuda-int4"):
        out = convert(src, tmp_path / name, target=name, progress=False)
        for graph in ("model.onnx", "model.genai.onnx"):
            onnx.checker.check_model(str(out / graph))
        cfg = json.loads((out / "genai_config.json").read_text())
        options = cfg["model"]["decoder"]["session_options"]["provider_options"]
        assert (options == []) == (TARGETS[name].provider == "cpu")


@pytest.mark.parametrize("block", ["48", "8", "0"])
def test_bad_block_size(block, tiny_factory, tmp_path):
    r = run_cli(
        "convert",
        tiny_factory(("llama", "float32", False, None)),
        "-o",
        tmp_path / "o",
        "--target",
        "cpu-int4",
        "--block-size",
        block,
    )
    assert_user_error(r, f"block size {block}", "power of two")
    assert not (tmp_path / "o").exists()


def test_awq_with_empty_calibration(tiny_factory, tmp_path):
    empty = tmp_path / "calib.txt"
    empty.write_text("")
    r = run_cli(
        "convert",
        tiny_factory(("llama", "float32", False, None)),
        "-o",
        tmp_path / "o",
        "--target",
        "cpu-int4",
        "--quant",
        "awq",
        "--calibration",
        empty,
    )
    assert_user_error(r, "calibration")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
