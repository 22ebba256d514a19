"""lmforge's GGUF files beside llama.cpp's own, per type, on the default model.

Both start from the same F32 GGUF (the default model's dequantized weights): lmforge writes
each type with `convert_to_gguf`, llama.cpp with its quantizer (`llama_model_quantize`). For
each pair: identical tensor types and bytes?, file size, and WikiText-2 perplexity through
llama.cpp (llama-cpp-python; ctx 512, second halves scored, first N windows).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/gguf_quality.py [--chunks 40] [--types q8_0,q4_k_m]

Writes benchmarks/results/gguf_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import WIKITEXT, save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

from tests.llamacpp_ref import dequantized_gguf, llamacpp_perplexity, llamacpp_quantize  # noqa: E402

TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0"]


def tensors(path: Path) -> dict:
    import gguf

    from lmforge.checkpoint.gguf_format import parse

    _, entries, mm = parse(path)
    out = {
        e.name: (gguf.GGMLQuantizationType(e.qtype).name, bytes(mm[e.offset : e.offset + e.nbytes])) for e in entries
    }
    mm.close()
    return out


def main():
    from lmforge.checkpoint import resolve
    from lmforge.evaluate import read_text, text_windows
    from lmforge.export.gguf import convert_to_gguf
    from lmforge.tokenizer import Tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    src = resolve("smollm2-135m")
    from lmforge.checkpoint.gguf import read_metadata

    tok = Tokenizer.from_gguf_metadata(read_metadata(src))
    wins = text_windows(tok, read_text(WIKITEXT), 512, args.chunks)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = dequantized_gguf(src, tmp / "f32.gguf")
        for kind in args.types.split(","):
            t = time.perf_counter()
            ours = convert_to_gguf(f32, tmp / f"ours-{kind}.gguf", kind, progress=False)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            theirs = llamacpp_quantize(f32, tmp / f"llamacpp-{kind}.gguf", kind.upper(), threads=args.threads)
            t_theirs = time.perf_counter() - t
            a, b = tensors(ours), tensors(theirs)
            same_types = all(a[n][0] == b[n][0] for n in b) and a.keys() == b.keys()
            same_bytes = same_types and all(a[n][1] == b[n][1] for n in b)
            ppl_ours, n = llamacpp_perplexity(ours, wins, args.threads)
            ppl_theirs, _ = llamacpp_perplexity(theirs, wins, args.threads)
            row = {
                "type": kind,
                "ppl_lmforge": round(ppl_ours, 4),
                "ppl_llamacpp": round(ppl_theirs, 4),
                "ppl_ratio": round(ppl_ours / ppl_theirs, 5),
                "bytes_lmforge": ours.stat().st_size,
                "bytes_llamacpp": theirs.stat().st_size,
                "bytes_ratio": round(ours.stat().st_size / theirs.stat().st_size, 5),
                "same_types": same_types,
                "same_tensor_bytes": same_bytes,
                "tokens_scored": n,
                "seconds_lmforge": round(t_ours, 1),
                "seconds_llamacpp": round(t_theirs, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"# lmforge GGUF vs llama.cpp's quantizer (default model, WikiText-2, ctx 512, {args.chunks} windows)",
        "",
        "| type | ppl lmforge | ppl llama.cpp | ratio | MB lmforge | MB llama.cpp | size ratio | same types "
        "| same bytes | s lmforge | s llama.cpp |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['ppl_lmforge']:.4f} | {r['ppl_llamacpp']:.4f} | {r['ppl_ratio']:.5f} | "
            f"{r['bytes_lmforge'] / 1e6:.2f} | {r['bytes_llamacpp'] / 1e6:.2f} | {r['bytes_ratio']:.5f} | "
            f"{r['same_types']} | {r['same_tensor_bytes']} | {r['seconds_lmforge']} | {r['seconds_llamacpp']} |"
        )
    save("gguf_quality", "\n".join(lines), rows)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
