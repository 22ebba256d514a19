"""Speculative decoding against plain decoding and the peers' own speculation, on the default
model, greedy, 2 threads, four workloads built from the standard library and WikiText (no
downloads):

  code     "add type hints to this function" over real standard-library functions
  extract  extraction and summary that quotes a WikiText passage
  chat     a 6-turn chat about a standard-library function whose turns refer back to earlier ones
  open     open-ended continuation (nothing to look up)

Runners, each in its own process per workload, with their threads' default waiting (all spin:
ONNX Runtime's default for lmforge and onnxruntime-genai, OpenMP's for llama.cpp; `--passive`:
OMP_WAIT_POLICY=PASSIVE for llama.cpp and allow_spinning=0 for lmforge, for a loaded machine,
where spinning collapses; onnxruntime-genai keeps its default), interleaved round by round: lmforge
plain (`--speculative off`), n-gram, and with a draft model (the target's first DRAFT_LAYERS
layers, its norm and head: no smaller checkpoint with its vocabulary ships here), on `--target`
(cpu-int4, the exact transcode of the Q4_1 GGUF; or cpu-fp32); llama-cpp-python on the GGUF, plain
and with `LlamaPromptLookupDecoding`; onnxruntime-genai on its own builder's int4 model, plain and
with its n-gram strategy. Every runner gets the same prompt tokens (lmforge's tokenizer and chat
template). Prints decode tok/s, tokens per forward pass, TTFT per chat turn, each runner's ratio to
lmforge plain, and whether its text equals lmforge plain's; then how far lookup could go on lmforge
plain's answers (`perfect_drafts`) at the verify cost lmforge-ngram measured.

    python benchmarks/speculative.py [--gen-tokens 128] [--rounds 2] [--threads 2] [--target cpu-int4]

Writes benchmarks/results/speculative{,-cpu-fp32}.{md,json}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
RUNNERS = (
    "lmforge-plain",
    "lmforge-ngram",
    "lmforge-draft",
    "llamacpp-plain",
    "llamacpp-lookup",
    "ortgenai-plain",
    "ortgenai-ngram",
)
DRAFT_LAYERS = 8  # the draft model: the target's first layers, its norm and head
WORKLOADS = ("code", "extract", "chat", "open")
CHAT_TURN_TOKENS = 48
SPIN = "session.intra_op.allow_spinning"


def _source(fn) -> str:
    """A standard-library function's source without its docstring."""
    src = textwrap.dedent(inspect.getsource(fn))
    if '"""' in src:
        a = src.index('"""')
        src = src[:a] + src[src.index('"""', a + 3) + 3 :]
    return src


def _wiki_passage() -> str:
    text = WIKITEXT.read_text(encoding="utf-8")
    start = text.index(" = Robert Boulter = ")
    return text[start : start + 1500].strip()


def workloads() -> dict[str, list[str]]:
    """{workload: user turns} (one turn except the chat)."""
    import json as json_mod
    import shlex

    code = _source(shlex.quote), _source(json_mod.dumps)
    chat_src = _source(textwrap.indent)
    return {
        "code": [f"Add type hints to this function and return the whole function:\n\n{s}" for s in code],
        "extract": [
            "Read this passage and list every date, place and person it names, quoting the sentence each comes "
            f"from; then summarise it in two sentences.\n\n{_wiki_passage()}"
        ],
        "chat": [
            f"Here is a Python function:\n\n{chat_src}\nWhat does it do?",
            "Quote the line of the function that decides which lines get the prefix.",
            "Rewrite the function with type hints, keeping its body as it is.",
            "In your rewrite, what is the name of the inner function? Quote its definition.",
            "Repeat the first line of the function I gave you at the start.",
            "Now give the whole function again, with a docstring added.",
        ],
        "open": ["Write a short story about a lighthouse keeper who finds a strange map. Be imaginative."],
    }


# ---- runners (each in its own process) ------------------------------------------------------


def _generate_lmforge(model, ids, n):
    from lmforge.sampling import SamplingParams

    t0, first, toks = time.perf_counter(), None, []
    for r in model.stream_generate(ids, SamplingParams(max_tokens=n)):
        first = first or time.perf_counter()
        if r.token not in model.eos_token_ids:
            toks.append(r.token)
    return toks, first - t0, time.perf_counter() - first


