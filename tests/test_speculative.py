"""Speculative decoding and prefix reuse against plain decoding on the same engine: the cache a
verify and rollback leave, greedy tokens (default model and every architecture, ONNX Runtime and
llama.cpp), the sampled distribution (chi-square), the sampling options, prefix-reuse logits
against a fresh prefill, and the command line's options."""

import gc
import inspect
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lmforge.generate import PrefixCache, SequenceState, _open_cache, stream_generate
from lmforge.model import load
from lmforge.runtime.ort import OrtEngine
from lmforge.sampling import SamplingParams
from lmforge.speculative import DraftModelSpeculator, NgramIndex, SpecStats, Speculation, VerifyCost, expected_tokens
from lmforge.tokenizer import Tokenizer
from tests.test_errors import assert_user_error, run_cli

TOL = 1e-5  # relative to the largest magnitude compared


def _code_prompt() -> str:
    """A grounded request over a real standard-library function: the answer copies most of it."""
    src = textwrap.dedent(inspect.getsource(json.dumps))
    src = src[: src.index('"""')] + src[src.index('"""', src.index('"""') + 3) + 3 :]  # no docstring
    return "Add type hints to this Python function and return the whole function:\n\n" + src


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-30)
    assert err <= tol, err


def _run(engine, tok, ids, params, eos=None, speculation=None, logprobs=False):
    """(token, text, finish reason) per step; with `logprobs`, also each step's [(token, logprob)]."""
    return [
        (r.token, r.text, r.finish_reason) + (([(i.token, i.logprob) for i in r.logprobs],) if logprobs else ())
        for r in stream_generate(engine, tok, ids, params, eos, speculation=speculation)
    ]


def _assert_same_logprobs(got, want):
    """The same tokens and reported logprobs within 1e-4: a verify row's float32 logits are a
    decode row's to ~3e-5, not bit for bit."""
    assert [[t for t, _ in g[3]] for g in got] == [[t for t, _ in w[3]] for w in want]
    diff = max((abs(a - b) for g, w in zip(got, want) for (_, a), (_, b) in zip(g[3], w[3])), default=0.0)
    assert diff <= 1e-4, diff


def _llamacpp(path):
    pytest.importorskip("llama_cpp")
    from lmforge.runtime.llamacpp import LlamaCppEngine

    return LlamaCppEngine(path, threads=2, kv_type="f32")  # f32 cache: exact comparisons


# ---- verify k tokens in one pass, roll back the rejected ones ------------------------------


def _plain_then_verify(engine, ids, n=6, kept=3):
    """Greedy tokens and decode logits of plain decoding; then from a fresh cache, a verify of
    those tokens with the last n - kept replaced by wrong ones, rolled back to the kept ones."""
    plain = engine.new_cache(1, len(ids) + n + 2)
    rows = [engine.prefill(plain, [ids])[0]]
    toks = []
    for _ in range(n):
        toks.append(int(rows[-1].argmax()))
        rows.append(engine.decode(plain, [toks[-1]])[0])
    spec = engine.new_cache(1, len(ids) + n + 2)
    engine.prefill(spec, [ids])
    drafted = toks[:kept] + [(t + 1) % engine.vocab_size for t in toks[kept:]]
    verified = engine.verify(spec, drafted)
    for i in range(kept):  # each row: the logits after the drafted tokens so far
        _close(verified[i], rows[i + 1])
    engine.truncate(spec, 0, len(ids) + kept)
    return plain, spec, toks, rows


def test_ort_verify_and_rollback_leave_the_cache_of_plain_decoding(default_onnx):
    engine = OrtEngine(default_onnx)
    ids = Tokenizer.from_folder(default_onnx).encode(_code_prompt())[:200]
    plain, spec, toks, rows = _plain_then_verify(engine, ids)
    n = len(ids) + 3
    assert int(spec.lengths[0]) == n
    for a, b in zip(spec.buffers, plain.buffers):  # every layer's K and V, positions kept
        _close(a.numpy()[:, :, :n], b.numpy()[:, :, :n])
    _close(engine.decode(spec, [toks[3]])[0], rows[4])  # and decoding goes on as plain decoding did


