"""The families users run today (issue 16), each a tiny random checkpoint that transformers' own
config and model classes build (tests/tiny.py), through every form lmforge writes:

- ONNX fp32 logits against transformers' forward: a 24-token prefill and 8 cached decode steps;
- GGUF f32 on llama.cpp (llama-cpp-python) against transformers, the same steps;
- HF -> GGUF -> HF: every tensor identical;
- int4 (RTN, AWQ, exact transcode of a Q4_0 GGUF) and fp16 graphs load and run near fp32.
"""

import importlib.util
import json

import numpy as np
import onnx
import pytest

from lmforge.export.convert import convert
from lmforge.runtime.ort import OrtEngine
from tests.test_onnx_parity import hf_model, parity_errors, prompt_ids, rel_err

# (arch, variant) as tests/tiny.py builds them
FAMILIES = [
    ("llama", "llama32"),  # Llama 3.2: tied embeddings, llama3 rope
    ("qwen3", None),  # per-head q/k RMSNorm
    ("phi3", "phi4mini"),  # Phi-4-mini: partial rotary 3/4, longrope, tied, BPE vocabulary
    ("mistral", "nemo"),  # Mistral-Nemo: head_dim apart from hidden / heads
    ("granite", None),  # embedding / attention / residual / logit multipliers
    ("olmo2", None),  # q/k norms over the whole projection, post-norms only
    ("smollm3", None),  # no rotary on every fourth layer
    ("gemma2", None),  # attention and final logit soft-capping, alternating sliding layers
    ("mixtral", None),  # mixture of experts: top-2 of 4, renormalized
    ("qwen3_moe", None),  # Qwen3's attention, experts in every layer
    ("phimoe", None),  # Phi-3.5-MoE: LayerNorm, biases, sparsemixer router over 4 experts, longrope mscale
]
TOL = 1e-4  # relative to the largest logit
IDS = [f"{a}-{v}" if v else a for a, v in FAMILIES]


def _src(tiny_factory, arch, variant):
    return tiny_factory((arch, "float32", False, variant))


@pytest.fixture(scope="module")
def gguf_f32(tiny_factory, tmp_path_factory):
    """(arch, variant) -> (checkpoint folder, its GGUF f32), each written once."""
    from lmforge.export.gguf import convert_to_gguf

    built = {}

    def get(arch, variant):
        if (arch, variant) not in built:
            src = _src(tiny_factory, arch, variant)
            out = tmp_path_factory.mktemp("families") / f"{arch}-{variant}.gguf"
            built[arch, variant] = (src, convert_to_gguf(src, out, "f32", progress=False))
        return built[arch, variant]

    return get


@pytest.mark.parametrize("arch,variant", FAMILIES, ids=IDS)
def test_onnx_fp32_matches_transformers(arch, variant, tiny_factory, tmp_path):
    src = _src(tiny_factory, arch, variant)
    engine = OrtEngine(convert(src, tmp_path / "fp32", progress=False))
    errors = parity_errors(engine, src, prompt_ids(24, engine.vocab_size))
    print(f"onnx {arch}-{variant}: prefill {errors[0]:.1e}, decode max {max(errors[1:]):.1e}")
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("arch,variant", FAMILIES, ids=IDS)
def test_llamacpp_f32_gguf_matches_transformers(arch, variant, gguf_f32):
    pytest.importorskip("llama_cpp")
    from lmforge.runtime.llamacpp import LlamaCppEngine

    src, path = gguf_f32(arch, variant)
    engine = LlamaCppEngine(path, threads=2, kv_type="f32")
    ids = prompt_ids(24, engine.vocab_size)
    errors = parity_errors(engine, src, ids)
    print(f"llama.cpp {arch}-{variant}: prefill {errors[0]:.1e}, decode max {max(errors[1:]):.1e}")
    model = hf_model(src)
    if arch == "phimoe":
        # llama.cpp's phimoe graph is not transformers': about 6e-2 of the logits apart. Against
        # transformers computing what llama.cpp computes, the rest is ours (the GGUF we write).
        assert max(errors) <= 0.2, errors
        errors = parity_errors(LlamaCppEngine(path, threads=2, kv_type="f32"), src, ids, model=llamacpp_phimoe(model))
        print(
            f"llama.cpp {arch} vs transformers as llama.cpp: prefill {errors[0]:.1e}, decode max {max(errors[1:]):.1e}"
        )
    if getattr(model.config, "hidden_activation", None) == "gelu_pytorch_tanh":
        # ggml's CPU GELU reads an fp16 table (gelu of x rounded to fp16, stored as fp16): about
        # 3e-4 of the logits on Gemma. Against transformers with that same GELU, the rest is ours.
        assert max(errors) <= 1e-3, errors
        for layer in model.model.layers:
            layer.mlp.act_fn = _module(ggml_table_gelu)
        errors = parity_errors(LlamaCppEngine(path, threads=2, kv_type="f32"), src, ids, model=model)
        print(
            f"llama.cpp {arch}-{variant} vs fp16-table GELU: prefill {errors[0]:.1e}, decode max {max(errors[1:]):.1e}"
        )
    assert max(errors) <= TOL, errors


