"""Perplexity and KL divergence against llama.cpp and PyTorch."""

import json

import numpy as np
import pytest

from lmforge.evaluate import kl_of_window, nll_of_window, perplexity, windows
from tests.conftest import WIKITEXT
from tests.test_errors import assert_user_error, run_cli


def test_window_scoring_matches_torch_cross_entropy():
    import torch

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 50)).astype(np.float32) * 3
    w = rng.integers(0, 50, 64).tolist()
    nll, n = nll_of_window(logits, w)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits[32:63], dtype=torch.float64), torch.tensor(w[33:]), reduction="sum"
    )
    assert n == 31 and abs(nll - float(ref)) < 1e-9
    other = logits + rng.standard_normal(logits.shape).astype(np.float32)
    kl, same = kl_of_window(other, logits, w)
    ref_kl = (
        torch.nn.functional.kl_div(
            torch.log_softmax(torch.tensor(other[32:63], dtype=torch.float64), -1),
            torch.log_softmax(torch.tensor(logits[32:63], dtype=torch.float64), -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .numpy()
    )
    np.testing.assert_allclose(kl, ref_kl, rtol=1e-9)
    assert kl_of_window(logits, logits, w)[0].max() < 1e-12 and kl_of_window(logits, logits, w)[1].all()


def test_windows_follow_llama_perplexity():
    toks = list(range(10, 110))
    ws = windows(toks, 32, None, bos_id=1)
    assert len(ws) == 3 and ws[0][0] == 1 and ws[0][1:] == toks[1:32] and ws[2][1:] == toks[65:96]
    assert windows(toks, 32, 2, None)[1] == toks[32:64]


def test_perplexity_matches_llamacpp_on_the_same_weights(default_model_path, tmp_path):
    """3 windows: lmforge's cpu-fp32 against llama.cpp on an F32 GGUF of the same weights."""
    pytest.importorskip("llama_cpp")
    from lmforge.evaluate import read_text, text_windows
    from lmforge.export.convert import convert
    from lmforge.tokenizer import Tokenizer
    from tests.llamacpp_ref import dequantized_gguf, llamacpp_perplexity

    folder = convert("smollm2-135m", tmp_path / "fp32", progress=False)
    ours = perplexity(folder, data=WIKITEXT, chunks=3, progress=False)
    tok = Tokenizer.from_folder(folder)
    ws = text_windows(tok, read_text(WIKITEXT), 512, 3)
    ref, n = llamacpp_perplexity(dequantized_gguf(default_model_path, tmp_path / "f32.gguf"), ws)
    assert n == ours.tokens_scored == 3 * 255
    assert abs(ours.ppl - ref) / ref < 1e-3, (ours.ppl, ref)


def llama_perplexity_windows(gguf_path, text: str, ctx: int, chunks: int) -> tuple[list[list[int]], bool]:
    """The windows llama-perplexity builds: llama.cpp tokenizes the text with add_special (BOS
    first when the vocabulary adds one), cuts chunks of ctx, and puts BOS over each chunk's first token;
    also whether the vocabulary adds BOS."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=ctx, vocab_only=True, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    toks = llm.tokenize(text.encode(), add_bos=True, special=False)
    out = []
    for i in range(min(chunks, len(toks) // ctx)):
        w = toks[i * ctx : (i + 1) * ctx]
        if add_bos:
            w[0] = llm.token_bos()
        out.append(w)
    return out, bool(add_bos)


@pytest.mark.parametrize("model", ["default", "phi3"])
def test_perplexity_windows_and_figure_equal_llama_perplexitys(model, default_model_path, tiny_factory, tmp_path):
    """On a vocabulary without BOS (the default model) and a SentencePiece one that adds BOS (the
    tiny Phi-3 written as GGUF): lmforge's windows are llama-perplexity's, token for token, and
    lmforge's perplexity of the GGUF's weights equals llama.cpp's own within 0.1%."""
    pytest.importorskip("llama_cpp")
    from lmforge.checkpoint import open_checkpoint
    from lmforge.evaluate import read_text, text_windows
    from lmforge.export.convert import convert
    from lmforge.export.gguf import convert_to_gguf
    from tests.llamacpp_ref import dequantized_gguf, llamacpp_perplexity

    if model == "default":
        gguf_path, ctx, chunks = dequantized_gguf(default_model_path, tmp_path / "f32.gguf"), 512, 2
    else:
        src = tiny_factory(("phi3", "float32", False, None))
        gguf_path, ctx, chunks = convert_to_gguf(src, tmp_path / "phi3.gguf", "f32", progress=False), 64, 6
    text = read_text(WIKITEXT)[:20000]
    ref, add_bos = llama_perplexity_windows(gguf_path, text, ctx, chunks)
    assert add_bos == (model == "phi3")
    assert text_windows(open_checkpoint(gguf_path).tokenizer(), text, ctx, chunks) == ref
    data = tmp_path / "text.txt"
    data.write_bytes(text.encode())
    folder = convert(gguf_path, tmp_path / "fp32", progress=False)
    ours = perplexity(folder, data=data, ctx=ctx, chunks=chunks, progress=False)
    theirs, n = llamacpp_perplexity(gguf_path, ref)
    assert n == ours.tokens_scored and abs(ours.ppl - theirs) / theirs < 1e-3, (ours.ppl, theirs)


def test_cli_ppl_and_kld(tiny_factory, tmp_path):
    from lmforge.export.convert import convert

    src = tiny_factory(("llama", "float32", False, None))
    fp32 = convert(src, tmp_path / "fp32", progress=False)
    int4 = convert(src, tmp_path / "int4", target="cpu-int4", progress=False)
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 120)
    r = run_cli("eval", "ppl", fp32, "--data", data, "--ctx", "64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens_scored"] == out["chunks"] * 31 and out["ppl"] > 1
    r = run_cli("eval", "kld", int4, "--ref", fp32, "--data", data, "--ctx", "64", "--json")
    kld = json.loads(r.stdout)
    assert kld["mean"] > 0 and 0.5 < kld["same_top"] <= 1 and kld["p99"] >= kld["mean"]
    r = run_cli("eval", "kld", fp32, "--ref", fp32, "--data", data, "--ctx", "64", "--json")
    assert json.loads(r.stdout)["mean"] < 1e-9
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_user_error(run_cli("eval", "ppl", fp32, "--data", short, "--ctx", "64"), "fewer than one window")
    assert_user_error(run_cli("eval", "ppl", fp32, "--data", tmp_path / "missing.txt"), "pass --data")


def test_kld_of_default_int4_against_fp32(tmp_path):
    """The transcoded int4 form of the default model against its fp32 form: KLD > 0 and the same
    top token almost everywhere (measured over 5 windows: mean 0.0031 nats, 97.1%)."""
    from lmforge.evaluate import kl_divergence
    from lmforge.export.convert import convert

    fp32 = convert("smollm2-135m", tmp_path / "fp32", progress=False)
    int4 = convert("smollm2-135m", tmp_path / "int4", target="cpu-int4", progress=False)
    r = kl_divergence(int4, fp32, data=WIKITEXT, chunks=2)
    assert 0 < r.mean < 0.05 and r.same_top > 0.9 and r.tokens_scored == 2 * 255


@pytest.mark.parametrize("model", ["default", "phi3"])
def test_perplexity_of_a_gguf_runs_llamacpp(model, default_model_path, tiny_factory, tmp_path):
    """`eval ppl FILE.gguf` measures the GGUF itself in llama.cpp (the default model's Q4_1 file,
    no BOS; a tiny Phi-3 GGUF that adds BOS): llama.cpp's own figure on llama-perplexity's windows
    within 0.1%, and the result says llama.cpp measured it; a target asks for onnxruntime. llama.cpp
    runs with its context defaults as llama-perplexity does (flash attention auto, on on CPU; f16 KV):
    the reference too (with flash attention off the Q4_1 figure is 0.44% lower)."""
    pytest.importorskip("llama_cpp")
    from lmforge.evaluate import read_text
    from lmforge.export.gguf import convert_to_gguf
    from tests.llamacpp_ref import llamacpp_perplexity

    if model == "default":
        gguf_path, ctx, chunks = default_model_path, 512, 2
    else:
        src = tiny_factory(("phi3", "float32", False, None))
        gguf_path, ctx, chunks = convert_to_gguf(src, tmp_path / "phi3.gguf", "f32", progress=False), 64, 6
    text = read_text(WIKITEXT)[:20000]
    data = tmp_path / "text.txt"
    data.write_bytes(text.encode())
    ours = perplexity(gguf_path, data=data, ctx=ctx, chunks=chunks, threads=2, progress=False)
    ref, _ = llama_perplexity_windows(gguf_path, text, ctx, chunks)
    theirs, n = llamacpp_perplexity(gguf_path, ref, flash_attn=True)
    assert ours.engine == "llama.cpp" and ours.to_dict()["engine"] == "llama.cpp"
    assert n == ours.tokens_scored and abs(ours.ppl - theirs) / theirs < 1e-3, (ours.ppl, theirs)
    if model == "phi3":
        assert perplexity(gguf_path, data=data, ctx=ctx, chunks=1, target="cpu-fp32", progress=False).engine == (
            "onnxruntime"
        )


def llamacpp_kl(model_path, ref_path, windows: list[list[int]]) -> dict:
    """KL(P_ref || P_model) from llama-cpp-python's logits of both files on the same windows
    (second halves scored, as llama-perplexity --kl-divergence), computed with torch."""
    import llama_cpp
    import torch

    ctx = len(windows[0])
    logits = []
    for path in (model_path, ref_path):
        llm = llama_cpp.Llama(
            str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=2, flash_attn=True, verbose=False
        )
        rows = []
        for w in windows:
            llm.reset()
            llm.eval(w)
            rows.append(torch.tensor(np.asarray(llm.scores[ctx // 2 : ctx - 1], dtype=np.float32)))
        logits.append(torch.log_softmax(torch.cat(rows).double(), dim=-1))
        del llm
    lp, lq = logits
    kl = torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1).numpy()
    same = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    return {"mean": kl.mean(), "p99": np.percentile(kl, 99), "same_top": same, "n": len(kl)}


@pytest.mark.slow
def test_kld_of_ggufs_runs_llamacpp(tiny_factory, tmp_path):
    """`eval kld A.gguf --ref B.gguf` computes both in llama.cpp (the rows say so) and gives what
    llama.cpp's own logits give: a tiny Llama as Q8_0 against its F32 file."""
    pytest.importorskip("llama_cpp")
    from lmforge.evaluate import kl_divergence, read_text
    from lmforge.export.gguf import convert_to_gguf

    src = tiny_factory(("llama", "float32", False, None))
    f32 = convert_to_gguf(src, tmp_path / "f32.gguf", "f32", progress=False)
    q8 = convert_to_gguf(src, tmp_path / "q8_0.gguf", "q8_0", progress=False)
    text = read_text(WIKITEXT)[:12000]
    data = tmp_path / "text.txt"
    data.write_bytes(text.encode())
    ctx, chunks = 64, 6
    ours = kl_divergence(q8, f32, data=data, ctx=ctx, chunks=chunks, threads=2)
    assert (ours.engine, ours.ref_engine) == ("llama.cpp", "llama.cpp")
    ref_windows, _ = llama_perplexity_windows(f32, text, ctx, chunks)
    theirs = llamacpp_kl(q8, f32, ref_windows)
    print(f"KL mean {ours.mean:.6g} vs {theirs['mean']:.6g}, p99 {ours.p99:.6g} vs {theirs['p99']:.6g}, "
          f"same top {ours.same_top:.4f} vs {theirs['same_top']:.4f}, {ours.tokens_scored} tokens")  # fmt: skip
    assert ours.tokens_scored == theirs["n"] and 0 < theirs["mean"]
    assert abs(ours.mean - theirs["mean"]) <= 0.02 * theirs["mean"], (ours.mean, theirs["mean"])
    assert abs(ours.p99 - theirs["p99"]) <= 0.05 * theirs["p99"], (ours.p99, theirs["p99"])
    assert abs(ours.same_top - theirs["same_top"]) <= 2 / theirs["n"], (ours.same_top, theirs["same_top"])
    r = run_cli("eval", "kld", q8, "--ref", f32, "--data", data, "--ctx", ctx, "--chunks", 1)
    assert r.returncode == 0 and "engines: llama.cpp (ref llama.cpp)" in r.stdout, r.stderr
