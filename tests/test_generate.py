"""End to end on the real default model: greedy text against transformers and onnxruntime-genai,
the CLI, the Python API, stop strings."""

import os
import subprocess
import sys

import numpy as np
import pytest

from lmforge.export.convert import convert
from lmforge.generate import greedy_tokens, stream_generate
from lmforge.model import load
from lmforge.runtime.ort import OrtEngine
from lmforge.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def genai_greedy(folder, ids, extra_tokens):
    """Greedy tokens from onnxruntime-genai's own generator."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + extra_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def hf_greedy(model, ids, n):
    import torch

    out, past, tokens = None, None, []
    inp = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            out = model(inp, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            inp = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.mark.slow
def test_greedy_matches_transformers_on_default_model(default_model_path, default_onnx):
    """transformers dequantizes the GGUF itself (its own loader): 3 prompts x 32 greedy tokens."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, torch_dtype=torch.float32
    ).eval()
    engine = OrtEngine(default_onnx)
    tok = Tokenizer.from_folder(default_onnx)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert greedy_tokens(engine, ids, 32) == hf_greedy(hf, ids, 32), prompt


def test_logits_a_caller_keeps_survive_later_steps(default_onnx):
    """The engine reuses one logits buffer per decode shape: what it returned before must stay
    what it was, each step equal to the full-logits graph's row for that position."""
    engine, full = OrtEngine(default_onnx), OrtEngine(default_onnx, full_logits=True)
    ids = Tokenizer.from_folder(default_onnx).encode(PROMPTS[0])
    cache = engine.new_cache(1, len(ids) + 4)
    kept = [engine.prefill(cache, [ids])[0]]
    for _ in range(3):
        ids.append(int(kept[-1].argmax()))
        kept.append(engine.decode(cache, [ids[-1]])[0])
    reference = full.score(ids)[-4:]
    for mine, ref in zip(kept, reference):
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-3 * np.abs(ref).max())
    assert len({float(k.max()) for k in kept}) == 4


def test_onnxruntime_genai_runs_the_folder_with_the_same_tokens(default_onnx):
    og = pytest.importorskip("onnxruntime_genai")
    og_tok = og.Tokenizer(og.Model(str(default_onnx)))
    engine = OrtEngine(default_onnx)
    tok = Tokenizer.from_folder(default_onnx)
    for prompt in PROMPTS[:2]:
        ids = [int(i) for i in og_tok.encode(prompt)]
        assert ids == tok.encode(prompt)
        theirs = genai_greedy(default_onnx, ids, 24)
        assert greedy_tokens(engine, ids, len(theirs)) == theirs  # lmforge's last-position graph


def test_cli_run_answers_the_capital(tmp_path):
    env = dict(os.environ, LMFORGE_HOME=str(tmp_path / "home"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "run",
            "smollm2-135m",
            "-p",
            "What is the capital of France?",
            "--engine",
            "ort",
            "--target",
            "cpu-fp32",  # FACTS.md: the fp32 path answers Paris (the int4 default does not: test_cli_prompts)
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "time to first token" in r.stderr
    cached = list((tmp_path / "home" / "onnx").iterdir())
    assert any(p.is_dir() for p in cached)
    # second run reuses the cached conversion
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "run",
            "smollm2-135m",
            "-p",
            "What is the capital of France?",
            "--engine",
            "ort",
            "--target",
            "cpu-fp32",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r2.stdout == r.stdout and sorted((tmp_path / "home" / "onnx").iterdir()) == sorted(cached)


def test_python_api_stream_generate_chat(default_onnx):
    model = load(default_onnx)
    pieces = list(model.stream("The capital of France is", raw=True, max_tokens=12))
    assert len(pieces) == model.last.generation_tokens == 12 and model.last.finish_reason == "length"
    assert "".join(pieces) == model.generate("The capital of France is", raw=True, max_tokens=12)
    reply = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=30)
    assert "Paris" in reply and model.last.finish_reason == "stop"
    a = model.generate("Tell me a story.", temperature=0.9, top_p=0.95, seed=11, max_tokens=24)
    b = model.generate("Tell me a story.", temperature=0.9, top_p=0.95, seed=11, max_tokens=24)
    c = model.generate("Tell me a story.", temperature=0.9, top_p=0.95, seed=12, max_tokens=24)
    assert a == b and a != c


def test_stop_strings_cut_the_text(default_onnx):
    engine = OrtEngine(default_onnx)
    tok = Tokenizer.from_folder(default_onnx)
    ids = tok.encode("Count: 1, 2, 3, 4, 5,")
    full = "".join(r.text for r in stream_generate(engine, tok, ids, SamplingParams(max_tokens=24)))
    assert " 7" in full
    stop = full[full.index(" 7") : full.index(" 7") + 3]
    rs = list(stream_generate(engine, tok, ids, SamplingParams(max_tokens=24, stop=(stop,))))
    text = "".join(r.text for r in rs)
    assert text == full[: full.index(stop)] and rs[-1].finish_reason == "stop"
    assert all(stop not in r.text for r in rs)


def test_prompt_longer_than_context_is_refused(tiny_factory, tmp_path):
    folder = convert(tiny_factory(("llama", "float32", False, None)), tmp_path / "m", progress=False)
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "run", str(folder), "--raw", "-p", "word " * 300],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "context is 256" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_engine_timings_are_reported(default_onnx):
    engine = OrtEngine(default_onnx)
    tok = Tokenizer.from_folder(default_onnx)
    rs = list(stream_generate(engine, tok, tok.encode("Hello"), SamplingParams(max_tokens=8, logprobs=True)))
    last = rs[-1]
    assert last.prompt_tps > 0 and last.generation_tps > 0 and 0 < last.ttft < 10
    infos = [i for r in rs for i in r.logprobs]  # one per generated token (EOS has none)
    assert len(infos) == last.generation_tokens and all(np.isfinite(i.logprob) and i.logprob <= 0 for i in infos)