def test_llamacpp_verify_and_rollback_leave_the_cache_of_plain_decoding(default_model_path):
    import llama_cpp

    engine = _llamacpp(default_model_path)
    ids = load(default_model_path, engine="ort", speculative="off").prompt_ids(_code_prompt(), raw=True)[:200]
    plain, spec, toks, rows = _plain_then_verify(engine, ids)
    n = len(ids) + 3
    mem = llama_cpp.llama_get_memory(engine.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == n - 1  # seq_rm removed the rejected cells
    _close(engine.decode(spec, [toks[3]])[0], rows[4])


# ---- greedy output: token for token ---------------------------------------------------------


class FixedCost(VerifyCost):
    """The cost model's prior, not learnt from timings: which drafts are tried then depends on the
    text alone, not on how busy the machine is."""

    def observe(self, m: int, seconds: float) -> None:
        pass


def _greedy_identity(engine, tok, ids, n=96):
    params = SamplingParams(max_tokens=n)
    spec = Speculation(cost=FixedCost())
    plain = _run(engine, tok, ids, params, ())
    assert _run(engine, tok, ids, params, (), spec) == plain
    assert spec.stats.verifies > 0 and spec.stats.passes < len(plain)
    return spec.stats


def test_greedy_is_plain_decoding_on_the_default_model_ort(default_onnx):
    tok = Tokenizer.from_folder(default_onnx)
    engine = OrtEngine(default_onnx)
    stats = _greedy_identity(engine, tok, tok.encode(_code_prompt()))
    assert stats.tokens_per_pass > 1.3, stats  # a grounded request: most of the answer is drafted


@pytest.mark.slow
def test_greedy_is_plain_decoding_on_the_default_model_llamacpp(default_model_path):
    m = load(default_model_path, engine="ort", speculative="off")
    _greedy_identity(_llamacpp(default_model_path), m.tokenizer, m.prompt_ids(_code_prompt()), 64)


ARCHS = ["llama", "mistral", "qwen2", "phi3", "gemma3"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_plain_decoding_on_every_architecture(arch, tiny_factory, tmp_path):
    """Tiny random models repeat themselves: drafts are kept and rejected; both engines."""
    from lmforge.export.convert import convert
    from lmforge.export.gguf import convert_to_gguf

    src = tiny_factory((arch, "float32", False, None))
    folder = convert(src, tmp_path / "onnx", target="cpu-fp32", progress=False)
    engine = OrtEngine(folder)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, engine.vocab_size, 12)] * 3
    _greedy_identity(engine, None, ids, 64)
    pytest.importorskip("llama_cpp")
    _greedy_identity(_llamacpp(convert_to_gguf(src, tmp_path / "t.gguf", "f32", progress=False)), None, ids, 64)


# ---- sampling: the target's distribution ----------------------------------------------------


def _chi2_homogeneity(a: list, b: list) -> tuple[float, float]:
    """Pearson's chi-square statistic of two samples over their outcomes (cells with fewer than
    10 pooled), and its 0.999 quantile (Wilson-Hilferty) for the degrees of freedom."""
    keys = sorted(set(a) | set(b))
    counts = np.array([[a.count(k) for k in keys], [b.count(k) for k in keys]], dtype=np.float64)
    rare = counts.sum(0) < 10
    if rare.any():
        counts = np.concatenate([counts[:, ~rare], counts[:, rare].sum(1, keepdims=True)], axis=1)
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = counts.shape[1] - 1
    return stat, df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3


