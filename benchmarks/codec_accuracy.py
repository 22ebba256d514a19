"""lmforge's ggml block encoders beside llama.cpp's own, on every 2-D tensor of the default model.

For each type and each 2-D weight of SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF),
both quantize the same rows: lmforge (`lmforge.quant.ggml.quantize`) and llama.cpp's reference
quantizer without importance matrix (`ggml_quantize_chunk` through ctypes, tests/ggml_ref.py).
K-quants get the flat data in rows of 256, since rows of 576 hold no whole super-block.

Reported per type: blocks with identical bytes, the worst distance between a value's two
decodings in llama.cpp's quantization steps, the worst and mean per-tensor RMSE ratio
(ours / llama.cpp), and the encode speed of each in MB/s of float32 input (one thread each,
timed tensor by tensor, interleaved).

    python benchmarks/codec_accuracy.py

Writes benchmarks/results/codec_accuracy.md.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType as T  # noqa: E402
from results_io import save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

from tests import ggml_ref  # noqa: E402

TYPES = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
K_QUANTS = {T.Q4_K, T.Q5_K, T.Q6_K}


def rows_for(x: np.ndarray, qtype) -> np.ndarray:
    """The rows both encoders get: the tensor's own, or its flat data in rows of 256."""
    if qtype in K_QUANTS:
        flat = x.reshape(-1)
        return flat[: flat.size // 256 * 256].reshape(-1, 256)
    return x


def main():
    from lmforge.checkpoint import open_checkpoint
    from lmforge.quant import ggml
    from lmforge.registry import DEFAULT_MODEL, known_model_path

    ckpt = open_checkpoint(known_model_path(DEFAULT_MODEL))
    names = [i.name for i in ckpt.infos if len(i.shape) == 2]
    acc = {
        t: dict(blocks=0, identical=0, worst_steps=0.0, ratios=[], s_ours=0.0, s_ref=0.0, bytes=0, dropped=0)
        for t in TYPES
    }
    for n, name in enumerate(names):
        w = ckpt.read(name)
        for t in TYPES:
            x = np.ascontiguousarray(rows_for(w, t))
            t0 = time.perf_counter()
            ours = ggml.quantize(x, t)
            t1 = time.perf_counter()
            theirs = ggml_ref.quantize(x, t)
            t2 = time.perf_counter()
            c = ggml_ref.compare(x, ours, theirs, t)
            a = acc[t]
            a["blocks"] += c.n_blocks
            a["identical"] += c.identical
            a["worst_steps"] = max(a["worst_steps"], c.worst_steps)
            a["ratios"].append((c.rmse_ours / c.rmse_ref) if c.rmse_ref else (1.0 if not c.rmse_ours else np.inf))
            a["s_ours"] += t1 - t0
            a["s_ref"] += t2 - t1
            a["bytes"] += x.nbytes
            a["dropped"] += w.size - x.size
        print(f"[{n + 1}/{len(names)}] {name} {w.shape}", flush=True)

    rows = []
    for t, a in acc.items():
        r = np.array(a["ratios"])
        rows.append(
            {
                "type": t.name,
                "tensors": len(r),
                "blocks": a["blocks"],
                "identical_blocks": a["identical"],
                "identical_rate": a["identical"] / a["blocks"],
                "worst_steps": a["worst_steps"],
                "worst_rmse_ratio": float(r.max()),
                "mean_rmse_ratio": float(r.mean()),
                "ours_mb_s": a["bytes"] / 1e6 / a["s_ours"],
                "llamacpp_mb_s": a["bytes"] / 1e6 / a["s_ref"],
                "values_dropped": a["dropped"],
            }
        )
    lines = [
        f"# ggml codecs: lmforge vs llama.cpp (ggml {ggml_ref.ggml_commit()}), every 2-D tensor of "
        f"SmolLM2-135M-Instruct ({len(names)} tensors)",
        "",
        "Same float32 rows into both encoders; K-quants on the flat data in rows of 256. "
        "Steps: largest |ours - llama.cpp| of a decoded value over llama.cpp's quantization step there. "
        f"Speed: MB/s of float32 input, one thread, {platform.machine()} / {platform.python_version()}.",
        "",
        "| type | blocks | identical blocks | worst step distance | worst RMSE ratio | mean RMSE ratio "
        "| lmforge MB/s | llama.cpp MB/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['type']} | {r['blocks']} | {100 * r['identical_rate']:.4f}% | {r['worst_steps']:.3g} | "
        f"{r['worst_rmse_ratio']:.6f} | {r['mean_rmse_ratio']:.6f} | {r['ours_mb_s']:.0f} | "
        f"{r['llamacpp_mb_s']:.0f} |"
        for r in rows
    ]
    save("codec_accuracy", "\n".join(lines))


if __name__ == "__main__":
    main()