@pytest.mark.slow
def test_runs_onnxruntime_genai_builder_folder(tmp_path):
    """onnxruntime-genai's own builder output (from an HF folder lmforge writes from the GGUF) runs
    in lmforge's engine with the same greedy tokens as in onnxruntime-genai."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    from lmforge.export.hf import convert_to_hf

    hf = convert_to_hf("smollm2-135m", tmp_path / "hf")
    out = tmp_path / "genai-int4"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    model = load(out)
    ids = model.tokenizer.encode(PROMPTS[0])
    theirs = genai_greedy(out, ids, 24)
    assert greedy_tokens(model.engine, ids, len(theirs)) == theirs


def test_hf_export_loads_in_transformers(tiny_factory, tmp_path, default_onnx):
    """GGUF -> HF folder: transformers loads it, its tensors equal the GGUF's, and its greedy
    tokens on the default model equal lmforge's."""
    import torch
    import transformers

    from lmforge.checkpoint import open_checkpoint
    from lmforge.export.hf import convert_to_hf

    out = convert_to_hf("smollm2-135m", tmp_path / "hf")
    src, dst = open_checkpoint("smollm2-135m"), open_checkpoint(out)
    assert src.spec == dst.spec
    for name in ("embed", "layers.0.q", "layers.7.k", "layers.29.down", "norm"):
        np.testing.assert_array_equal(src.read(name), dst.read(name))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPTS[1], add_special_tokens=False).input_ids
    assert hf_greedy(hf, ids, 16) == greedy_tokens(OrtEngine(default_onnx), ids, 16)


def test_cli_chat_keeps_history_and_resets(default_onnx):
    script = "What is the capital of France?\nAnd of Italy? Answer with one word.\n/reset\n/exit\n"
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", str(default_onnx), "--max-tokens", "24"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "(conversation cleared)" in r.stdout
    assert r.stdout.count(">>> ") == 4


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gemma3", "mistral"])
def test_onnxruntime_genai_runs_every_arch(arch, tiny_factory, tmp_path):
    """genai_config.json names each architecture as onnxruntime-genai knows it (gemma3_text, ...)."""
    pytest.importorskip("onnxruntime_genai")
    folder = convert(tiny_factory((arch, "float32", False, None)), tmp_path / arch, progress=False)
    ids = list(range(5, 17))
    theirs = genai_greedy(folder, ids, 6)
    assert greedy_tokens(OrtEngine(folder), ids, len(theirs)) == theirs


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "phi3", "gemma3"]
)  # byte-level BPE x2 (no BOS), SentencePiece x2 (BOS)
def test_gguf_to_hf_generates_as_lmforge(arch, tiny_factory, tmp_path):
    """GGUF -> HF folder: transformers' AutoTokenizer gives the ids lmforge (llama.cpp's
    tokenization, BOS where the GGUF adds it) gives, and transformers' greedy `generate` on the
    folder gives lmforge's greedy tokens on the GGUF, 3 prompts x 8 tokens."""
    import torch
    import transformers

    from lmforge.export.gguf import convert_to_gguf
    from lmforge.export.hf import convert_to_hf

    gguf_path = convert_to_gguf(
        tiny_factory((arch, "float32", False, None)), tmp_path / "m.gguf", "f32", progress=False
    )
    out = convert_to_hf(gguf_path, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # greedy to the end, as greedy_tokens does
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = load(gguf_path, engine="ort", target="cpu-fp32")
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert ids == model.prompt_ids(prompt, raw=True), prompt
        assert (ids[0] == tok.bos_token_id) == (arch in ("phi3", "gemma3"))  # SentencePiece GGUFs add BOS
        with torch.no_grad():
            theirs = hf.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=8,
                do_sample=False, pad_token_id=0,
            )[0, len(ids) :].tolist()  # fmt: skip
        assert theirs == greedy_tokens(model.engine, ids, 8), prompt


@pytest.mark.parametrize("end", ["eos", "length"])
def test_a_character_cut_by_the_end_is_flushed_as_transformers_decodes_it(default_onnx, end):
    """The first byte token of a 3-token emoji, then EOS (or max_tokens): the reply's text is
    what transformers' tokenizer decodes from the generated ids, held-back bytes included."""
    from transformers import AutoTokenizer

    from lmforge.generate import SequenceState

    tok = Tokenizer.from_folder(default_onnx)
    first = tok.encode("🦜")[0]
    eos = 2
    params = SamplingParams(max_tokens=2 if end == "length" else 8)
    state = SequenceState(tok, [1, 2, 3], params, (eos,), 49152)
    text = ""
    for token in (first, first if end == "length" else eos):
        logits = np.zeros(49152, dtype=np.float32)
        logits[token] = 1.0
        d = state.accept(logits)
        text += d.text
    assert d.finish_reason == ("length" if end == "length" else "stop")
    ids = [first, first] if end == "length" else [first]
    want = AutoTokenizer.from_pretrained(default_onnx).decode(ids)
    assert text == want and text.startswith("\ufffd"), (text, want)