class _Fixed(VerifyCost):
    """A verify cost that does not learn from this loaded test machine's timings."""

    def observe(self, m: int, seconds: float) -> None:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ort", "llamacpp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_keeps_the_target_distribution(arch, kind, tiny_factory, tmp_path):
    """Seeded runs of the first three tokens, speculative against plain (other seeds), for every
    architecture fixture on both engines: the drafts (continuations of the prompt's 2-grams,
    favoured by logit_bias) are kept and rejected often, and the joint distribution passes a
    chi-square test; each seed also draws the very tokens plain decoding does."""
    src = tiny_factory((arch, "float32", False, None))
    if kind == "ort":
        from lmforge.export.convert import convert

        engine = OrtEngine(convert(src, tmp_path / "onnx", "cpu-fp32", progress=False))
    else:
        pytest.importorskip("llama_cpp")
        from lmforge.export.gguf import convert_to_gguf

        engine = _llamacpp(convert_to_gguf(src, tmp_path / "t.gguf", "f32", progress=False))
    words = [11, 22, 33, 44]
    a, b, c, d = words
    ids = [a, a, b, a, c, a, d, b, b, c, b, d, c, c, d, d, a] * 2  # every pair of words follows another
    base = dict(max_tokens=3, temperature=1.0, top_k=6, logit_bias={w: 8.0 for w in words})
    spec = Speculation(cost=_Fixed(slope=0.01))  # always worth drafting: every draft is tested
    n = 400

    def first(seed, speculation=None):
        params = SamplingParams(seed=seed, **base)
        return tuple(t for t, *_ in _run(engine, None, ids, params, (), speculation))

    mine = [first(s, spec) for s in range(n)]
    theirs = [first(s) for s in range(n, 2 * n)]
    assert spec.stats.accepted > 50 and spec.stats.drafted - spec.stats.accepted > 50, spec.stats
    stat, limit = _chi2_homogeneity(mine, theirs)
    assert stat < limit, (stat, limit)
    assert mine[:50] == [first(s) for s in range(50)]


# ---- every sampling option behaves as in plain decoding -------------------------------------


@pytest.mark.slow
def test_penalties_bias_stops_and_logprobs_match_plain_decoding(default_onnx):
    m = load(default_onnx, speculative="off")
    engine, tok, ids = m.engine, m.tokenizer, m.prompt_ids(_code_prompt())
    for options in (
        dict(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3, logit_bias={25: 2.0}),
        dict(stop=["return"], logprobs=True, top_logprobs=3),
        dict(temperature=0.8, top_p=0.9, seed=7),
    ):
        params = SamplingParams(max_tokens=48, **options)
        spec = Speculation()
        got, want = _run(engine, tok, ids, params, None, spec, True), _run(engine, tok, ids, params, logprobs=True)
        assert [g[:3] for g in got] == [w[:3] for w in want], options
        _assert_same_logprobs(got, want)
        assert spec.stats.verifies > 0


def test_a_constraint_falls_back_to_plain_decoding(default_onnx):
    tok = Tokenizer.from_folder(default_onnx)
    engine = OrtEngine(default_onnx)
    ids = tok.encode('Give a JSON object with a key "a": {"a": 1}, {"a": 1}, {"a": 1}, ')
    params = SamplingParams(max_tokens=24, json_schema={"type": "object"})
    spec = Speculation()
    assert _run(engine, tok, ids, params, None, spec) == _run(engine, tok, ids, params)
    assert spec.stats.passes == 0


# ---- prefix reuse ---------------------------------------------------------------------------


def _prefix_logits(engine, first: list[int], second: list[int], max_tokens: int = 8):
    """The first step's logits of `second` after a call on `first` left its cache, and the
    prompt tokens taken from that cache."""
    prefix = PrefixCache()
    list(stream_generate(engine, None, first, SamplingParams(max_tokens=max_tokens), (), prefix))
    state = SequenceState(None, second, SamplingParams(max_tokens=8), ())
    cache, n = _open_cache(engine, state, prefix)
    return engine.prefill(cache, [second[n:]])[0], n


