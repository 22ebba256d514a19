"""`lmforge recommend`: the form of a model that fits this machine, and the command to make it.

Memory is estimated as weights (bytes per parameter of each form, measured on the default
model's folders and files) plus a KV cache for `context` tokens and the runtime's own overhead.
Quality cost is the perplexity increase measured on the default model (WikiText-2, 40 windows).
Among the forms that fit, the one with the least quality cost wins, then the smallest.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError

OVERHEAD = 300 << 20  # ONNX Runtime, tokenizer and Python, measured ~250-350 MB on the default model
# llama.cpp's peak RSS beyond its file and its logits buffer (measured on the default model: 197 MB
# for a 94 MB file, of which ~100 MB is that buffer)
LLAMACPP_OVERHEAD = 32 << 20
LLAMACPP = "llama.cpp"


@dataclass(frozen=True)
class Form:
    target: str
    bytes_per_param: float  # measured: default model (515 MB fp32, 109 MB int4 folders; 143 MB Q8_0, 105 MB Q4_K_M)
    kv_bytes: int  # per cached value
    needs: str  # execution provider, or llama.cpp
    quality: str
    speed: str
    cost: float  # perplexity increase in %, from a float source
    cost_from_quantized: float | None = None  # from a quantized GGUF (its own weights), when different

    @property
    def gguf_type(self) -> str | None:
        return self.target.removeprefix("gguf-") if self.needs == LLAMACPP else None


FORMS = (
    Form("cpu-fp32", 4.0, 4, "CPUExecutionProvider", "reference", "1.0x decode", 0.0),
    Form("cuda-fp16", 2.0, 2, "CUDAExecutionProvider", "~reference (fp16)", "GPU", 0.0),
    Form("cuda-int4", 0.85, 2, "CUDAExecutionProvider", "int4: as cpu-int4", "GPU", 27.0, 0.3),
    Form(
        "cpu-int4",
        0.85,
        4,
        "CPUExecutionProvider",
        "int4: +0.3% ppl from a Q4_1 GGUF (its own weights); quantizing those again: +27%",
        "~2.2x decode",
        27.0,
        0.3,
    ),
    Form("gguf-q8_0", 1.06, 2, LLAMACPP, "Q8_0: +0.5% ppl", "~1.9x decode", 0.5),
    Form("gguf-q4_k_m", 0.78, 2, LLAMACPP, "Q4_K_M: +6% ppl", "~1.9x decode", 6.0),
)


INSTALL = {
    LLAMACPP: "llama.cpp is not installed (pip install 'lmforge[llamacpp]')",
    "CUDAExecutionProvider": "ONNX Runtime has no CUDAExecutionProvider here (a CUDA GPU and onnxruntime-gpu)",
}


def _ruled_out(f: Form, need: int, room: int, providers: set[str], given: bool) -> str | None:
    """Why form F cannot run here, in one line; None when it can."""
    if f.needs not in providers:
        return INSTALL.get(f.needs, f"ONNX Runtime has no {f.needs} here")
    if need > room:
        where = "GPU memory" if f.needs == "CUDAExecutionProvider" else "memory"
        state = "given" if given else "free"
        return f"too big: needs {need / 2**30:.2f} GiB, {where} {state} is {room / 2**30:.2f} GiB"
    return None


def recommend(model, memory_gb: float | None = None, context: int = 4096) -> dict:
    """The recommended form of MODEL for this machine (or for `memory_gb` of memory): a dict with
    the command that makes it and every form's row (memory need, fits, and `ruled_out`: why a form
    that does not fit is ruled out, in one line)."""
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
    gpu_budget = (
        int(memory_gb * 2**30)
        if memory_gb is not None
        else max((g["free_bytes"] or 0 for g in info["gpus"]), default=0)
    )
    providers = set(info["onnxruntime"]["providers"])
    if info.get("llama_cpp") and "error" not in info["llama_cpp"]:
        providers.add(LLAMACPP)
    quantized_source = ckpt.format == "gguf" and any(t.dtype not in ("F32", "F16", "BF16") for t in ckpt.infos)
    ctx = min(context, spec.context_length)
    rows = []
    for f in FORMS:
        kv = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * ctx * f.kv_bytes
        # llama.cpp also reserves float32 logits for a whole 512-token batch (~100 MB at 49k tokens)
        overhead = LLAMACPP_OVERHEAD + 4 * spec.vocab_size * 512 if f.gguf_type else OVERHEAD
        need = int(ckpt.n_params * f.bytes_per_param) + kv + overhead
        # a quantized GGUF already carries int4 weights: transcoding them loses nothing more
        cost = f.cost_from_quantized if quantized_source and f.cost_from_quantized is not None else f.cost
        room = gpu_budget if f.needs == "CUDAExecutionProvider" else budget
        ruled_out = _ruled_out(f, need, room, providers, memory_gb is not None)
        rows.append(
            {
                "target": f.target,
                "memory_bytes": need,
                "fits": ruled_out is None,
                "ruled_out": ruled_out,
                "provider": f.needs,
                "quality": f.quality,
                "speed": f.speed,
                "ppl_cost_percent": cost,
            }
        )
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        runnable = [r["memory_bytes"] for r in rows if r["provider"] in providers] or [r["memory_bytes"] for r in rows]
        raise LmforgeError(
            f"no form of this model fits in {budget / 2**30:.1f} GiB "
            f"(the smallest that can run here needs {min(runnable) / 2**30:.1f} GiB)"
        )
    best = min(fitting, key=lambda r: (r["ppl_cost_percent"], r["memory_bytes"]))
    form = next(f for f in FORMS if f.target == best["target"])
    if form.gguf_type:
        command = f"lmforge convert {model} -o {ckpt.path.stem}-{form.gguf_type}.gguf --gguf {form.gguf_type}"
    else:
        command = f"lmforge convert {model} -o {ckpt.path.stem}-{best['target']} --target {best['target']}"
    return {
        "model": str(ckpt.path),
        "budget_bytes": budget,
        "context": ctx,
        "recommended": best["target"],
        "command": command,
        "forms": rows,
    }
