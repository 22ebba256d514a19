"""ONNX export + ONNX Runtime engine against transformers' PyTorch forward pass (fp32)."""

import numpy as np
import pytest

from lmforge.export.convert import convert
from lmforge.runtime.ort import OrtEngine

# (arch, variant, prompt length): Phi-3 longrope runs a prompt longer than its original context
# (64) so the long factors are in play; Mistral (window 16) and Gemma 3 (window 8) slide.
PARITY_CASES = [
    ("llama", None, 24),
    ("mistral", None, 24),
    ("qwen2", None, 24),
    ("phi3", None, 24),
    ("phi3", "longrope", 80),
    ("gemma3", None, 24),
]
TOL = 1e-3


@pytest.fixture(scope="session")
def onnx_factory(tmp_path_factory, tiny_factory):
    built = {}

    def get(arch, variant=None, dtype="float32"):
        key = (arch, variant)
        if key not in built:
            src = tiny_factory((arch, dtype, False, variant))
            out = tmp_path_factory.mktemp("onnx") / f"{arch}-{variant}"
            built[key] = (src, convert(src, out, progress=False))
        return built[key]

    return get


def hf_model(folder):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def prompt_ids(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def parity_errors(engine, src, ids: list[int], steps: int = 8, model=None) -> list[float]:
    """Relative logit errors of `engine` against transformers on checkpoint `src` (or the loaded
    `model`): the prefill of `ids`, then `steps` cached decode steps of transformers' greedy tokens."""
    import torch

    model = model or hf_model(src)
    cache = engine.new_cache(1, len(ids) + steps)
    ours = engine.prefill(cache, [ids])[0]
    errors = []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        ref, past = out.logits[0, -1].numpy(), out.past_key_values
        errors.append(rel_err(ours, ref))
        for _ in range(steps):
            token = int(ref.argmax())
            ours = engine.decode(cache, [token])[0]
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            ref, past = out.logits[0, -1].numpy(), out.past_key_values
            errors.append(rel_err(ours, ref))
    return errors


@pytest.mark.parametrize("arch,variant,n", PARITY_CASES, ids=lambda x: str(x))
def test_prefill_and_decode_match_transformers(arch, variant, n, onnx_factory):
    src, folder = onnx_factory(arch, variant)
    engine = OrtEngine(folder)
    errors = parity_errors(engine, src, prompt_ids(n, engine.vocab_size))
    print(f"{arch}-{variant}: prefill {errors[0]:.1e}, decode max {max(errors[1:]):.1e}")
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("arch,variant,n", PARITY_CASES, ids=lambda x: str(x))
def test_full_logits_graph_matches_every_position(arch, variant, n, onnx_factory):
    """model.genai.onnx (every position's logits, for onnxruntime-genai and evaluation)."""
    import torch

    src, folder = onnx_factory(arch, variant)
    engine = OrtEngine(folder, full_logits=True)
    ids = prompt_ids(n, engine.vocab_size, seed=1)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.genai.onnx"))
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, n), np.int64)}
    for i in range(engine.n_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, engine.n_kv_heads, 0, engine.head_dim), np.float32)
    ours = sess.run(["logits"], feed)[0][0]
    with torch.no_grad():
        ref = hf_model(src)(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= TOL
    cache = engine.new_cache(1, n)
    assert rel_err(engine.prefill(cache, [ids])[0], ref[-1]) <= TOL


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_batch_rows_equal_single_runs(arch, onnx_factory):
    """Two prompts of different lengths in one right-padded batch: each row's prefill and
    decode logits equal that prompt run alone."""
    _, folder = onnx_factory(arch)
    engine = OrtEngine(folder)
    prompts = [prompt_ids(24, engine.vocab_size, 2), prompt_ids(13, engine.vocab_size, 3)]
    singles = []
    for p in prompts:
        cache = engine.new_cache(1, 40)
        logits = [engine.prefill(cache, [p])[0]]
        for _ in range(6):
            logits.append(engine.decode(cache, [int(logits[-1].argmax())])[0])
        singles.append(logits)
    cache = engine.new_cache(2, 40)
    batch = [engine.prefill(cache, prompts)]
    for step in range(6):
        batch.append(engine.decode(cache, [int(singles[r][step].argmax()) for r in range(2)]))
    for step, logits in enumerate(batch):
        for r in range(2):
            assert rel_err(logits[r], singles[r][step]) <= 1e-5, (step, r)


def test_cache_grows_past_its_first_capacity(onnx_factory):
    _, folder = onnx_factory("llama")
    engine = OrtEngine(folder)
    ids = prompt_ids(10, engine.vocab_size, 4)
    small, big = engine.new_cache(1, 4), engine.new_cache(1, 64)
    a, b = engine.prefill(small, [ids]), engine.prefill(big, [ids])
    for _ in range(20):
        t = int(b[0].argmax())
        a, b = engine.decode(small, [t]), engine.decode(big, [t])
        assert rel_err(a[0], b[0]) <= 1e-6
    assert small.capacity >= 30 and small.capacity < 64 and big.capacity == 64


def test_caches_and_pools_grow_to_the_context_and_no_further(onnx_factory):
    """KVCache and KVPool share one growth rule: double, capped at the model's context, and a
    user error (not a bigger buffer) past it."""
    from lmforge.errors import LmforgeError

    _, folder = onnx_factory("llama")
    engine = OrtEngine(folder)
    ctx = engine.context_length
    for cache in (engine.new_cache(1, 4), engine.new_pool(2, 4)):
        cache.reserve(5)
        assert cache.capacity == 8
        cache.reserve(ctx - 1)
        assert cache.capacity == ctx - 1
        cache.reserve(ctx)
        assert cache.capacity == ctx
        with pytest.raises(LmforgeError, match=f"sequence of {ctx + 1} tokens exceeds the model's context of {ctx}"):
            cache.reserve(ctx + 1)
        assert cache.capacity == ctx


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cuda_fp16_target_graph(arch, tiny_factory, tmp_path):
    """cuda-fp16: fp16 weights, I/O and KV cache. ONNX Runtime's CPU provider runs it too, so its
    logits are checked here against transformers (fp16 rounding: 1e-2 of the max logit)."""
    import onnx
    import torch

    src = tiny_factory((arch, "float32", False, None))
    folder = convert(src, tmp_path / "fp16", target="cuda-fp16", progress=False)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    f16 = onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == f16
    assert all(i.type.tensor_type.elem_type == f16 for i in graph.input if i.name.startswith("past_"))
    engine = OrtEngine(folder)
    ids = prompt_ids(24, engine.vocab_size, 5)
    cache = engine.new_cache(1, 32)
    ours = engine.prefill(cache, [ids])[0]
    with torch.no_grad():
        ref = hf_model(src)(torch.tensor([ids])).logits[0, -1].numpy()
    assert rel_err(ours, ref) <= 1e-2
    assert (folder / "model.onnx.data").stat().st_size < 0.6 * sum(f.stat().st_size for f in src.glob("*.safetensors"))


@pytest.mark.parametrize("arch,variant,n", PARITY_CASES, ids=lambda x: str(x))
def test_directml_graph_form_matches_transformers(arch, variant, n, tiny_factory, tmp_path):
    """DirectML's form (q/k/v projections apart, RotaryEmbedding nodes fed by position_ids, no fused
    rotary in GroupQueryAttention) gives transformers' logits too, prefill and cached decode."""
    import onnx
    import torch

    src = tiny_factory((arch, "float32", False, variant))
    folder = convert(src, tmp_path / "dml", separate_rotary=True, progress=False)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert "position_ids" in {i.name for i in graph.input}
    assert any(nd.op_type == "RotaryEmbedding" for nd in graph.node)
    assert all(not any(a.name == "do_rotary" and a.i for a in nd.attribute) for nd in graph.node)
    engine = OrtEngine(folder)
    ids = prompt_ids(n, engine.vocab_size, 11)
    cache = engine.new_cache(1, n + 4)
    ours = engine.prefill(cache, [ids])[0]
    model = hf_model(src)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        ref, past = out.logits[0, -1].numpy(), out.past_key_values
        assert rel_err(ours, ref) <= TOL
        for _ in range(4):
            token = int(ref.argmax())
            ours = engine.decode(cache, [token])[0]
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            ref, past = out.logits[0, -1].numpy(), out.past_key_values
            assert rel_err(ours, ref) <= TOL


def test_dml_int4_awq_target_runs_on_the_cpu_provider(tiny_factory, tmp_path):
    """The dml-int4-awq folder passes onnx.checker, loads in ONNX Runtime's CPU provider and stays
    near fp32 (fp16 I/O, int4 AWQ weights)."""
    import onnx

    src = tiny_factory(("llama", "float32", False, None))
    folder = convert(src, tmp_path / "dml", target="dml-int4-awq", progress=False)
    onnx.checker.check_model(str(folder / "model.onnx"))
    meta = __import__("json").loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert meta["inputs"]["position_ids"] == "position_ids" and meta["session_options"]["provider_options"] == [
        {"dml": {}}
    ]
    engine = OrtEngine(folder)
    fp32 = OrtEngine(convert(src, tmp_path / "fp32", progress=False))
    ids = prompt_ids(24, engine.vocab_size, 12)
    a = engine.prefill(engine.new_cache(1, 24), [ids])[0]
    b = fp32.prefill(fp32.new_cache(1, 24), [ids])[0]
    assert rel_err(a, b) <= 0.25
