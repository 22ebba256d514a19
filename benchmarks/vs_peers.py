"""lmforge's cpu-int4 against its peers on the same checkpoint (the default model), in one run:
onnxruntime-genai running its own model builder's `-p int4 -e cpu` output, and llama.cpp
(llama-cpp-python) running the GGUF. Same 512-token WikiText prompt, 128 greedy tokens, 2 threads,
peers interleaved, median of repetitions after a warm-up.

    python benchmarks/vs_peers.py [--prompt-tokens 512] [--gen-tokens 128] [--repetitions 3]

Writes benchmarks/results/vs_peers.{md,json}; prints each figure and lmforge's ratio to the best peer.
Run it on a quiet machine: llama.cpp's spinning threads make every runner sensitive to other load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_speed import bench_genai, bench_lmforge, prompt_ids  # noqa: E402


def bench_llamacpp(path, ids, gen, threads):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + gen + 8, n_batch=len(ids), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(gen):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), gen / (t2 - t1)


def main():
    from lmforge.export.convert import convert
    from lmforge.export.hf import convert_to_hf
    from lmforge.registry import resolve

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ids = prompt_ids(args.prompt_tokens)
    gguf = resolve("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runners = {
            "lmforge cpu-int4 (exact from the Q4_1 GGUF)":
                (bench_lmforge, convert("smollm2-135m", tmp / "int4", target="cpu-int4", progress=False)),
            "lmforge cpu-int4 --requantize (RTN)":
                (bench_lmforge, convert("smollm2-135m", tmp / "rtn", target="cpu-int4", requantize=True, progress=False)),
        }
        hf = convert_to_hf("smollm2-135m", tmp / "hf")
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                            str(tmp / "genai"), "-p", "int4", "-e", "cpu", "-c", str(tmp / "cache")],
                           capture_output=True, text=True)
        if r.returncode == 0:
            runners["onnxruntime-genai (its builder's int4)"] = (bench_genai, tmp / "genai")
        else:
            print("onnxruntime-genai's builder failed:", r.stderr.strip().splitlines()[-1:], file=sys.stderr)
        runners["llama.cpp (the Q4_1 GGUF)"] = (bench_llamacpp, gguf)
        results = {name: [] for name in runners}
        for rep in range(args.repetitions + 1):
            for name, (fn, path) in runners.items():
                # llama.cpp's OpenMP threads spin for a while after each call (with OMP_WAIT_POLICY=PASSIVE
                # its decode falls 3x here, measured): let them settle before the next runner starts
                time.sleep(1.0)
                res = fn(path, ids, args.gen_tokens, args.threads)
                if rep:
                    results[name].append(res)
    rows = [{"runner": n, "prefill_tok_s": round(statistics.median(r[0] for r in rs), 1),
             "decode_tok_s": round(statistics.median(r[1] for r in rs), 1)} for n, rs in results.items()]
    peers = [r for r in rows if not r["runner"].startswith("lmforge")]
    best_pre = max(r["prefill_tok_s"] for r in peers)
    best_dec = max(r["decode_tok_s"] for r in peers)
    for r in rows:
        r["prefill_vs_best_peer"] = round(r["prefill_tok_s"] / best_pre, 2)
        r["decode_vs_best_peer"] = round(r["decode_tok_s"] / best_dec, 2)
    lines = [f"# SmolLM2-135M int4 forms, {args.prompt_tokens}-token prompt, {args.gen_tokens} tokens, "
             f"{args.threads} threads, median of {args.repetitions}", "",
             "| runner | prefill tok/s | decode tok/s | prefill / best peer | decode / best peer |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['runner']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | {r['prefill_vs_best_peer']}x | "
              f"{r['decode_vs_best_peer']}x |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_peers.md").write_text(text)
    (out / "vs_peers.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