def llamacpp_phimoe(model):
    """transformers' Phi-3.5-MoE changed to what llama.cpp's `phimoe` graph computes: RMSNorm plus
    the bias where transformers has LayerNorm, and the top 2 experts of one softmax, renormalized,
    where it has the sparsemixer."""
    import torch

    def rms_plus_bias(norm):
        return _module(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias)

    def softmax_top2(router):
        def forward(h):
            logits = torch.nn.functional.linear(h, router.weight)
            weights, chosen = torch.softmax(logits, dim=-1).topk(2, dim=-1)
            return logits, weights / weights.sum(-1, keepdim=True), chosen

        return forward

    for layer in model.model.layers:
        layer.input_layernorm = rms_plus_bias(layer.input_layernorm)
        layer.post_attention_layernorm = rms_plus_bias(layer.post_attention_layernorm)
        layer.mlp.router.forward = softmax_top2(layer.mlp.router)
    model.model.norm = rms_plus_bias(model.model.norm)
    return model


def ggml_table_gelu(x):
    """GELU (tanh form) as ggml's CPU backend computes it: x rounded to fp16, looked up in a table
    of fp16 results; x itself from 10 up and 0 from -10 down."""
    import torch
    import torch.nn.functional as F

    table = F.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def _module(fn):
    import torch

    class Fn(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    return Fn()


@pytest.mark.parametrize("arch,variant", FAMILIES, ids=IDS)
def test_hf_gguf_hf_keeps_every_tensor(arch, variant, gguf_f32, tmp_path):
    """HF -> GGUF f32 -> HF: the same tensors, bit for bit (Gemma's 1 + w norms to within
    float32's step at 1), and transformers reads the config we write to the same logits."""
    import torch
    from safetensors.numpy import load_file

    from lmforge.export.hf import convert_to_hf
    from tests.gguf_ref import hf_tensors

    src, path = gguf_f32(arch, variant)
    out = convert_to_hf(path, tmp_path / "hf")
    ours, theirs = load_file(out / "model.safetensors"), hf_tensors(src)
    if json.loads((src / "config.json").read_text()).get("tie_word_embeddings"):
        theirs.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(theirs)
    for name, ref in theirs.items():
        atol = 2**-23 if arch.startswith("gemma") and name.endswith("norm.weight") else 0
        np.testing.assert_allclose(ours[name], ref, rtol=0, atol=atol, err_msg=name)
    ids = prompt_ids(20, 256)
    with torch.no_grad():
        a = hf_model(src)(torch.tensor([ids])).logits[0].numpy()
        b = hf_model(out)(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(b, a) <= 1e-5


@pytest.mark.parametrize("arch,variant", FAMILIES, ids=IDS)
def test_int4_and_fp16_forms_run(arch, variant, gguf_f32, tmp_path):
    """cpu-int4 (RTN), dml-int4-awq, a Q4_0 GGUF transcoded to cpu-int4, and cuda-fp16 (run by
    the CPU provider): each loads, prefills and decodes, and stays near the fp32 logits; so does
    the Q4_0 GGUF on llama.cpp."""
    from lmforge.export.gguf import convert_to_gguf

    src, f32 = gguf_f32(arch, variant)
    q4 = convert_to_gguf(f32, tmp_path / "q4_0.gguf", "q4_0", progress=False)
    forms = {
        "cpu-fp32": (src, "cpu-fp32"),
        "cpu-int4": (src, "cpu-int4"),
        "dml-int4-awq": (src, "dml-int4-awq"),
        "q4_0 transcoded": (q4, "cpu-int4"),
        "cuda-fp16": (src, "cuda-fp16"),
    }
    ids = prompt_ids(24, 256, seed=3)
    logits = {}
    for form, (source, target) in forms.items():
        folder = convert(source, tmp_path / form.replace(" ", "-"), target=target, progress=False)
        if arch in ("mixtral", "qwen3_moe", "phimoe") and "int4" in target:  # int4 experts: ONNX Runtime's QMoE
            assert "QMoE" in {
                n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
            }
        engine = OrtEngine(folder)
        cache = engine.new_cache(1, 32)
        first = engine.prefill(cache, [ids])[0]
        step = engine.decode(cache, [int(first.argmax())])[0]
        assert np.isfinite(first).all() and np.isfinite(step).all(), form
        logits[form] = first
    if importlib.util.find_spec("llama_cpp"):  # the Q4_0 file itself on llama.cpp
        from lmforge.runtime.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(q4, threads=2)
        logits["q4_0 on llama.cpp"] = engine.prefill(engine.new_cache(1, 32), [ids])[0]
    ref = logits.pop("cpu-fp32")
    errors = {form: rel_err(x, ref) for form, x in logits.items()}
    # int4 on a tiny random model moves logits by ~30% of the largest one; their direction holds
    cosine = {form: float(x @ ref / np.linalg.norm(x) / np.linalg.norm(ref)) for form, x in logits.items()}
    print(f"{arch}-{variant}: " + ", ".join(f"{k} {errors[k]:.1e} (cos {cosine[k]:.3f})" for k in errors))
    assert errors["cuda-fp16"] <= 1e-2, errors
    assert min(cosine.values()) >= 0.9, cosine


# Phi-3.5-MoE rotary magnitudes that differ short and long: one is all lmforge's tables hold
PHIMOE_MSCALES = dict(
    type="longrope",
    short_factor=[1.0] * 8,
    long_factor=[2.0] * 8,
    short_mscale=1.2,
    long_mscale=1.3,
    original_max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "edit,field",
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"num_local_experts": 8, "num_experts_per_tok": 2}, "num_local_experts"),
        ({"model_type": "phimoe", "num_local_experts": 4, "num_experts_per_tok": 4}, "num_experts_per_tok"),
        ({"model_type": "phimoe", "num_local_experts": 4, "rope_scaling": PHIMOE_MSCALES}, "long_mscale"),
    ],
    ids=["rope_scaling", "rope_parameters", "experts", "phimoe", "phimoe-mscale"],
)
def test_unsupported_variant_is_one_line_naming_the_field(edit, field, tiny_factory, tmp_path):
    """A config asking for what lmforge lacks: one line naming the field, exit 2, for reading
    (inspect) and converting alike."""
    import shutil

    from tests.test_errors import assert_user_error, run_cli

    folder = tmp_path / "variant"
    shutil.copytree(_src(tiny_factory, "llama", "llama32"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert_user_error(run_cli("inspect", folder), field)
    assert_user_error(run_cli("convert", folder, "-o", tmp_path / "out.gguf", "--gguf", "f32"), field)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.slow
def test_phi4_mini_shaped_checkpoint_through_every_target(tokenizer_folders, tmp_path):
    """Phi-4-mini-instruct's own config (hidden 3072, 24 heads over 8 kv heads, head 128 rotated
    over 96, longrope, tied, bf16) with random weights, one layer and a 2,000-token vocabulary
    (the 200k one alone is 2.4 GB in fp32): every ONNX target and `--gguf q4_k_m` load and run;
    cpu-fp32 matches transformers to TOL, the others stay near it (random weights at this width
    are all noise to int4: cosine ~0.9, where an unrelated model would give ~0)."""
    from lmforge.export.gguf import convert_to_gguf
    from lmforge.export.targets import TARGETS
    from tests import tiny

    src = tiny.build(tmp_path / "phi4", "phi3", "bfloat16", variant="phi4mini-shaped", tokenizers=tokenizer_folders)
    ids = prompt_ids(24, 2000, seed=7)
    fp32 = None
    for target in TARGETS:
        engine = OrtEngine(convert(src, tmp_path / target, target=target, progress=False))
        if target == "cpu-fp32":
            errors = parity_errors(engine, src, ids)
            print(f"phi-4-mini shape cpu-fp32: prefill {errors[0]:.1e}, decode max {max(errors[1:]):.1e}")
            assert max(errors) <= TOL, errors
            fp32 = engine.prefill(engine.new_cache(1, 24), [ids])[0]
        else:
            x = engine.prefill(engine.new_cache(1, 24), [ids])[0]
            cos = float(x @ fp32 / np.linalg.norm(x) / np.linalg.norm(fp32))
            print(f"phi-4-mini shape {target}: rel {rel_err(x, fp32):.1e}, cos {cos:.4f}")
            assert cos >= 0.8, target
        del engine
        __import__("shutil").rmtree(tmp_path / target)  # a few hundred MB each
    pytest.importorskip("llama_cpp")
    from lmforge.runtime.llamacpp import LlamaCppEngine

    q4 = convert_to_gguf(src, tmp_path / "q4_k_m.gguf", "q4_k_m", progress=False)
    engine = LlamaCppEngine(q4, threads=2)
    x = engine.prefill(engine.new_cache(1, 24), [ids])[0]
    cos = float(x @ fp32 / np.linalg.norm(x) / np.linalg.norm(fp32))
    print(f"phi-4-mini shape q4_k_m on llama.cpp: rel {rel_err(x, fp32):.1e}, cos {cos:.4f}")
    assert cos >= 0.8


@pytest.mark.slow
def test_phimoe_shaped_checkpoint_on_the_cpu(tokenizer_folders, tmp_path):
    """Phi-3.5-MoE-instruct's own config (hidden 4096, 32 heads over 8 kv heads, experts of 6400,
    biases, LayerNorm, longrope with its mscale) with random weights, one layer, 4 of its 16
    experts and a 2,000-token vocabulary, bf16 as published: cpu-fp32 matches transformers to
    TOL over a 24-token prefill and 8 decode steps; cpu-int4 (QMoE experts) runs near it."""
    import shutil

    from tests import tiny

    src = tiny.build(tmp_path / "phimoe", "phimoe", "bfloat16", variant="shaped", tokenizers=tokenizer_folders)
    ids = prompt_ids(24, 2000, seed=7)
    engine = OrtEngine(convert(src, tmp_path / "cpu-fp32", target="cpu-fp32", progress=False))
    errors = parity_errors(engine, src, ids)
    print(f"phi-3.5-moe shape cpu-fp32: prefill {errors[0]:.1e}, decode max {max(errors[1:]):.1e}")
    assert max(errors) <= TOL, errors
    fp32 = engine.prefill(engine.new_cache(1, 24), [ids])[0]
    del engine
    shutil.rmtree(tmp_path / "cpu-fp32")  # 1.4 GB
    folder = convert(src, tmp_path / "cpu-int4", target="cpu-int4", progress=False)
    assert "QMoE" in {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    engine = OrtEngine(folder)
    x = engine.prefill(engine.new_cache(1, 24), [ids])[0]
    cos = float(x @ fp32 / np.linalg.norm(x) / np.linalg.norm(fp32))
    print(f"phi-3.5-moe shape cpu-int4: rel {rel_err(x, fp32):.1e}, cos {cos:.4f}")
    assert cos >= 0.8


@pytest.mark.parametrize(
    "arch,variant,pre",
    [("llama", "llama32", "smollm"), ("qwen3", None, "qwen2"), ("phi3", "phi4mini", "gpt-4o"), ("gemma2", None, None)],
    ids=["bpe-smollm", "qwen3", "phi4mini-o200k", "gemma2-spm"],
)
@pytest.mark.slow
def test_tokenizers_agree_on_all_of_wikitext(arch, variant, pre, gguf_f32, wikitext):
    """The checkpoint's tokenizer.json through transformers' AutoTokenizer and llama.cpp on the
    GGUF lmforge writes: the same ids for the whole WikiText-2 test file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from lmforge.checkpoint.gguf import read_metadata

    src, path = gguf_f32(arch, variant)
    assert read_metadata(path).get("tokenizer.ggml.pre") == pre
    text = wikitext.lstrip(" ") if pre is None else wikitext  # SentencePiece: see test_gguf_writer
    theirs = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ours = llm.tokenize(text.encode(), add_bos=False, special=False)
    print(f"{arch}-{variant}: {len(ours)} tokens")
    assert ours == theirs


@pytest.mark.parametrize("arch,variant", FAMILIES, ids=IDS)
def test_spec_from_gguf_equals_spec_from_config(arch, variant, gguf_f32):
    """What the GGUF we write says about the model is what config.json says: every ModelSpec field
    (the rotary as the cos/sin tables both give: llama.cpp keeps Llama 3's scaling as divisors;
    Mistral-Nemo without a window reads back as the `llama` it is written as)."""
    import dataclasses

    from lmforge.checkpoint import open_checkpoint
    from lmforge.export.rope import rope_tables
    from tests.test_readers import _floats_close

    src, path = gguf_f32(arch, variant)
    a, b = open_checkpoint(src).spec, open_checkpoint(path).spec
    for f in dataclasses.fields(a):
        if f.name not in ("arch", "rope_scaling"):
            assert _floats_close(getattr(a, f.name), getattr(b, f.name)), (
                f.name,
                getattr(a, f.name),
                getattr(b, f.name),
            )
    assert b.arch == ("llama" if arch == "mistral" else a.arch)
    for (ka, (ca, sa)), (kb, (cb, sb)) in zip(rope_tables(a, 256).items(), rope_tables(b, 256).items()):
        assert ka == kb
        np.testing.assert_allclose(ca, cb, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "phimoe"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k_m"])
def test_expert_gguf_types_and_blocks_equal_llamacpps_quantizer(arch, kind, gguf_f32, tmp_path):
    """Merged expert tensors quantized as llama.cpp's own quantizer does them, on rows of 256:
    the same type per tensor (the router kept F32, ffn_down_exps given more bits in the _m mix,
    Mixtral's eight experts: attention v/k Q8_0) and byte-identical blocks."""
    pytest.importorskip("llama_cpp")
    from tests.test_gguf_writer import _same_as_llamacpp

    _, f32 = gguf_f32(arch, "k256")
    ours = _same_as_llamacpp(f32, kind, tmp_path)
    assert {t for n, (t, _) in ours.items() if ".ffn_gate_inp." in n} == {"F32"}
    if arch == "mixtral":  # eight experts
        assert {t for n, (t, _) in ours.items() if ".attn_v." in n} == {"Q8_0"}


@pytest.mark.parametrize("arch,variant", FAMILIES, ids=IDS)
def test_onnxruntime_genai_runs_the_folder(arch, variant, tiny_factory, tmp_path):
    """onnxruntime-genai's own generator on the cpu-fp32 folder: transformers' greedy tokens."""
    pytest.importorskip("onnxruntime_genai")
    from tests.test_generate import genai_greedy, hf_greedy

    src = _src(tiny_factory, arch, variant)
    folder = convert(src, tmp_path / "fp32", progress=False)
    ids = prompt_ids(12, 256, seed=5)
    assert genai_greedy(folder, ids, 8) == hf_greedy(hf_model(src), ids, 8)


def test_smollm3_rotary_free_layers_follow_the_config(tiny_factory, tmp_path):
    """SmolLM3 layers without rotary where config.json's `no_rope_layers` says (not every fourth):
    the ONNX graph follows it (transformers' logits), and GGUF, whose llama.cpp fixes the period
    at four, is refused in one line, nothing written."""
    import shutil

    from tests.test_errors import assert_user_error, run_cli

    folder = tmp_path / "smollm3"
    shutil.copytree(_src(tiny_factory, "smollm3", None), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "no_rope_layers": [0, 1, 0, 1]}))
    engine = OrtEngine(convert(folder, tmp_path / "fp32", progress=False))
    errors = parity_errors(engine, folder, prompt_ids(24, engine.vocab_size))
    assert max(errors) <= TOL, errors
    assert_user_error(run_cli("convert", folder, "-o", tmp_path / "x.gguf", "--gguf", "f32"), "every 4th layer")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_left_in_float_say_so(arch, tiny_factory, tmp_path, caplog):
    """QMoE takes only symmetric codes: a cpu-int4 --asymmetric MoE keeps float experts (the
    MoE op), and the conversion says so in one warning, not silently; the symmetric form does not warn."""
    import logging

    src = _src(tiny_factory, arch, None)
    for symmetric in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmforge"):
            out = convert(src, tmp_path / f"sym{symmetric}", target="cpu-int4", symmetric=symmetric, progress=False)
        ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
        notes = [r.getMessage() for r in caplog.records if "experts" in r.getMessage()]
        if symmetric:
            assert "QMoE" in ops and notes == [], notes
        else:
            assert "QMoE" not in ops and "MoE" in ops and "MatMulNBits" in ops
            assert len(notes) == 1 and "stay float32" in notes[0] and "asymmetric" in notes[0], notes
