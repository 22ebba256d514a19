"""cpu-int4 from mixed GGUF files: is every tensor transcoded exactly, and what does it cost?

Sources: the default model written by lmforge as `--gguf q4_k_m` (rows of 576: Q4_K, Q5_0, Q6_K
and Q8_0 mixed), and a tiny random llama with rows of 256 (tests/tiny.py's `k256`) quantized by
llama.cpp's own quantizer to Q4_K_M and Q5_K_M. For each: the types in the file, which were
transcoded or quantized again, the largest logit difference of cpu-int4 at accuracy level 0
(float activations) against cpu-fp32 on the same GGUF (its dequantized weights), WikiText-2
perplexity of cpu-int4 (default accuracy level 4) beside llama.cpp's on the GGUF itself (same
windows, llama-perplexity's protocol; ctx 512, 128 for the tiny model's 256 positions), and the
sizes (the GGUF file; the ONNX folder's model.onnx* files).

    python benchmarks/gguf_transcode.py [--chunks 8]

Writes benchmarks/results/gguf_transcode.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import WIKITEXT, save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

from tests.llamacpp_ref import llamacpp_perplexity, llamacpp_quantize  # noqa: E402


def k256_f32(tmp: Path) -> Path:
    """The tiny rows-of-256 llama with SmolLM2's vocabulary, as an F32 GGUF."""
    from lmforge.checkpoint import open_checkpoint, resolve
    from lmforge.checkpoint.gguf import read_metadata
    from tests import gguf_ref, tiny

    src = resolve("smollm2-135m")
    bpe = tmp / "bpe"
    bpe.mkdir()
    open_checkpoint(src).tokenizer().save(bpe)
    folder = tiny.build(tmp / "k256", "llama", variant="k256", tokenizers={"bpe": bpe})
    return gguf_ref.write(folder, tmp / "k256-f32.gguf", vocab=gguf_ref.bpe_vocab_meta(read_metadata(src), "smollm"))


def max_logit_error(int4: Path, fp32: Path, ids: list[int]) -> float:
    """max |int4 - fp32| / max |fp32| over every position's logits of one window."""
    from lmforge.runtime.ort import OrtEngine

    a = OrtEngine(int4, full_logits=True).score(ids)
    b = OrtEngine(fp32, full_logits=True).score(ids)
    return float(np.abs(a - b).max() / np.abs(b).max())


def measure(label: str, gguf: Path, tmp: Path, chunks: int, ctx: int) -> dict:
    from lmforge.checkpoint import open_checkpoint
    from lmforge.evaluate import perplexity, read_text, text_windows
    from lmforge.export.convert import convert
    from lmforge.tokenizer import Tokenizer

    int4 = convert(gguf, tmp / f"{label}-int4", target="cpu-int4", progress=False)
    exact = convert(gguf, tmp / f"{label}-int4-l0", target="cpu-int4", accuracy_level=0, progress=False)
    fp32 = convert(gguf, tmp / f"{label}-fp32", target="cpu-fp32", progress=False)
    tok = Tokenizer.from_folder(int4)
    wins = text_windows(tok, read_text(WIKITEXT), ctx, chunks)
    ours = perplexity(int4, data=WIKITEXT, ctx=ctx, chunks=chunks, progress=False)
    theirs, n = llamacpp_perplexity(gguf, wins)
    meta = json.loads((int4 / "lmforge.json").read_text())
    folder_bytes = sum(f.stat().st_size for f in int4.iterdir() if f.name.startswith("model.onnx"))
    return {
        "source": label,
        "types": dict(Counter(i.dtype for i in open_checkpoint(gguf).infos)),
        "transcoded": meta["transcoded"],
        "requantized": meta["requantized"],
        "max_logit_error_l0": max_logit_error(exact, fp32, wins[0]),
        "ppl_lmforge_int4": round(ours.ppl, 4),
        "ppl_llamacpp_gguf": round(theirs, 4),
        "ppl_diff_pct": round(100 * (ours.ppl / theirs - 1), 3),
        "ctx": ctx,
        "tokens_scored": n,
        "gguf_mb": round(gguf.stat().st_size / 2**20, 2),
        "onnx_mb": round(folder_bytes / 2**20, 2),
        "size_ratio": round(folder_bytes / gguf.stat().st_size, 3),
    }


def main():
    from lmforge.export.gguf import convert_to_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        default = convert_to_gguf("smollm2-135m", tmp / "q4km.gguf", "q4_k_m", progress=False)
        sources = {"smollm2-135m --gguf q4_k_m (lmforge)": (default, 512)}
        f32 = k256_f32(tmp)
        for t in ("Q4_K_M", "Q5_K_M"):  # its context is 256 positions: windows of 128
            sources[f"k256 {t} (llama.cpp)"] = (llamacpp_quantize(f32, tmp / f"k256-{t}.gguf", t), 128)
        for i, (label, (path, ctx)) in enumerate(sources.items()):
            rows.append(measure(f"s{i}", path, tmp, args.chunks, ctx) | {"source": label})
            print(rows[-1], flush=True)
    lines = [
        f"# cpu-int4 from mixed GGUF files (WikiText-2, {args.chunks} windows of 512 (k256: 128) tokens)",
        "",
        "| source | tensor types | requantized | max logit error (level 0) | ppl cpu-int4 | ppl llama.cpp | diff"
        " | GGUF MiB | ONNX MiB | ratio |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        lines.append(
            f"| {r['source']} | {types} | {', '.join(r['requantized']) or 'none'} | {r['max_logit_error_l0']:.1e}"
            f" | {r['ppl_lmforge_int4']} | {r['ppl_llamacpp_gguf']} | {r['ppl_diff_pct']:+.2f}% | {r['gguf_mb']}"
            f" | {r['onnx_mb']} | {r['size_ratio']} |"
        )
    save("gguf_transcode", "\n".join(lines), rows)


if __name__ == "__main__":
    main()