@pytest.mark.parametrize("kind", ["ort", "ort-int4", pytest.param("llamacpp", marks=pytest.mark.slow)])
def test_prefix_reuse_logits_equal_a_fresh_prefill(kind, default_onnx, default_model_path, int4_folder):
    """Also on the int8-compute int4 form, whose one-row passes round unlike several: the part
    prefilled after the reused prefix is never a single token, and generated tokens (written by
    one-row decodes) are reused only where decoding writes what prefill would (fp32 ORT)."""
    engines = {"ort": lambda: OrtEngine(default_onnx), "ort-int4": lambda: OrtEngine(int4_folder)}
    engine = engines.get(kind, lambda: _llamacpp(default_model_path))()
    ids = Tokenizer.from_folder(default_onnx).encode(_code_prompt())
    for first, second, shared in ((ids[:120], ids[:100] + ids[130:160], 100), (ids[:90], ids[:90], 88)):
        logits, reused = _prefix_logits(engine, first, second)
        assert reused == shared
        _close(logits, engine.prefill(engine.new_cache(1, 200), [second])[0])
    reply = [r.token for r in stream_generate(engine, None, ids[:60], SamplingParams(max_tokens=24), ())]
    second = ids[:60] + reply + ids[130:140]  # a chat's next turn: the reply is in the shared prefix
    logits, reused = _prefix_logits(engine, ids[:60], second, max_tokens=24)
    assert reused == (60 + 23 if kind == "ort" else 60)  # decoded KV is reused only where exact
    _close(logits, engine.prefill(engine.new_cache(1, 200), [second])[0])


def test_speculation_is_on_by_default_only_where_verify_is_exact(default_onnx, int4_folder):
    assert load(default_onnx).speculation.mode == "ngram"
    int4 = load(int4_folder)
    assert not int4.engine.exact_verify and int4.speculation is None
    assert load(int4_folder, speculative="ngram").speculation.mode == "ngram"


@pytest.mark.parametrize("form", ["fp32", "int4"])
def test_a_growing_chat_prefills_only_the_new_turn(form, default_onnx, int4_folder):
    """On int4 (inexact verify) the replies, decoded one row at a time, are prefilled again."""
    folder = default_onnx if form == "fp32" else int4_folder
    m, fresh = load(folder), load(folder, prefix_reuse=False)
    chat = [{"role": "user", "content": "Name three colours."}]
    for turn in ("And three animals?", "Which of those animals is the largest?"):
        reply = m.chat(chat, max_tokens=24)
        assert reply == fresh.chat(chat, max_tokens=24)
        chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": turn}]
    assert m.chat(chat, max_tokens=4) == fresh.chat(chat, max_tokens=4)
    whole = len(m.prompt_ids(messages=chat))
    assert m.prefix.reused > 0.6 * whole and m.last.prompt_tokens == whole


def test_a_draft_model_with_the_targets_vocabulary(default_onnx, tiny_factory):
    """A tiny random Llama with SmolLM2's tokenizer drafts for the default model: greedy output
    stays plain decoding's, drafts are verified."""
    draft = tiny_factory(("llama", "float32", False, None))
    m = load(default_onnx, draft=draft, draft_max=4)
    assert m.speculation.mode == "draft"
    params = SamplingParams(max_tokens=32)
    ids = m.prompt_ids("Repeat this list: " + "alpha beta gamma delta " * 5)  # within the draft's context
    spec = m.speculation
    assert _run(m.engine, m.tokenizer, ids, params, None, spec) == _run(m.engine, m.tokenizer, ids, params)
    assert spec.stats.verifies > 0
    long = m.prompt_ids(_code_prompt())  # past the draft model's context of 256: no drafts, same text
    assert _run(m.engine, m.tokenizer, long, params, None, spec) == _run(m.engine, m.tokenizer, long, params)


def _wide_draft(base, folder, extra=64):
    """`base` (a tiny checkpoint with SmolLM2's tokenizer) with `extra` padding rows of logits,
    named [PAD<id>] as in a tokenizer read from a GGUF, the real tokens' rows zeroed: every
    draft is a padding id, past the target's logits."""
    import torch
    import transformers as T

    config = T.AutoConfig.from_pretrained(base)
    n = config.vocab_size
    config.vocab_size = n + extra
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[:n] = 0
        head[n + extra // 2 :] = -head[n : n + extra // 2]  # w and -w: one of them scores >= 0
    model.save_pretrained(folder)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, folder / f.name)
    tok = json.loads((folder / "tokenizer.json").read_text())
    pads = [{"id": i, "content": f"[PAD{i}]", "special": True} for i in range(n, n + extra)]
    tok["added_tokens"] += [
        {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, **p} for p in pads
    ]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    return folder


