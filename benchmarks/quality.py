"""Perplexity of every int4 form of the default model beside llama.cpp's, on WikiText-2.

lmforge forms: cpu-fp32 (reference), cpu-int4 transcoded from the Q4_1 GGUF (the default),
`--requantize` RTN block 32 and block 128, AWQ block 128. llama.cpp (llama-cpp-python), on the
same windows: an F32 GGUF of the same dequantized weights, its own Q4_0 quantization of that
file, and the original Q4_1 file. Protocol: llama-perplexity's (ctx 512, second halves).

    python benchmarks/quality.py [--chunks 40]      # --chunks 0: the whole file

Writes benchmarks/results/quality_{chunks}.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import WIKITEXT, save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

from tests.llamacpp_ref import dequantized_gguf, llamacpp_perplexity, llamacpp_quantize  # noqa: E402

FORMS = [  # (label, convert options)
    ("lmforge cpu-fp32", dict(target="cpu-fp32")),
    ("lmforge cpu-int4 (transcoded Q4_1, default)", dict(target="cpu-int4")),
    ("lmforge cpu-int4 --requantize RTN block 32", dict(target="cpu-int4", requantize=True)),
    ("lmforge cpu-int4 --requantize RTN block 128", dict(target="cpu-int4", requantize=True, block_size=128)),
    ("lmforge cpu-int4 --quant awq --block-size 128", dict(target="cpu-int4", quant="awq", block_size=128)),
]


def main():
    from lmforge.checkpoint import resolve
    from lmforge.evaluate import perplexity, read_text, text_windows
    from lmforge.export.convert import convert
    from lmforge.tokenizer import Tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    chunks = args.chunks or None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, opts in FORMS:
            folder = convert("smollm2-135m", tmp / label.replace(" ", "_").replace("/", ""), progress=False, **opts)
            r = perplexity(folder, data=WIKITEXT, chunks=chunks, progress=False)
            rows.append(
                {
                    "form": label,
                    "ppl": round(r.ppl, 4),
                    "tokens_scored": r.tokens_scored,
                    "onnx_data_mb": round((folder / "model.onnx.data").stat().st_size / 2**20, 1),
                }
            )
            print(rows[-1], flush=True)
            if label == "lmforge cpu-fp32":
                tok = Tokenizer.from_folder(folder)
        wins = text_windows(tok, read_text(WIKITEXT), 512, chunks)
        src = resolve("smollm2-135m")
        f32 = dequantized_gguf(src, tmp / "f32.gguf")
        q40 = llamacpp_quantize(f32, tmp / "q4_0.gguf", "Q4_0")
        for label, path in (
            ("llama.cpp F32 (same weights)", f32),
            ("llama.cpp Q4_0 of that F32", q40),
            ("llama.cpp Q4_1 (the original file)", src),
        ):
            t = time.time()
            ppl, n = llamacpp_perplexity(path, wins)
            rows.append(
                {
                    "form": label,
                    "ppl": round(ppl, 4),
                    "tokens_scored": n,
                    "gguf_mb": round(path.stat().st_size / 2**20, 1),
                    "seconds": round(time.time() - t, 1),
                }
            )
            print(rows[-1], flush=True)
    name = f"quality_{args.chunks or 'all'}"
    lines = [
        f"# Perplexity, SmolLM2-135M-Instruct, WikiText-2 test, ctx 512, "
        f"{'all' if not chunks else chunks} windows (llama-perplexity protocol)",
        "",
        "| form | perplexity | tokens scored |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {r['form']} | {r['ppl']:.4f} | {r['tokens_scored']} |" for r in rows]
    save(name, "\n".join(lines), rows)


if __name__ == "__main__":
    main()
