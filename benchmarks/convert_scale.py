"""Converting a 3.8B model in a few GiB: a random-weight checkpoint with Phi-3-mini-4k's exact
shapes (bf16 safetensors, Phi3ForCausalLM, 3.8B parameters) converted to cpu-int4, with peak RSS
and wall time; then decode speed measured as `lmforge bench` does (each runner in its own process,
interleaved): lmforge's engine and onnxruntime-genai on lmforge's folder, llama.cpp on the Q4_0 GGUF
lmforge writes from the same checkpoint (and onnxruntime-genai on its builder's folder with --with-builder).

    python benchmarks/convert_scale.py [--work DIR] [--with-builder] [--rounds 3]

The checkpoint (7.6 GB) is written once into --work (default: a temporary folder). With
--with-builder, onnxruntime-genai's model builder converts the same input too (it peaked near
23 GiB on this 24 GiB machine when measured before: it may be killed). Writes
benchmarks/results/convert_scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
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


def fit_vocab(path: Path, size: int) -> None:
    """Cut a byte-level BPE tokenizer to its first SIZE ids (merges whose parts or result fall
    outside go too), so that its vocabulary matches the embedding rows as llama.cpp requires."""
    tok = json.loads(path.read_text())
    model = tok["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < size}
    pairs = [m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]]
    model["merges"] = [[a, b] for a, b in pairs if {a, b, a + b} <= model["vocab"].keys()]
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < size]
    path.write_text(json.dumps(tok, ensure_ascii=False))


def write_checkpoint(folder: Path) -> int:
    """Random bf16 weights (std 0.02; norms 1) written tensor by tensor; returns the parameter count."""
    from lmforge.checkpoint import open_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(PHI3_MINI, indent=2))
    open_checkpoint("smollm2-135m").tokenizer().save(folder)  # any real tokenizer: weights are random
    fit_vocab(folder / "tokenizer.json", PHI3_MINI["vocab_size"])
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


# Runs a command and prints its own peak RSS: RUSAGE_CHILDREN in this process would give the largest
# of every child so far, not the one just run.
_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def peak_rss_of(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of a child process."""
    t = time.time()
    r = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    wall = time.time() - t
    lines = r.stderr.strip().splitlines() or ["0"]
    if r.returncode:
        print("\n".join(lines[:-1])[-1500:], file=sys.stderr)
    return r.returncode, wall, int(lines[-1]) * 1024 if lines[-1].isdigit() else 0


def folder_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir()) / 2**30, 2)


def decode_rows(runners: list[tuple[str, str, Path]], prompt: int, gen: int, rounds: int) -> list[dict]:
    """Decode figures of each (runner kind, label, path), measured as `lmforge bench` measures: each
    runner in a fresh process, 2 threads, greedy, the runners taking turns over `rounds` rounds."""
    from lmforge.bench import PAUSE_S, _figures, _row

    ids = list(range(100, 100 + prompt))  # random weights: any ids serve
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"ids": ids, "gen": gen, "reps": 2, "threads": 2}))
        passes: list[list[dict]] = [[] for _ in runners]
        for _ in range(rounds):
            for (kind, _, path), done in zip(runners, passes):
                time.sleep(PAUSE_S)
                done.append(_figures(kind, path, job))
                print(kind, path.name, done[-1].get("decode", done[-1]), flush=True)
    return [_row(label, path, done) for (_, label, path), done in zip(runners, passes)]


def convert_row(tool: str, cmd: list[str]) -> dict:
    rc, wall, peak = peak_rss_of(cmd)
    row = {"tool": tool, "exit": rc, "seconds": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 2)}
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work")
    ap.add_argument("--with-builder", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if not args.work else None
    work = Path(args.work or tmp.name)
    src = work / "phi3-mini-random"
    if not (src / "tokenizer.json").exists():
        t = time.time()
        n = write_checkpoint(src)
        print(f"wrote {n / 1e9:.2f}B parameters in {time.time() - t:.0f} s", flush=True)
    lmf = [sys.executable, "-m", "lmforge", "convert", str(src), "--force", "-o"]
    out, gguf, genai = work / "cpu-int4", work / "q4_0.gguf", work / "genai"
    rows = [convert_row("lmforge convert --target cpu-int4", [*lmf, str(out), "--target", "cpu-int4"])]
    rows[-1]["output_gib"] = folder_gib(out)
    rows.append(convert_row("lmforge convert --gguf q4_0", [*lmf, str(gguf), "--gguf", "q4_0"]))
    rows[-1]["output_gib"] = round(gguf.stat().st_size / 2**30, 2) if gguf.exists() else ""
    # onnxruntime-genai runs lmforge's folder too (it is one of its folders), and its own builder's
    # output when --with-builder (that conversion peaked near 23 GiB on a 24 GiB machine).
    runners = [
        ("lmforge", "lmforge engine, lmforge cpu-int4", out),
        ("ortgenai", "onnxruntime-genai, lmforge cpu-int4", out),
        ("llamacpp", "llama.cpp, lmforge q4_0.gguf", gguf),
    ]
    if args.with_builder:
        builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(genai)]
        rows.append(
            convert_row(
                "onnxruntime-genai builder -p int4 -e cpu", [*builder, "-p", "int4", "-e", "cpu", "-c", str(work / "c")]
            )
        )
        if rows[-1]["exit"] == 0:
            rows[-1]["output_gib"] = folder_gib(genai)
            runners.append(("ortgenai", "onnxruntime-genai, its builder's int4", genai))
    decode = decode_rows(runners, args.prompt_tokens, args.decode_tokens, args.rounds)
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "convert_scale.json").write_text(json.dumps({"convert": rows, "decode": decode}, indent=2))
    lines = [
        "# Converting a 3.8B Phi-3-mini-shaped checkpoint (bf16, random weights) on 2 cores / 24 GiB",
        "",
        "| tool | exit | seconds | peak RSS GiB | output GiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = (r["tool"], r["exit"], r["seconds"], r["peak_rss_gib"], r.get("output_gib", ""))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        f"Decode, {args.prompt_tokens}-token prompt, {args.decode_tokens} tokens, 2 threads, runners interleaved over "
        f"{args.rounds} rounds, each in its own process (`lmforge bench`'s runners):",
        "",
        "| runner | decode tok/s | std | x lmforge |",
        "| --- | ---: | ---: | ---: |",
    ]
    base = decode[0].get("decode_mean")
    for r in decode:
        if "error" in r:
            lines.append(f"| {r['runner']} | failed: {r['error']} | | |")
        else:
            ratio = round(r["decode_mean"] / base, 2) if base else ""
            lines.append(f"| {r['runner']} | {r['decode_mean']} | {r['decode_std']} | {ratio} |")
    (res / "convert_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
