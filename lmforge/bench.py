"""`lmforge bench`: llama-bench-style figures for each form of a model, and for its peers in
the same run (llama.cpp on the GGUF, onnxruntime-genai on its own builder's output).

Each runner is measured in a fresh process (so peak resident memory and load time are its own):
load time, then a warm-up and `repetitions` runs of prefill at `prompt_tokens` and greedy decode
of `gen_tokens`; mean and standard deviation per figure, time to first token, file size and the
memory bandwidth decode achieves (weight bytes x decode tok/s). With `rounds` > 1 the runners take
turns, a fresh process each turn, and each figure pools every turn's runs. With `speculative`
(ngram | draft) each lmforge form also runs with speculation (`lmforge.bench_speculative`), and
with ngram each peer with its own (llama-cpp-python's prompt lookup, onnxruntime-genai's n-gram
strategy): such a row gives tokens per pass and per verify, its decode against the same runner's
plain decode, and whether its greedy tokens are that runner's plain ones.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.bench_speculative import (
    GENAI_NGRAM,
    PROMPTS,
    check_speculative,
    genai_counts,
    genai_model,
    grounded_ids,
    pooled_stats,
    run_llamacpp_lookup,
    run_lmforge_speculative,
)
from lmforge.errors import LmforgeError
from lmforge.export.folder import GENAI_FILE, META_FILE
from lmforge.speculative import DRAFT_MAX

PEERS = ("llamacpp", "ortgenai")
PAUSE_S = 2.0  # between runner processes


def _run_lmforge(path: str, ids: list[int], gen: int, reps: int, threads: int | None):
    from lmforge.runtime.ort import OrtEngine

    t = time.perf_counter()
    engine = OrtEngine(path, threads=threads)
    load = time.perf_counter() - t

    def once():
        cache = engine.new_cache(1, len(ids) + gen + 1)
        t0 = time.perf_counter()
        logits = engine.prefill(cache, [ids])
        t1 = time.perf_counter()
        token = int(logits[0].argmax())
        ttft = time.perf_counter() - t0
        tokens = [token]
        t2 = time.perf_counter()
        for _ in range(gen):
            token = int(engine.decode(cache, [token])[0].argmax())
            tokens.append(token)
        return t1 - t0, time.perf_counter() - t2, ttft, tokens

    return load, once


def _run_llamacpp(path: str, ids: list[int], gen: int, reps: int, threads: int | None):
    import llama_cpp
    import numpy as np

    t = time.perf_counter()
    llm = llama_cpp.Llama(
        path, n_ctx=len(ids) + gen + 8, n_batch=len(ids), n_threads=threads, n_threads_batch=threads, verbose=False
    )
    load = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())
        ttft = time.perf_counter() - t0
        tokens = [token]
        t2 = time.perf_counter()
        for _ in range(gen):
            llm.eval([token])
            token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())
            tokens.append(token)
        return t1 - t0, time.perf_counter() - t2, ttft, tokens

    return load, once


def _run_ortgenai(path: str, ids: list[int], gen: int, reps: int, threads: int | None, options: dict | None = None):
    """onnxruntime-genai on its own folder, greedy; with `options` (speculative ngram) its n-gram
    strategy (3-grams, up to 8 drafts) and its speculation counts."""
    import onnxruntime_genai as og

    t = time.perf_counter()
    model = genai_model(path, threads)
    load = time.perf_counter() - t

    def once():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + gen + 1, do_sample=False)
        if options:
            params.set_speculative_options(**GENAI_NGRAM)
        g = og.Generator(model, params)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        t1 = time.perf_counter()
        ttft = t1 - t0
        t2 = time.perf_counter()
        for _ in range(gen):
            g.generate_next_token()
        t3 = time.perf_counter()
        tokens = [int(t) for t in g.get_sequence(0)[len(ids) :]]
        if options:
            return t1 - t0, t3 - t2, ttft, tokens, {**genai_counts(g), "tokens": gen}
        return t1 - t0, t3 - t2, ttft, tokens

    return load, once


# each runner: (path, ids, gen, reps, threads[, speculation options]) -> (load seconds, once); once()
# -> (prefill s, decode s, ttft s[, greedy tokens[, speculation counts]])
RUNNERS = {
    "lmforge": _run_lmforge,
    "lmforge-spec": run_lmforge_speculative,
    "llamacpp": _run_llamacpp,
    "llamacpp-spec": run_llamacpp_lookup,
    "ortgenai": _run_ortgenai,
    "ortgenai-spec": _run_ortgenai,
}


def _worker(kind: str, path: str, job: str) -> dict:
    """Measure one runner in this process; the figures as a dict."""
    spec = json.loads(Path(job).read_text())
    ids, gen, reps, threads = spec["ids"], spec["gen"], spec["reps"], spec["threads"]
    options = (spec["speculation"],) if kind.endswith("-spec") else ()
    load, once = RUNNERS[kind](path, ids, gen, reps, threads, *options)
    once()  # warm-up
    runs = [once() for _ in range(reps)]
    out = {
        "load_s": load,
        "prefill": [len(ids) / r[0] for r in runs],
        "decode": [gen / r[1] for r in runs],
        "ttft_ms": [1000 * r[2] for r in runs],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if len(runs[-1]) > 3:
        out["tokens"] = runs[-1][3]
    if len(runs[-1]) > 4:
        out["spec"] = [r[4] for r in runs]
    return out


def _size(path: Path) -> tuple[int, int]:
    """(bytes on disk, weight bytes read per decoded token)."""
    if path.is_file():
        return path.stat().st_size, path.stat().st_size
    files = [p for p in path.iterdir() if p.is_file()]
    weights = [p for p in files if p.name.endswith(".data")] or files
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in weights)


def _figures(kind: str, path: Path, job: Path) -> dict:
    """One runner in a fresh process: its raw figures, or {"error": its last stderr line}."""
    r = subprocess.run(
        [sys.executable, "-m", "lmforge.bench", kind, str(path), str(job)], capture_output=True, text=True
    )
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _row(label: str, path: Path, passes: list[dict]) -> dict:
    """A table row from one runner's passes: every measured repetition pooled; load time the
    mean over processes, peak memory the largest."""
    if "error" in passes[-1]:
        return {"runner": label, "error": passes[-1]["error"]}
    file_bytes, weight_bytes = _size(path)
    row = {
        "runner": label,
        "path": str(path),
        "file_bytes": file_bytes,
        "load_s": round(statistics.mean(p["load_s"] for p in passes), 3),
        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in passes),
        "processes": len(passes),
    }
    for key in ("prefill", "decode", "ttft_ms"):
        values = [v for p in passes for v in p[key]]
        row[f"{key}_mean"] = round(statistics.mean(values), 2)
        row[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    row["decode_gb_s"] = round(weight_bytes * row["decode_mean"] / 1e9, 2)
    if "spec" in passes[-1]:
        row.update(pooled_stats([counts for p in passes for counts in p["spec"]]))
    return row


def _genai_folder(source: Path) -> Path:
    """onnxruntime-genai's own int4 CPU build of SOURCE (an HF folder, or a GGUF made into one)."""
    from lmforge.export.hf import convert_to_hf
    from lmforge.registry import cache_dir

    stat = source.stat()
    out = cache_dir() / "genai" / f"{source.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (out / GENAI_FILE).exists():
        return out
    hf = source
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_file():
            hf = convert_to_hf(source, Path(tmp) / "hf")
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
                str(Path(tmp) / "cache"),
            ],
            capture_output=True,
            text=True,
        )
    if r.returncode:
        raise LmforgeError(f"onnxruntime-genai's builder failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}")
    return out