def test_a_draft_model_with_wider_logits_and_the_same_tokens(default_onnx, tiny_factory, tmp_path):
    """Qwen2.5-0.5B (151936 logits) drafts for 7B (152064): the same tokens, padding rows apart.
    Drafted ids past the target's logits are cut off, so the output stays plain decoding's."""
    draft = _wide_draft(tiny_factory(("llama", "float32", False, None)), tmp_path / "wide")
    m = load(default_onnx, draft=draft, draft_max=4)
    assert m.speculation.mode == "draft" and m.speculation.draft_engine.vocab_size == m.engine.vocab_size + 64
    assert load(draft).tokenizer.hf.get_vocab()["[PAD49200]"] == 49200
    ids = m.prompt_ids("Repeat this list: " + "alpha beta gamma delta " * 5)
    params = SamplingParams(max_tokens=16)
    assert _run(m.engine, m.tokenizer, ids, params, None, m.speculation) == _run(m.engine, m.tokenizer, ids, params)


def test_llamacpp_drafts_fit_one_batch(default_model_path, default_onnx):
    """--draft-max past llama.cpp's n_batch: a draft and its pending token fill one batch at most
    (the model drafting for itself: every draft is kept, so drafts grow to the ceiling)."""
    engine, own = _llamacpp_batch(default_model_path, 4), _llamacpp_batch(default_model_path, 4)
    ids = Tokenizer.from_folder(default_onnx).encode("Count from one to fifty: one, two, three,")
    params = SamplingParams(max_tokens=32)
    spec = Speculation("draft", 600, own)
    assert _run(engine, None, ids, params, (), spec) == _run(engine, None, ids, params, ())
    stats = spec.stats
    assert stats.verifies and stats.accepted == stats.drafted <= 3 * stats.verifies  # n_batch - 1 at most


def _llamacpp_batch(path, n_batch):
    pytest.importorskip("llama_cpp")
    from lmforge.runtime.llamacpp import LlamaCppEngine

    return LlamaCppEngine(path, threads=2, kv_type="f32", n_batch=n_batch)


def test_llamacpp_prefix_cache_outlives_other_users_of_the_engine(default_model_path):
    """llama.cpp has one live cache: score() or another call between two calls, or a generator
    left open and collected later, never make the kept prefix fail or clobber the newer one."""
    pytest.importorskip("llama_cpp")
    from lmforge.errors import LmforgeError

    m = load(default_model_path, engine="llamacpp", threads=2)
    ids = m.tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown fox")
    params = SamplingParams(max_tokens=8)
    list(m.stream_generate(ids, params))
    m.engine.score(ids[:5])  # clears the context the kept cache was in
    assert list(m.stream_generate(ids + [13], params))[-1].finish_reason and m.prefix.reused == 0
    old = m.prefix.cache
    m.engine.new_cache(1, 64)
    with pytest.raises(LmforgeError, match="earlier request"):
        m.engine.truncate(old, 0, 0)
    left_open = m.stream_generate(ids, params)
    next(left_open)
    list(m.stream_generate(ids[:6], params))
    newer = m.prefix.cache
    del left_open
    gc.collect()
    assert m.prefix.cache is newer and m.prefix.tokens == ids[:6]
    assert list(m.stream_generate(ids[:6] + [13, 14], params))[-1].finish_reason and m.prefix.reused == 6


# ---- drafter internals and the command line ------------------------------------------------


def test_ngram_index_finds_the_latest_longest_match():
    idx = NgramIndex()
    tokens = [1, 2, 3, 9, 1, 2, 4, 7, 5, 2, 3]
    idx.extend(tokens)
    assert idx.lookup(3) == (2, [9, 1, 2])  # "2 3" occurred once before, followed by 9 1 2
    tokens += [8, 1, 2]
    idx.extend(tokens)
    assert idx.lookup(2) == (2, [4, 7])  # the latest "1 2" (before this one) went on with 4
    tokens += [6]
    idx.extend(tokens)
    assert idx.lookup(4) == (0, [])  # "6" came once before, alone: a 1-gram match drafts nothing
    tokens += [1, 2, 3, 9, 1]  # "1 2 3 9 1" came at the start (order 5): it wins over later, shorter matches
    idx.extend(tokens)
    assert idx.lookup(2) == (5, [2, 4])
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0


