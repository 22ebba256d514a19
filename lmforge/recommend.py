"""`lmforge recommend`: the form of a model that fits this machine, and the command to make it.

Memory is estimated as weights (bytes per parameter of each form, measured on the default
model's folders) plus a KV cache for `context` tokens and ONNX Runtime's own overhead. Among the
forms that fit, the one with the least quality cost wins, then the fastest.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError

OVERHEAD = 300 << 20  # ONNX Runtime, tokenizer and Python, measured ~250-350 MB on the default model


@dataclass(frozen=True)
class Form:
    target: str
    bytes_per_param: float  # measured: default model folders (515 MB fp32, 109 MB int4 for 134.5M params)
    kv_bytes: int           # per cached value
    needs: str              # execution provider
    quality: str
    speed: str
    rank: int               # lower is better quality


FORMS = (
    Form("cpu-fp32", 4.0, 4, "CPUExecutionProvider", "reference", "1.0x decode", 0),
    Form("cuda-fp16", 2.0, 2, "CUDAExecutionProvider", "~reference (fp16)", "GPU", 0),
    Form("cuda-int4", 0.85, 2, "CUDAExecutionProvider", "int4: as cpu-int4", "GPU", 1),
    Form("cpu-int4", 0.85, 4, "CPUExecutionProvider",
         "int4: +0.3% ppl from a Q4_1 GGUF (its own weights); quantizing those again: +27%", "~2.2x decode", 1),
)


def recommend(model, memory_gb: float | None = None, context: int = 4096) -> dict:
    """The recommended form of MODEL for this machine (or for `memory_gb` of memory)."""
    from lmforge.checkpoint import open_checkpoint
    from lmforge.devices import devices

    if memory_gb is not None and memory_gb <= 0:
        raise LmforgeError("--memory must be more than 0 GB")
    if context < 1:
        raise LmforgeError("--context must be at least 1")
    ckpt = open_checkpoint(model)
    spec = ckpt.spec
    info = devices()
    budget = int(memory_gb * 2**30) if memory_gb is not None else info["available_bytes"]
    if not budget:
        raise LmforgeError("cannot read this machine's memory; pass --memory GB")
    # GPU forms live in GPU memory: without --memory, measure them against the freest GPU
    gpu_budget = int(memory_gb * 2**30) if memory_gb is not None else \
        max((g["free_bytes"] or 0 for g in info["gpus"]), default=0)
    providers = set(info["onnxruntime"]["providers"])
    quantized_source = ckpt.format == "gguf" and any(t.dtype not in ("F32", "F16", "BF16") for t in ckpt.infos)
    ctx = min(context, spec.context_length)
    rows = []
    for f in FORMS:
        kv = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * ctx * f.kv_bytes
        need = int(ckpt.n_params * f.bytes_per_param) + kv + OVERHEAD
        # a quantized GGUF already carries int4 weights: transcoding them loses nothing more
        rank = 0 if quantized_source and "int4" in f.target else f.rank
        room = gpu_budget if f.needs == "CUDAExecutionProvider" else budget
        rows.append({"target": f.target, "memory_bytes": need, "fits": need <= room and f.needs in providers,
                     "provider": f.needs, "quality": f.quality, "speed": f.speed, "rank": rank})
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        smallest = min(r["memory_bytes"] for r in rows) / 2**30
        raise LmforgeError(f"no form of this model fits in {budget / 2**30:.1f} GiB (the smallest needs {smallest:.1f} GiB)")
    best = min(fitting, key=lambda r: (r["rank"], r["memory_bytes"]))
    return {"model": str(ckpt.path), "budget_bytes": budget, "context": ctx, "recommended": best["target"],
            "command": f"lmforge convert {model} -o {ckpt.path.stem}-{best['target']} --target {best['target']}",
            "forms": rows}
