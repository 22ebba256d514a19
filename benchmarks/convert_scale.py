"""Converting a 3.8B model in a few GiB: a random-weight checkpoint with Phi-3-mini-4k's exact
shapes (bf16 safetensors, Phi3ForCausalLM, 3.8B parameters) converted to cpu-int4, with peak RSS
and wall time, and decode speed of the result.

    python benchmarks/convert_scale.py [--work DIR] [--with-builder]

The checkpoint (7.6 GB) is written once into --work (default: a temporary folder). With
--with-builder, onnxruntime-genai's model builder converts the same input too (it peaked near
23 GiB on this 24 GiB machine when measured before: it may be killed). Writes
benchmarks/results/convert_scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PHI3_MINI = {  # microsoft/Phi-3-mini-4k-instruct config.json
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "torch_dtype": "bfloat16",
}


def shapes(cfg) -> dict[str, tuple[int, ...]]:
    h, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(n):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.qkv_proj.weight": (3 * h, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_up_proj.weight": (2 * f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    return out


def write_checkpoint(folder: Path) -> int:
    """Random bf16 weights (std 0.02; norms 1) written tensor by tensor; returns the parameter count."""
    from lmforge.checkpoint import open_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(PHI3_MINI, indent=2))
    open_checkpoint("smollm2-135m").tokenizer().save(folder)  # any real tokenizer: weights are random
    table = shapes(PHI3_MINI)
    header, offset = {}, 0
    for name, shape in table.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in table.items():
            rows = shape[0] if len(shape) > 1 else 1
            cols = int(np.prod(shape)) // rows
            for r in range(0, rows, 4096):
                n = min(4096, rows - r)
                x = (
                    np.ones((n, cols), np.float32)
                    if "norm" in name
                    else rng.standard_normal((n, cols), dtype=np.float32) * np.float32(0.02)
                )
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return sum(int(np.prod(s)) for s in table.values())


def peak_rss_of(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of a child process."""
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if r.returncode:
        print(r.stderr[-1500:], file=sys.stderr)
    return r.returncode, wall, peak


def folder_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir()) / 2**30, 2)


def decode_speed(folder: Path, n: int, genai: bool = False) -> float:
    """Greedy decode tok/s after a 32-token prompt, 2 threads (onnxruntime-genai's API for its folder)."""
    ids = list(range(1, 33))
    if genai:
        import onnxruntime_genai as og

        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n + 1, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(ids)
        t = time.perf_counter()
        for _ in range(n):
            g.generate_next_token()
        return round(n / (time.perf_counter() - t), 2)
    from lmforge.runtime.ort import OrtEngine

    engine = OrtEngine(folder, threads=2)
    cache = engine.new_cache(1, 64)
    logits = engine.prefill(cache, [ids])
    t = time.perf_counter()
    for _ in range(n):
        logits = engine.decode(cache, [int(logits[0].argmax())])
    return round(n / (time.perf_counter() - t), 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work")
    ap.add_argument("--with-builder", action="store_true")
    ap.add_argument("--decode-tokens", type=int, default=16)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if not args.work else None
    work = Path(args.work or tmp.name)
    src = work / "phi3-mini-random"
    if not (src / "tokenizer.json").exists():
        t = time.time()
        n = write_checkpoint(src)
        print(f"wrote {n / 1e9:.2f}B parameters in {time.time() - t:.0f} s", flush=True)
    rows = []
    out = work / "cpu-int4"
    rc, wall, peak = peak_rss_of(
        [sys.executable, "-m", "lmforge", "convert", str(src), "-o", str(out), "--target", "cpu-int4", "--force"]
    )
    row = {
        "tool": "lmforge convert --target cpu-int4",
        "exit": rc,
        "seconds": round(wall, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
    }
    if rc == 0:
        row.update(decode_tok_s=decode_speed(out, args.decode_tokens), output_gib=folder_gib(out))
    rows.append(row)
    print(row, flush=True)
    if args.with_builder:
        rc, wall, peak = peak_rss_of(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(src),
                "-o",
                str(work / "genai"),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(work / "cache"),
            ]
        )
        rows.append(
            {
                "tool": "onnxruntime-genai builder -p int4 -e cpu",
                "exit": rc,
                "seconds": round(wall, 1),
                "peak_rss_gib": round(peak / 2**30, 2),
            }
        )
        if rc == 0:
            rows[-1].update(
                decode_tok_s=decode_speed(work / "genai", args.decode_tokens, genai=True),
                output_gib=folder_gib(work / "genai"),
            )
        print(rows[-1], flush=True)
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "convert_scale.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# Converting a 3.8B Phi-3-mini-shaped checkpoint (bf16, random weights) on 2 cores / 24 GiB",
        "",
        "| tool | exit | seconds | peak RSS GiB | decode tok/s | output GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['tool']} | {r['exit']} | {r['seconds']} | {r['peak_rss_gib']} | {r.get('decode_tok_s', '')} | "
        f"{r.get('output_gib', '')} |"
        for r in rows
    ]
    (res / "convert_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