def _prompt_ids(tok, prompt_tokens: int) -> list[int]:
    """PROMPT_TOKENS token ids of a fixed English text (Python's own help topics, in every install;
    repeated when it is shorter)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text[: 12 * prompt_tokens])[:prompt_tokens]
    if len(ids) < prompt_tokens:
        ids = (ids * (prompt_tokens // max(1, len(ids)) + 1))[:prompt_tokens]
    return ids


def _peers(vs: tuple[str, ...], source: Path, speculative: str = "off") -> list[tuple[str, str, Path | str]]:
    """(runner, label, path) of each peer in VS, run on SOURCE (or what onnxruntime-genai's builder
    makes of it); a peer that cannot be prepared (its builder fails) has its reason for a path.
    With `speculative` ngram each peer also runs with its own n-gram speculation."""
    peers = []
    for p in vs:
        if p == "llamacpp":
            if source.suffix.lower() != ".gguf":
                raise LmforgeError("--vs llamacpp needs the first MODEL to be a .gguf file (or a known GGUF name)")
            peers.append(("llamacpp", "llama.cpp (the GGUF)", source))
            if speculative == "ngram":
                peers.append(("llamacpp-spec", "llama.cpp (the GGUF) +lookup", source))
        else:
            try:
                folder: Path | str = _genai_folder(source)
            except LmforgeError as e:  # a row with the reason; the other runners are still measured
                folder = str(e)
            peers.append(("ortgenai", "onnxruntime-genai (its builder's int4)", folder))
            if speculative == "ngram":
                peers.append(("ortgenai-spec", "onnxruntime-genai (its builder's int4) +ngram", folder))
    return peers


def _runners(models, folders, metas, peers, speculative: str) -> list[tuple[str, str, Path | str]]:
    """(runner kind, label, path) of each lmforge form (and its speculative row) and each peer."""
    runners = []
    for m, f, meta in zip(models, folders, metas):
        label = f"lmforge {meta.get('target', 'onnx')}" + (f" {m}" if len(models) > 1 else "")
        runners.append(("lmforge", label, f))
        if speculative != "off":
            runners.append(("lmforge-spec", f"{label} +{speculative}", f))
    return runners + peers


def _measure(runners, job: Path, rounds: int) -> list[list[dict]]:
    """Each runner's passes: `rounds` turns, a fresh process per runner per turn."""
    passes: list[list[dict]] = [[] for _ in runners]
    for rnd in range(rounds):
        for i, ((kind, _, path), done) in enumerate(zip(runners, passes)):
            if done and "error" in done[-1]:
                continue  # a runner that failed once is not retried
            if isinstance(path, str):  # it could not even be prepared
                done.append({"error": path})
                continue
            if rnd or i:
                time.sleep(PAUSE_S)  # let the machine settle after the last runner's process
            done.append(_figures(kind, path, job))
    return passes


