"""llama.cpp references for the benchmarks: an F32 GGUF of a quantized GGUF's weights, llama.cpp's
own quantizer on it, and perplexity through llama-cpp-python with lmforge's windows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def dequantized_gguf(src: Path, dst: Path) -> Path:
    """Every tensor of `src` dequantized to F32 (names, order and metadata kept)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        types = field.types
        value = field.contents()
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, types[0], sub_type=types[-1])
        else:
            writer.add_key_value(key, value, types[0])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        writer.add_tensor(
            t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), dtype=np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llamacpp_quantize(src: Path, dst: Path, ftype: str, threads: int = 2, **params) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`), e.g. ftype "Q4_0", "Q4_K_M", "Q8_0";
    `params` set further fields of its parameters (e.g. token_embedding_type=8 for Q8_0)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = threads
    for key, value in params.items():
        setattr(p, key, value)
    params = p
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return dst


def llamacpp_perplexity(
    path: Path, windows: list[list[int]], threads: int = 2, flash_attn: bool = False
) -> tuple[float, int]:
    """Perplexity of a GGUF in llama.cpp over lmforge's windows (second halves scored);
    `flash_attn` as llama-perplexity's default (auto: on, on CPU) rather than llama-cpp-python's (off)."""
    import llama_cpp

    from lmforge.evaluate import nll_of_window

    ctx = len(windows[0])
    llm = llama_cpp.Llama(
        str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads, flash_attn=flash_attn, verbose=False
    )
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        nll, n = nll_of_window(np.asarray(llm.scores[:ctx], dtype=np.float32), w)
        total, count = total + nll, count + n
    return math.exp(total / count), count
