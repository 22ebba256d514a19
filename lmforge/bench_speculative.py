"""`lmforge bench --speculative`: lmforge's decode with speculation on (n-gram prompt lookup or a
draft model), measured beside its plain decode, with tokens per pass and per verify; the peers'
own n-gram speculation (llama-cpp-python's prompt lookup, onnxruntime-genai's n-gram strategy)
with their counts; and the grounded prompt (`--prompt grounded`) on which lookup can help: a
code-editing request over standard-library source, whose answer copies much of the prompt.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.errors import LmforgeError

PROMPTS = ("text", "grounded")
GROUNDED_REQUEST = "Add type hints to this Python code and return all of it, otherwise unchanged:\n\n```python\n{}\n```"


def _stdlib_source() -> list[str]:
    """Lines of real standard-library functions and classes (textwrap, shlex, json's encoder),
    which every install has."""
    import inspect
    import json.encoder
    import shlex
    import textwrap

    parts = (textwrap.indent, textwrap.dedent, shlex.quote, shlex.split, json.encoder.JSONEncoder, textwrap.TextWrapper)
    return "\n".join(inspect.getsource(x) for x in (*parts, shlex.shlex)).splitlines()


def grounded_ids(folder: Path, prompt_tokens: int) -> list[int]:
    """Token ids of a code-editing request over standard-library source, through the model's chat
    template where it has one: the most whole lines of source that keep it within PROMPT_TOKENS
    (cut to PROMPT_TOKENS when even the request alone is longer)."""
    from lmforge.chat import render_with, template_from_folder
    from lmforge.tokenizer import Tokenizer

    tok, template = Tokenizer.from_folder(folder), template_from_folder(folder)
    lines = _stdlib_source()

    def ids(n: int) -> list[int]:
        text = GROUNDED_REQUEST.format("\n".join(lines[:n]))
        if not template:
            return tok.encode(text, add_special=True)
        return tok.encode(render_with(template, tok, [{"role": "user", "content": text}]), parse_special=True)

    lo, hi = 0, len(lines)  # the most lines whose prompt fits: a bisection over the line count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= prompt_tokens else (lo, mid - 1)
    return ids(lo)[:prompt_tokens]


def check_speculative(mode: str, draft: str | None, draft_max: int, folder: Path) -> None:
    """User errors before anything is measured: an unknown mode, a draft length below 1, draft
    without a draft model, a draft model whose vocabulary is not the target's."""
    from lmforge.speculative import check_options

    check_options(mode, draft_max)
    if mode == "draft" and draft is None:
        raise LmforgeError("--speculative draft needs a draft model: give --draft MODEL")
    if draft is not None and mode != "draft":
        raise LmforgeError("--draft is used with --speculative draft; add it or leave --draft out")
    if mode == "draft":
        from lmforge.model import load

        load(folder, speculative="draft", draft=draft, draft_max=draft_max, threads=1)  # checks the vocabulary


def run_lmforge_speculative(path: str, ids: list[int], gen: int, reps: int, threads: int | None, options: dict):
    """The bench runner (see `lmforge.bench.RUNNERS`) for lmforge with speculation: the first
    token from the prefill, then `gen` more greedy tokens (no EOS stop) drafted and verified as
    `stream_generate` does. Each run returns its timings, tokens and speculation counts."""
    from lmforge.generate import stream_generate
    from lmforge.runtime.ort import OrtEngine
    from lmforge.sampling import SamplingParams
    from lmforge.speculative import SpecStats, Speculation

    t = time.perf_counter()
    engine = OrtEngine(path, threads=threads)
    load = time.perf_counter() - t
    if not engine.supports_verify:
        raise LmforgeError(f"{path} cannot verify drafts (a folder of an older format); convert it again")
    draft_engine = None
    if options["speculative"] == "draft":
        from lmforge.model import load as load_model

        draft_engine = load_model(options["draft"], threads=threads, speculative="off").engine
    spec = Speculation(options["speculative"], options["draft_max"], draft_engine)
    params = SamplingParams(max_tokens=gen + 1)

    def once():
        spec.stats = SpecStats()  # this run's counts (the learnt verify cost carries over, as in a server)
        t0, first, tokens = time.perf_counter(), 0.0, []
        for r in stream_generate(engine, None, ids, params, (), speculation=spec):
            first = first or time.perf_counter()
            tokens.append(r.token)
        s = spec.stats
        counts = {"passes": s.passes, "tokens": s.tokens, "verifies": s.verifies, "accepted": s.accepted}
        return first - t0, time.perf_counter() - first, first - t0, tokens, {**counts, "drafted": s.drafted}

    return load, once


def pooled_stats(runs: list[dict[str, int]]) -> dict:
    """Speculation counts summed over measured runs, and tokens per pass and per verify."""
    total: dict[str, int] = {}
    for counts in runs:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    out: dict = {**total, "tokens_per_pass": round(total["tokens"] / total["passes"], 2) if total["passes"] else 0.0}
    verifies = total["verifies"]
    out["tokens_per_verify"] = round((total["accepted"] + verifies) / verifies, 2) if verifies else 0.0
    return out


# ---- the peers' own speculation (with --vs): llama.cpp's prompt lookup, onnxruntime-genai's n-gram ----

LOOKUP_TOKENS = 10  # LlamaPromptLookupDecoding's num_pred_tokens (its default)
GENAI_NGRAM = {"ngram_size": 3, "max_draft_tokens": 8}


def genai_model(path: str, threads: int | None):
    """onnxruntime-genai's Model of `path` on the CPU with `threads` intra-op threads."""
    import json

    import onnxruntime_genai as og

    config = og.Config(path)
    config.clear_providers()
    if threads:  # the same thread count as the other runners
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def run_llamacpp_lookup(path: str, ids: list[int], gen: int, reps: int, threads: int | None, options: dict):
    """llama-cpp-python with `LlamaPromptLookupDecoding` through its own `generate` (greedy). It
    keeps no counts: passes are its eval calls after the prompt's, drafts the extra tokens they
    carry, accepted drafts the tokens beyond one per pass."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    t = time.perf_counter()
    draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS)
    # logits_all: a draft model makes the context keep every position's logits, but the Python side
    # sizes its score rows by this flag (n_batch rows without it: a longer sequence fails)
    llm = llama_cpp.Llama(
        path, n_ctx=len(ids) + gen + 8 + LOOKUP_TOKENS, n_batch=len(ids), n_threads=threads,
        n_threads_batch=threads, verbose=False, draft_model=draft, logits_all=True,
    )  # fmt: skip
    load = time.perf_counter() - t
    calls: list[int] = []
    evaluate = llm.eval
    llm.eval = lambda tokens: (calls.append(len(tokens)), evaluate(tokens))[1]  # counts its passes

    def once():
        llm.reset()  # no prefix kept from the last run
        calls.clear()
        t0, first, tokens = time.perf_counter(), 0.0, []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            first = first or time.perf_counter()
            tokens.append(int(token))
            if len(tokens) > gen:
                break
        passes = calls[1:]
        verifies = [n - 1 for n in passes if n > 1]
        counts = {"passes": len(passes), "tokens": gen, "verifies": len(verifies), "drafted": sum(verifies)}
        return first - t0, time.perf_counter() - first, first - t0, tokens, {**counts, "accepted": gen - len(passes)}

    return load, once


def genai_counts(generator) -> dict[str, int]:
    """Speculation counts of an onnxruntime-genai generator (`get_speculative_stats`): passes are
    its target passes and its plain fallback steps."""
    s = generator.get_speculative_stats()
    counts = {"passes": int(s["target_forward_passes"] + s["standard_fallback_steps"])}
    counts["verifies"] = int(s["target_verify_forward_passes"])
    return {**counts, "drafted": int(s["draft_tokens_evaluated"]), "accepted": int(s["draft_tokens_accepted"])}