def _compare(rows: list[dict], runners, passes) -> None:
    """Ratios to the first row (lmforge's plain decode); a speculative row (lmforge's or a peer's)
    also against the plain row of the same runner before it: its decode speed-up and whether its
    greedy tokens are the same."""
    base = rows[0]
    for i, r in enumerate(rows):
        if "error" not in r and "error" not in base:
            r["lmforge_prefill_ratio"] = round(base["prefill_mean"] / r["prefill_mean"], 2)
            r["lmforge_decode_ratio"] = round(base["decode_mean"] / r["decode_mean"], 2)
        plain = rows[i - 1]
        if runners[i][0].endswith("-spec") and "error" not in r and "error" not in plain:
            r["spec_speedup"] = round(r["decode_mean"] / plain["decode_mean"], 2)
            r["same_tokens"] = passes[i][-1]["tokens"] == passes[i - 1][-1]["tokens"]


def bench(
    models: list[str],
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repetitions: int = 5,
    threads: int | None = None,
    vs: tuple[str, ...] = (),
    target: str = "cpu-int4",
    rounds: int = 1,
    speculative: str = "off",
    draft: str | None = None,
    draft_max: int = DRAFT_MAX,
    prompt: str = "text",
) -> list[dict]:
    """Figures for each MODEL (converted to `target` when needed) and, for the first, its peers.

    Runner processes follow each other with a pause of PAUSE_S. `rounds` > 1 interleaves the
    runners: each round runs every runner once more, in a fresh process, so a machine that speeds
    up or slows down during the run weighs on every runner alike; figures pool all rounds.
    `speculative` ngram | draft (with `draft`, a model of the same vocabulary; `draft_max` the
    ceiling of the draft length) adds a row per lmforge form decoding with speculation; `prompt`
    text (Python's help topics) or grounded (a code-editing request whose answer quotes it)."""
    from lmforge.checkpoint import resolve
    from lmforge.model import cached_onnx
    from lmforge.tokenizer import Tokenizer

    unknown = [p for p in vs if p not in PEERS]
    if unknown:
        raise LmforgeError(f"unknown peer {unknown[0]!r}; --vs takes: {', '.join(PEERS)}")
    if prompt_tokens < 1 or gen_tokens < 1 or repetitions < 1 or rounds < 1:
        raise LmforgeError("--prompt-tokens, --gen-tokens, --repetitions and --rounds must be at least 1")
    if prompt not in PROMPTS:
        raise LmforgeError(f"unknown --prompt {prompt!r}; choose one of: {', '.join(PROMPTS)}")
    threads = threads or os.cpu_count()  # one explicit count for every runner
    folders = [cached_onnx(m, target) for m in models]
    metas = [json.loads((f / META_FILE).read_text()) if (f / META_FILE).exists() else {} for f in folders]
    for f, meta in zip(folders, metas):
        limit = min(meta.get("context_length", 1 << 30), meta.get("max_positions") or 1 << 30)
        if prompt_tokens + gen_tokens + 1 > limit:
            raise LmforgeError(f"--prompt-tokens + --gen-tokens exceed the context of {f} ({limit}); use fewer tokens")
    check_speculative(speculative, draft, draft_max, folders[0])
    if prompt == "grounded":
        ids = grounded_ids(folders[0], prompt_tokens)
    else:
        ids = _prompt_ids(Tokenizer.from_folder(folders[0]), prompt_tokens)
    source = resolve(models[0])
    if source.is_dir() and metas[0].get("source") and Path(metas[0]["source"]).exists():
        source = Path(metas[0]["source"])  # a folder lmforge wrote: its peers run what it came from
    runners = _runners(models, folders, metas, _peers(vs, source, speculative), speculative)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        options = {"speculative": speculative, "draft": str(draft) if draft else None, "draft_max": draft_max}
        spec = {"ids": ids, "gen": gen_tokens, "reps": repetitions, "threads": threads, "speculation": options}
        job.write_text(json.dumps(spec))
        passes = _measure(runners, job, rounds)
    rows = [_row(label, path, done) for (_, label, path), done in zip(runners, passes)]
    _compare(rows, runners, passes)
    return rows