def _generate_llamacpp(llm, ids, n, eos):
    t0, first, toks = time.perf_counter(), None, []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):  # reuses the cached prefix
        first = first or time.perf_counter()
        if t in eos or len(toks) >= n:
            break
        toks.append(int(t))
    return toks, first - t0, time.perf_counter() - first


def _generate_genai(og, model, ids, n, ngram, eos, stats):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    if ngram:
        params.set_speculative_options(ngram_size=3, max_draft_tokens=8)
    gen = og.Generator(model, params)
    t0, first, toks = time.perf_counter(), None, []
    gen.append_tokens(ids)
    while not gen.is_done() and len(toks) < n:
        gen.generate_next_token()
        first = first or time.perf_counter()
        t = int(gen.get_next_tokens()[0])
        if t in eos:
            break
        toks.append(t)
    if ngram:
        s = gen.get_speculative_stats()
        stats["passes"] += s["target_forward_passes"]
    else:
        stats["passes"] += len(toks)
    return toks, first - t0, time.perf_counter() - first


def _make_runner(runner: str, job: dict, stats: dict):
    """A function ids -> (tokens, ttft s, decode s) for `runner`."""
    from lmforge.model import load

    n, threads = job["gen_tokens"], job["threads"]
    if runner.startswith("lmforge"):
        mode = {"lmforge-plain": "off", "lmforge-ngram": "ngram", "lmforge-draft": "draft"}[runner]
        config = {SPIN: "0"} if job.get("passive") else None  # on a shared machine spinning collapses (FACTS)
        draft = job["draft"] if mode == "draft" else None
        m = load(job["folder"], threads=threads, speculative=mode, session_config=config, draft=draft)
        stats["model"] = m
        return lambda ids: _generate_lmforge(m, ids, n)
    eos = set(job["eos"])
    if runner.startswith("llamacpp"):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if runner.endswith("lookup") else None
        # with a draft model its eval writes every position's logits into `scores`, which has only
        # n_batch rows unless logits_all: past 512 positions it fails ("could not broadcast")
        llm = Llama(
            job["gguf"], n_threads=threads, n_ctx=4096, verbose=False, draft_model=draft, logits_all=draft is not None
        )
        return lambda ids: _generate_llamacpp(llm, ids, n, eos)
    import onnxruntime_genai as og

    model = og.Model(job["genai"])
    return lambda ids: _generate_genai(og, model, ids, n, runner.endswith("ngram"), eos, stats)


def worker(runner: str, workload: str, job: dict) -> dict:
    """Run one workload (all its turns) with one runner; figures and the generated tokens."""
    from lmforge.model import load

    prompts = load(job["folder"], speculative="off", prefix_reuse=False)  # the template and tokenizer only
    stats = {"passes": 0}
    run = _make_runner(runner, job, stats)
    run(prompts.prompt_ids("Say hello.")[:16])  # warm-up
    stats["passes"] = 0
    spec = stats["model"].speculation if "model" in stats else None
    if spec is not None:
        from lmforge.speculative import SpecStats

        spec.stats = SpecStats()
    messages, out, ttfts, decode_s, n_tok = [], [], [], 0.0, 0
    for turn in job["workloads"][workload]:
        messages.append({"role": "user", "content": turn})
        toks, ttft, dec = run(prompts.prompt_ids(messages=messages))
        messages.append({"role": "assistant", "content": prompts.tokenizer.decode(toks)})
        out.append(toks)
        ttfts.append(ttft)
        decode_s += dec
        n_tok += max(len(toks) - 1, 0)
    n_all = sum(len(t) for t in out)
    tpp = n_all / stats["passes"] if stats["passes"] else None  # onnxruntime-genai's count
    extra = {}
    if runner.startswith("lmforge"):
        tpp = spec.stats.tokens_per_pass if spec is not None else 1.0
        if spec is not None:
            extra["slope"] = spec.cost.slope  # a verify of m tokens costs 1 + slope * (m - 1) decodes
        else:
            prompts_ids = [prompts.prompt_ids(messages=messages[: 2 * i + 1]) for i in range(len(out))]
            extra["kept"] = perfect_drafts(list(zip(prompts_ids, out)))
    return {
        "runner": runner,
        "workload": workload,
        "decode_tps": n_tok / decode_s if decode_s else 0.0,
        "tokens_per_pass": tpp,
        "ttft_ms": [round(t * 1000, 1) for t in ttfts],
        "tokens": out,
        **extra,
    }