def test_the_benchmarks_ceiling_replays_perfect_drafts():
    """benchmarks/speculative.py's ceilings: for each pass, the drafts that perfect-length lookup
    (and an oracle over any earlier stretch) would keep on a known answer."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative.py"
    spec = importlib.util.spec_from_file_location("bench_speculative_script", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ids, out = [5, 6, 7, 8, 9], [5, 6, 7, 1, 8, 9, 5, 6]
    kept = bench.perfect_drafts([(ids, out)])
    # lookup: "9 5" unseen; "5 6" goes on with 7 (kept), then 8 (out: 1); "7 1", "1 8" unseen; "8 9"
    # goes on with 5 (kept) and the pass's own token is the last one
    assert kept["lookup"] == [0, 1, 0, 0, 1]
    assert kept["any"] == [2, 3]  # "6 7" (then 1 from the target), "8 9 5" (then 6)
    assert all(sum(k + 1 for k in ks) == len(out) - 1 for ks in kept.values())


def test_ngram_drafts_keep_what_copying_a_passage_taught():
    """A sequence whose last draft was kept whole has an acceptance rate of its own: a rejected
    draft shortens the next draft, and the next draft kept whole brings back longer ones without
    learning them again."""
    spec = Speculation("ngram", draft_max=8, cost=VerifyCost(slope=0.3))
    text = list(range(100, 400))
    tokens = text + text[:8]  # copying the passage from its start
    sp = spec.start(tokens, 1000)

    def verify(kept: int | None = None) -> int:
        d = sp.draft(tokens, 16)
        assert d == text[len(tokens) - 300 : len(tokens) - 300 + len(d)]  # the passage goes on
        sp.update(len(d), len(d) if kept is None else kept, 0.01)
        tokens.extend(d + [text[len(tokens) + len(d) - 300]])  # (the target's token, as if it agreed)
        return len(d)

    assert [verify() for _ in range(8)][-3:] == [8, 8, 8]  # up to the draft_max
    assert verify(kept=1) == 8 and sp.copying == 0  # 1 of 8 kept
    after_miss = verify()
    assert after_miss < 8 and sp.copying == 1
    assert verify() > after_miss  # copying again: longer drafts at once, without learning again


def test_cli_speculative_options(default_onnx, tiny_factory):
    r = run_cli("run", default_onnx, "-p", "Repeat: a b c d e f a b c d e f", "--max-tokens", "16", "-v")
    assert r.returncode == 0, r.stderr
    assert "per verify" in r.stderr and "prefix reuse" in r.stderr
    off = run_cli(
        "run", default_onnx, "-p", "Repeat: a b c d e f a b c d e f", "--max-tokens", "16", "--speculative", "off", "-v"
    )
    assert off.stdout == r.stdout and "speculative: off" in off.stderr
    assert_user_error(run_cli("run", default_onnx, "-p", "hi", "--draft-max", "0"), "--draft-max", ">= 1")
    assert_user_error(run_cli("run", default_onnx, "-p", "hi", "--speculative", "draft"), "--draft MODEL")
    other = tiny_factory(("phi3", "float32", False, None))  # a SentencePiece vocabulary
    assert_user_error(run_cli("run", default_onnx, "-p", "hi", "--draft", other), "another vocabulary")


def test_a_llamacpp_drafter_whose_cache_was_taken_starts_a_new_one(default_model_path):
    """llama.cpp's one context serves its newest cache: a drafter whose cache a later drafter
    took over drafts on a new one, the same tokens a fresh drafter drafts (it raised)."""
    engine = _llamacpp(default_model_path)
    tokens = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 504, 3458]

    def drafter():
        return DraftModelSpeculator(engine, tokens, 64, 4, VerifyCost(), SpecStats())

    a = drafter()
    first = a.draft(tokens, 4)
    assert first  # the cost model's prior drafts on a fresh drafter
    b = drafter()  # its new_cache clears a's
    assert b.draft(tokens, 4) == first
    assert a.draft(tokens + first[:1], 4) == drafter().draft(tokens + first[:1], 4)