def table(rows: list[dict], fmt: str = "text") -> str:
    """The rows as aligned text, Markdown or CSV."""
    cols = [
        ("runner", "runner"),
        ("prefill tok/s", "prefill"),
        ("decode tok/s", "decode"),
        ("ttft ms", "ttft_ms"),
        ("load s", "load_s"),
        ("peak RSS MiB", "peak_rss_bytes"),
        ("file MiB", "file_bytes"),
        ("decode GB/s", "decode_gb_s"),
        ("lmforge/x prefill", "lmforge_prefill_ratio"),
        ("lmforge/x decode", "lmforge_decode_ratio"),
    ]
    if any("tokens_per_pass" in r for r in rows):  # speculative rows: acceptance, speed-up, exactness
        cols += [
            ("tok/pass", "tokens_per_pass"),
            ("tok/verify", "tokens_per_verify"),
            ("x plain decode", "spec_speedup"),
            ("same tokens", "same_tokens"),
        ]

    def cell(r, key):
        if "error" in r:
            return r["error"] if key == "prefill" else ""
        if key in ("prefill", "decode", "ttft_ms"):
            return f"{r[key + '_mean']:.1f} ± {r[key + '_std']:.1f}"
        if key in ("peak_rss_bytes", "file_bytes"):
            return f"{r[key] / 2**20:.0f}"
        return str(r.get(key, ""))

    grid = [[name for name, _ in cols]] + [
        [cell(r, k) if k != "runner" else r["runner"] for _, k in cols] for r in rows
    ]
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(grid)
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        lines = ["| " + " | ".join(grid[0]) + " |", "|" + " --- |" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in grid[1:]])
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in grid)


def plot(rows: list[dict], path: str) -> None:
    """A bar chart of prefill and decode tok/s per runner."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmforgeError("--plot needs matplotlib: pip install matplotlib") from None
    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, key, title in ((axes[0], "prefill", "prefill tok/s"), (axes[1], "decode", "decode tok/s")):
        ax.barh([r["runner"] for r in ok], [r[key + "_mean"] for r in ok], xerr=[r[key + "_std"] for r in ok])
        ax.set_title(title)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise LmforgeError(f"cannot write the plot to {path}: {e.strerror}") from None


if __name__ == "__main__":  # a runner measured in its own process: python -m lmforge.bench KIND PATH JOB
    print(json.dumps(_worker(*sys.argv[1:4])))
