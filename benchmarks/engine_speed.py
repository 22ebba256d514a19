"""Prefill and decode speed of lmforge's ONNX Runtime engine against its peers, on the same graphs.

Peers, measured in the same process run, same prompt tokens, same thread count:
- a plain `onnxruntime.InferenceSession`: one run for the prompt, then a naive decode loop that
  feeds each step's presents back as numpy arrays (what a straightforward script does);
- onnxruntime-genai's API (`append_tokens`, `generate_next_token`) on folders it can load.
Graphs: onnxruntime-genai's own int4 build of the default model (its model builder, from an HF
folder lmforge writes from the GGUF) and lmforge's cpu-fp32 (whose model.genai.onnx onnxruntime-genai runs).

    python benchmarks/engine_speed.py [--prompt-tokens 256] [--gen-tokens 128] [--repetitions 3]

Writes benchmarks/results/engine_speed.{md,json}. Run it on a quiet machine.
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
from results_io import WIKITEXT, save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

ROOT = Path(__file__).resolve().parents[1]


def prompt_ids(n: int) -> list[int]:
    from lmforge.checkpoint import open_checkpoint

    text = WIKITEXT.read_text(encoding="utf-8") if WIKITEXT.exists() else "The quick brown fox. " * 400
    return open_checkpoint("smollm2-135m").tokenizer().encode(text[:20000])[:n]


def _rates(runner, folder, ids, gen, threads):
    """(prefill tok/s, decode tok/s) of a `lmforge.bench` runner's second round (load and its own
    warm-up round excluded)."""
    _, once = runner(str(folder), ids, gen, 1, threads)
    once()
    prefill_s, decode_s, _ = once()
    return len(ids) / prefill_s, gen / decode_s


def bench_lmforge(folder, ids, gen, threads):
    from lmforge.bench import RUNNERS

    return _rates(RUNNERS["lmforge"], folder, ids, gen, threads)


def bench_session(folder, ids, gen, threads):
    import onnx
    import onnxruntime as ort

    from lmforge.runtime.ort import META_FILE, meta_from_genai

    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).exists() else meta_from_genai(folder)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    path = folder / meta.get("model_file", "model.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    dtype = np.float16 if meta["dtype"] == "float16" else np.float32
    names = [o.name for o in sess.get_outputs()]
    del onnx
    feed = {
        f"past_key_values.{i}.{kv}": np.zeros((1, meta["n_kv_heads"], 0, meta["head_dim"]), dtype)
        for i in range(meta["n_layers"])
        for kv in ("key", "value")
    }
    feed.update(input_ids=np.array([ids], dtype=np.int64), attention_mask=np.ones((1, len(ids)), np.int64))
    t0 = time.perf_counter()
    outs = dict(zip(names, sess.run(None, feed)))
    t1 = time.perf_counter()
    total = len(ids)
    for _ in range(gen):
        token = int(outs["logits"][0, -1].argmax())
        total += 1
        feed = {
            f"past_key_values.{i}.{kv}": outs[f"present.{i}.{kv}"]
            for i in range(meta["n_layers"])
            for kv in ("key", "value")
        }
        feed.update(input_ids=np.array([[token]], dtype=np.int64), attention_mask=np.ones((1, total), np.int64))
        outs = dict(zip(names, sess.run(None, feed)))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), gen / (t2 - t1)


def bench_genai(folder, ids, gen, threads):
    from lmforge.bench import RUNNERS

    return _rates(RUNNERS["ortgenai"], folder, ids, gen, threads)


def build_graphs(work: Path) -> dict[str, Path]:
    from lmforge.export.convert import convert
    from lmforge.export.hf import convert_to_hf

    graphs = {}
    hf = convert_to_hf("smollm2-135m", work / "hf")
    builder = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(work / "genai-int4"),
        "-p",
        "int4",
        "-e",
        "cpu",
        "-c",
        str(work / "cache"),
    ]
    r = subprocess.run(builder, capture_output=True, text=True)
    if r.returncode == 0:
        graphs["genai builder int4"] = work / "genai-int4"
    else:
        print("onnxruntime-genai's builder failed:", r.stderr.strip().splitlines()[-1:], file=sys.stderr)
    graphs["lmforge cpu-fp32"] = convert("smollm2-135m", work / "fp32", progress=False)

    return graphs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ids = prompt_ids(args.prompt_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graphs = build_graphs(Path(tmp))
        for gname, folder in graphs.items():
            runners = {"lmforge engine": bench_lmforge, "plain InferenceSession": bench_session}
            if (folder / "genai_config.json").exists():
                runners["onnxruntime-genai API"] = bench_genai
            results = {name: [] for name in runners}
            for rep in range(args.repetitions + 1):  # first round is a warm-up, interleaved peers
                for name, fn in runners.items():
                    r = fn(folder, ids, args.gen_tokens, args.threads)
                    if rep:
                        results[name].append(r)
            base = results["lmforge engine"]
            for name, rs in results.items():
                pre = statistics.median(r[0] for r in rs)
                dec = statistics.median(r[1] for r in rs)
                rows.append(
                    {
                        "graph": gname,
                        "runner": name,
                        "prefill_tok_s": round(pre, 1),
                        "decode_tok_s": round(dec, 1),
                        "lmforge_prefill_ratio": round(statistics.median(b[0] for b in base) / pre, 2),
                        "lmforge_decode_ratio": round(statistics.median(b[1] for b in base) / dec, 2),
                    }
                )
    lines = [
        f"# Engine speed: SmolLM2-135M, {args.prompt_tokens}-token prompt, {args.gen_tokens} generated tokens, "
        f"{args.threads} threads, median of {args.repetitions}",
        "",
        "| graph | runner | prefill tok/s | decode tok/s | lmforge / runner prefill | lmforge / runner decode |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['graph']} | {r['runner']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | "
        f"{r['lmforge_prefill_ratio']}x | {r['lmforge_decode_ratio']}x |"
        for r in rows
    ]
    save("engine_speed", "\n".join(lines), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
