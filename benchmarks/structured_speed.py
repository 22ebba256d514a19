"""What structured output costs: decode speed with a JSON Schema enforced against plain decoding, on
the default model (cpu-int4), in the same run.

Each runner is its own process, the two take turns over --rounds rounds (the machine is shared):
`plain` generates --tokens tokens with EOS banned; `schema` generates under a JSON Schema whose
every valid document is long (an array of exactly 16 strings, without length bounds, as OpenAI's
strict schemas have none), so both decode a comparable number of tokens. Both greedy, 2 threads,
the library's own loop (Model.stream_generate); decode tok/s is what GenerationResponse reports
(tokens after the first over the time after it). Also the compile time of a 200-property schema
(llguidance builds a matcher; its first mask counts).

    python benchmarks/structured_speed.py [--rounds 3] [--tokens 160] [--threads 2]

Writes benchmarks/results/structured_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from results_io import save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

PROMPT = "List twelve things you can find in a kitchen."
LONG = {"type": "array", "items": {"type": "string"}, "minItems": 16, "maxItems": 16}


def big_schema(n: int = 200) -> dict:
    kinds = [
        {"type": "string", "maxLength": 20},
        {"type": "integer", "minimum": 0, "maximum": 999},
        {"enum": ["a", "b", "c"]},
        {"type": "boolean"},
        {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    ]
    props = {f"p{i}": kinds[i % len(kinds)] for i in range(n)}
    return {
        "type": "object",
        "properties": props,
        "required": [p for i, p in enumerate(props) if i % 10],
        "additionalProperties": False,
    }


def runner(kind: str, tokens: int, threads: int) -> dict:
    from lmforge.model import cached_onnx, load
    from lmforge.sampling import SamplingParams

    model = load(cached_onnx("smollm2-135m", "cpu-int4", progress=False), threads=threads)
    ids = model.prompt_ids(PROMPT)
    options = {"json_schema": LONG} if kind == "schema" else {"logit_bias": {t: -100 for t in model.eos_token_ids}}
    params = SamplingParams(max_tokens=tokens, **options)
    list(model.stream_generate(ids, SamplingParams(max_tokens=8)))  # warm-up
    runs = []
    for _ in range(3):
        last = list(model.stream_generate(ids, params))[-1]
        runs.append({"tps": last.generation_tps, "tokens": last.generation_tokens})
    out = {"kind": kind, "runs": runs}
    if kind == "schema":
        from lmforge.constrain import Constraint

        t = time.perf_counter()
        Constraint(
            "json_schema", json.dumps(big_schema()), model.tokenizer, model.engine.vocab_size, model.eos_token_ids
        )
        out["compile_200_ms"] = (time.perf_counter() - t) * 1000
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(runner(args.worker, args.tokens, args.threads)))
        return
    results = {"plain": [], "schema": []}
    compile_ms = []
    for rnd in range(args.rounds):
        for kind in ["plain", "schema"] if rnd % 2 == 0 else ["schema", "plain"]:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--tokens",
                str(args.tokens),
                "--threads",
                str(args.threads),
            ]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            results[kind] += out["runs"]
            compile_ms += [out["compile_200_ms"]] if "compile_200_ms" in out else []
            print(f"round {rnd + 1} {kind}: {[round(r['tps'], 1) for r in out['runs']]} tok/s", flush=True)
            time.sleep(2)
    tps = {k: [r["tps"] for r in v] for k, v in results.items()}
    ratio = statistics.median(tps["schema"]) / statistics.median(tps["plain"])
    lines = [
        "# Structured output: decode speed with a JSON Schema vs plain (default model, cpu-int4)",
        "",
        f"`python benchmarks/structured_speed.py --rounds {args.rounds} --tokens {args.tokens} --threads "
        f"{args.threads}`: each runner in its own process, interleaved; greedy; median (min-max) over "
        f"{len(tps['plain'])} runs each.",
        "",
        "| runner | decode tok/s | tokens |",
        "| --- | ---: | ---: |",
    ]
    for kind in ("plain", "schema"):
        n = statistics.median(r["tokens"] for r in results[kind])
        lines.append(
            f"| {kind} | {statistics.median(tps[kind]):.1f} ({min(tps[kind]):.1f}-{max(tps[kind]):.1f}) | {n:.0f} |"
        )
    lines += [
        "",
        f"schema / plain: **{ratio:.3f}x** (target >= 0.9x)",
        "",
        f"Compile of a 200-property schema (llguidance, to its first mask): "
        f"{statistics.median(compile_ms):.1f} ms (median of {len(compile_ms)}).",
    ]
    save("structured_speed", "\n".join(lines), {"tps": tps, "ratio": ratio, "compile_200_ms": compile_ms})


if __name__ == "__main__":
    main()
