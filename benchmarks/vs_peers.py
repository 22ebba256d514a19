"""lmforge's cpu-int4 against its peers on the same checkpoint (the default model), in one run:
onnxruntime-genai running its own model builder's `-p int4 -e cpu` output, and llama.cpp
(llama-cpp-python) running the GGUF. 512-token WikiText prompt, 128 greedy tokens, 2 threads,
each runner in its own processes (`lmforge bench` does the measuring): 3 rounds in which every
runner takes its turn in a fresh process (warm-up, then 3 runs), so drift of a shared machine
weighs on all alike; mean ± sd of the 9 runs.
lmforge forms: the default (exact from the Q4_1 GGUF), RTN of its weights, RTN with a 4-bit
head (onnxruntime-genai's builder's configuration: every weight 4-bit), and AWQ with blocks of
128. Beside each, WikiText-2 perplexity (ctx 512, first 40 windows; llama.cpp's through
llama-cpp-python on the same windows).

    python benchmarks/vs_peers.py [--prompt-tokens 512] [--gen-tokens 128] [--repetitions 3] [--rounds 3]

Writes benchmarks/results/vs_peers.{md,json}; prints each figure and lmforge's ratio to the best
peer. Run it on a quiet machine: llama.cpp's spinning threads make every runner sensitive to load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from results_io import WIKITEXT, save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

ROOT = Path(__file__).resolve().parents[1]


def main():
    from lmforge.bench import bench
    from lmforge.export.convert import convert

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3, help="runs per runner process")
    ap.add_argument("--rounds", type=int, default=3, help="turns: each runner runs in this many processes, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from lmforge.bench import _genai_folder
    from lmforge.checkpoint import resolve
    from lmforge.evaluate import perplexity, read_text, text_windows
    from lmforge.tokenizer import Tokenizer

    sys.path.insert(0, str(ROOT))
    from tests.llamacpp_ref import llamacpp_perplexity

    with tempfile.TemporaryDirectory() as tmp:
        forms = [
            convert("smollm2-135m", Path(tmp) / "exact", target="cpu-int4", progress=False),
            convert("smollm2-135m", Path(tmp) / "rtn", target="cpu-int4", requantize=True, progress=False),
            convert(
                "smollm2-135m", Path(tmp) / "rtn-h4", target="cpu-int4", requantize=True, head_bits=4, progress=False
            ),
            convert(
                "smollm2-135m",
                Path(tmp) / "awq-128",
                target="cpu-int4",
                requantize=True,
                quant="awq",
                block_size=128,
                progress=False,
            ),
        ]
        rows = bench(
            [str(f) for f in forms],
            args.prompt_tokens,
            args.gen_tokens,
            args.repetitions,
            args.threads,
            ("llamacpp", "ortgenai"),
            rounds=args.rounds,
        )
        src = resolve("smollm2-135m")
        ppl = [perplexity(f, data=WIKITEXT, chunks=40, threads=args.threads, progress=False).ppl for f in forms]
        tok = Tokenizer.from_folder(forms[0])
        wins = text_windows(tok, read_text(WIKITEXT), 512, 40)
        ppl += [
            llamacpp_perplexity(src, wins, args.threads)[0],
            perplexity(_genai_folder(src), data=WIKITEXT, chunks=40, threads=args.threads, progress=False).ppl,
        ]
    names = [
        "lmforge cpu-int4 (exact from the Q4_1 GGUF)",
        "lmforge cpu-int4 --requantize (RTN)",
        "lmforge cpu-int4 --requantize --head-bits 4 (RTN, genai's configuration)",
        "lmforge cpu-int4 --requantize --quant awq --block-size 128",
    ]
    for row, name in zip(rows, names):
        row["runner"] = name
    for row, value in zip(rows, ppl):
        row["ppl_40"] = round(value, 4)
    peers = [r for r in rows if not r["runner"].startswith("lmforge") and "error" not in r]
    if not peers:
        raise SystemExit(f"no peer could be measured: {[r.get('error') for r in rows[len(forms) :]]}")
    best_pre = max(r["prefill_mean"] for r in peers)
    best_dec = max(r["decode_mean"] for r in peers)
    lines = [
        f"# SmolLM2-135M int4 forms, {args.prompt_tokens}-token prompt, {args.gen_tokens} tokens, "
        f"{args.threads} threads, mean of {args.repetitions} runs x {args.rounds} interleaved rounds",
        "",
        "| runner | prefill tok/s | decode tok/s | prefill / best peer | decode / best peer | perplexity (40) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runner']} | {r['error']} | | | | |")
            continue
        r["prefill_vs_best_peer"] = round(r["prefill_mean"] / best_pre, 2)
        r["decode_vs_best_peer"] = round(r["decode_mean"] / best_dec, 2)
        lines.append(
            f"| {r['runner']} | {r['prefill_mean']:.1f} ± {r['prefill_std']:.1f} | "
            f"{r['decode_mean']:.1f} ± {r['decode_std']:.1f} | {r['prefill_vs_best_peer']}x | "
            f"{r['decode_vs_best_peer']}x | {r.get('ppl_40', float('nan')):.2f} |"
        )
    save("vs_peers", "\n".join(lines), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