def perfect_drafts(turns: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    """How far speculation could go on plain decoding's own answers: for each verify pass, the
    drafted tokens it keeps when the draft has the perfect length, under two drafters: lmforge's
    n-gram lookup (the continuation of the sequence's longest earlier n-gram match), and an oracle
    that picks any earlier stretch of the sequence (a bound for every prompt-lookup drafter).
    The answer's first token comes from the prefill, and each pass's last token from the target:
    the passes yield the answer's other tokens, Σ (kept + 1) of them."""
    from lmforge.speculative import NgramIndex

    kept = {"lookup": [], "any": []}
    for ids, out in turns:  # a pass at out[i] keeps n drafts and adds the target's out[i + n]
        index, i = NgramIndex(), 1
        while i < len(out):
            index.extend(ids + out[:i])
            cont, want = index.lookup(len(out) - 1 - i)[1], out[i:-1]
            n = next((j for j, (a, b) in enumerate(zip(cont, want)) if a != b), min(len(cont), len(want)))
            kept["lookup"].append(n)
            i += n + 1
        i = 1
        while i < len(out):
            seen = "".join(map(chr, ids + out[:i]))  # token ids as characters: str.find does the search
            ahead, n = "".join(map(chr, out[i:-1])), 0
            while n < len(ahead) and seen.find(ahead[: n + 1]) >= 0:
                n += 1
            kept["any"].append(n)
            i += n + 1
    return kept


# ---- the parent: prepare, interleave, report ------------------------------------------------


def truncated_draft(gguf: Path, tmp: Path, target: str, layers: int = DRAFT_LAYERS) -> Path:
    """A draft model with the target's vocabulary: the target's first `layers` layers with its
    final norm and head (no smaller checkpoint of the default model's vocabulary ships here)."""
    from safetensors.numpy import load_file, save_file

    from lmforge.export.convert import convert
    from lmforge.export.hf import convert_to_hf

    hf, cut = convert_to_hf(gguf, tmp / "hf"), tmp / f"hf-{layers}-layers"
    cut.mkdir()
    for f in hf.iterdir():
        if f.name == "config.json":
            config = json.loads(f.read_text())
            (cut / f.name).write_text(json.dumps(config | {"num_hidden_layers": layers}))
        elif f.suffix == ".safetensors":
            kept = {k: v for k, v in load_file(f).items() if not k.startswith("model.layers.") or _layer(k) < layers}
            save_file(kept, cut / f.name, metadata={"format": "pt"})
        else:
            (cut / f.name).write_bytes(f.read_bytes())
    return convert(cut, tmp / f"draft-{target}", target=target, progress=False)


def _layer(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.N.…


def prepare(tmp: Path, gen_tokens: int, threads: int, target: str) -> dict:
    from lmforge.bench import _genai_folder
    from lmforge.checkpoint import resolve
    from lmforge.export.convert import convert
    from lmforge.model import load

    gguf = resolve("smollm2-135m")
    folder = convert("smollm2-135m", tmp / target, target=target, progress=False)
    eos = list(load(folder, speculative="off").eos_token_ids)
    return {
        "folder": str(folder),
        "draft": str(truncated_draft(Path(gguf), tmp, target)),
        "gguf": str(gguf),
        "genai": str(_genai_folder(gguf)),
        "eos": eos,
        "gen_tokens": gen_tokens,
        "threads": threads,
        "workloads": workloads(),
    }


def run_all(job: dict, rounds: int, runners) -> list[dict]:
    """Every (runner, workload) once per round, each in a fresh process, runners interleaved."""
    path = Path(job["tmp"]) / "job.json"
    path.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(ROOT)}
    if job.get("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    results = []
    for r in range(rounds):
        for workload in WORKLOADS:
            for runner in runners:
                cmd = [sys.executable, __file__, "--worker", runner, workload, str(path)]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    print(f"{runner} {workload}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                res["round"] = r
                results.append(res)
                print(f"round {r + 1} {workload:8s} {runner:16s} {res['decode_tps']:6.1f} tok/s", file=sys.stderr)
    return results


def report(results: list[dict], runners, args) -> str:
    """A markdown table: mean decode tok/s over rounds, ratio to lmforge plain, tokens per pass,
    TTFT per turn (chat) and whether the text equals lmforge plain's."""
    lines = [
        f"# Speculative decoding: default model (lmforge {args.target}), greedy, {args.threads} threads, up to "
        f"{args.gen_tokens} tokens "
        f"per answer ({CHAT_TURN_TOKENS} per chat turn), {args.rounds} round(s) interleaved, threads "
        f"{'sleeping (--passive)' if args.passive else 'spinning (each runner default)'}",
        "",
        "| workload | runner | decode tok/s | x lmforge plain | tokens/pass | TTFT ms per turn | same text |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for w in WORKLOADS:
        rows = {r: [x for x in results if x["workload"] == w and x["runner"] == r] for r in runners}
        base = rows.get("lmforge-plain") or []
        base_tps = sum(x["decode_tps"] for x in base) / len(base) if base else 0.0
        for r, xs in rows.items():
            if not xs:
                continue
            tps = sum(x["decode_tps"] for x in xs) / len(xs)
            tpp = [x["tokens_per_pass"] for x in xs if x["tokens_per_pass"]]
            same = "yes" if base and xs[0]["tokens"] == base[0]["tokens"] else "no"
            ttft = "/".join(f"{t:.0f}" for t in xs[-1]["ttft_ms"])
            ratio = f"{tps / base_tps:.2f}" if base_tps else "-"
            tpp_s = f"{sum(tpp) / len(tpp):.2f}" if tpp else "-"
            lines.append(f"| {w} | {r} | {tps:.1f} | {ratio} | {tpp_s} | {ttft} | {same} |")
    return "\n".join(lines + ceilings(results)) + "\n"


def ceilings(results: list[dict]) -> list[str]:
    """The table of how far n-gram speculation could go on lmforge plain's answers (first round),
    at the verify cost lmforge-ngram measured (a pass of m tokens: 1 + slope * (m - 1) decodes)."""
    lines = [
        "",
        "Ceilings on lmforge plain's answers, at lmforge-ngram's measured verify cost: perfect-length drafts of "
        "its n-gram lookup, and of an oracle taking any earlier stretch of the sequence",
        "",
        "| workload | verify cost slope | lmforge-ngram tokens/pass | lookup, perfect length: tokens/pass, x plain "
        "| any stretch: tokens/pass, x plain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for w in WORKLOADS:
        plain = [x for x in results if x["workload"] == w and x["runner"] == "lmforge-plain" and "kept" in x]
        ngram = [x for x in results if x["workload"] == w and x["runner"] == "lmforge-ngram" and "slope" in x]
        if not plain or not ngram:
            continue
        slope = sum(x["slope"] for x in ngram) / len(ngram)
        tpp = sum(x["tokens_per_pass"] for x in ngram) / len(ngram)
        cells = []
        for kind in ("lookup", "any"):
            kept = plain[0]["kept"][kind]
            tokens = sum(k + 1 for k in kept)
            cells.append(f"{tokens / len(kept):.2f}, {tokens / sum(1 + slope * k for k in kept):.2f}x" if kept else "-")
        lines.append(f"| {w} | {slope:.2f} | {tpp:.2f} | {cells[0]} | {cells[1]} |")
    return lines


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        runner, workload, path = sys.argv[2:5]
        job = json.loads(Path(path).read_text())
        if workload == "chat":
            job["gen_tokens"] = CHAT_TURN_TOKENS
        print(json.dumps(worker(runner, workload, job)))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--passive", action="store_true", help="threads that sleep (a loaded machine): see above")
    ap.add_argument("--target", default="cpu-int4", choices=("cpu-int4", "cpu-fp32"), help="lmforge's form")
    args = ap.parse_args()
    runners = args.runners.split(",")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_io import save

    with tempfile.TemporaryDirectory() as tmp:
        job = prepare(Path(tmp), args.gen_tokens, args.threads, args.target)
        job["tmp"], job["passive"] = tmp, args.passive
        results = run_all(job, args.rounds, runners)
    name = "speculative" if args.target == "cpu-int4" else f"speculative-{args.target}"
    save(name, report(results, runners, args), compact(results))


def compact(results: list[dict]) -> list[dict]:
    """The figures without the generated tokens: their count, and whether they equal lmforge plain's."""
    plain = {(x["workload"], x["round"]): x["tokens"] for x in results if x["runner"] == "lmforge-plain"}
    return [
        {
            **{k: v for k, v in x.items() if k not in ("tokens", "kept")},
            "generated": [len(t) for t in x["tokens"]],
            "same_as_lmforge_plain": x["tokens"] == plain.get((x["workload"], x["round"])),
        }
        for x in results
    ]


if __name__ == "__main__":
    main()
