"""GGUF files: metadata -> ModelSpec, tensors -> numpy (dequantized) or raw quantized blocks.

llama.cpp's converter interleaves the rows of Llama-family q/k projections for its rotary
layout and stores Gemma norms as 1 + w; the stream undoes both so it is in HF order and values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.arch import get_gguf_arch
from lmforge.checkpoint.base import Checkpoint, TensorInfo
from lmforge.checkpoint.gguf_format import parse
from lmforge.checkpoint.spec import ModelSpec, RopeScaling
from lmforge.errors import CheckpointError

# Tensors that carry hyper-parameters rather than weights.
DEQUANT_ROWS = 2048  # rows dequantized at a time
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class QuantizedTensor:
    """Raw GGUF blocks of one tensor: `blocks` is uint8 (rows, bytes_per_row), rows in HF order."""

    qtype: str
    shape: tuple[int, ...]
    blocks: np.ndarray


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave: rows (head, pair, half) -> (head, half, pair).

    Works on weights (rows, cols), biases (rows,) and raw block rows (rows, bytes)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row interleave (what its HF converter applies); inverse of `unpermute_qk`."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def read_metadata(path: Path) -> dict:
    """A GGUF file's key-value metadata as plain Python values (arrays as lists)."""
    meta, _, mm = parse(Path(path))
    mm.close()
    return meta


def spec_from_gguf(meta: dict, arch, tensors: dict, floats) -> ModelSpec:
    """ModelSpec from GGUF metadata; `tensors` maps GGUF names to entries (llama.cpp infers the
    tied output, biases and q/k norms from the tensor list) and `floats(name)` reads a small
    float tensor (rope factors)."""
    a = meta.get("general.architecture")

    def g(key, default=None):
        return meta.get(f"{a}.{key}", default)

    try:
        hidden = int(g("embedding_length"))
        n_heads = int(g("attention.head_count"))
        n_layers = int(g("block_count"))
        ffn = int(g("feed_forward_length"))
    except TypeError:
        raise CheckpointError(f"GGUF file lacks {a}.embedding_length/block_count/...; it is incomplete") from None
    n_kv = int(g("attention.head_count_kv", n_heads))
    head_dim = int(g("attention.key_length", hidden // n_heads))
    rotary = int(g("rope.dimension_count", head_dim))
    tokens = meta.get("tokenizer.ggml.tokens")
    embed = tensors.get("token_embd.weight")
    vocab = g("vocab_size") or (len(tokens) if tokens else int(embed.shape[0]))
    context = int(g("context_length", 2048))

    scaling = None
    kind = g("rope.scaling.type")
    if "rope_factors_long.weight" in tensors:
        orig = int(g("rope.scaling.original_context_length", context))
        long_f = tuple(floats("rope_factors_long.weight").tolist())
        short_f = tuple(floats("rope_factors_short.weight").tolist())
        attn = g("rope.scaling.attn_factor")
        scaling = RopeScaling("longrope", factor=context / orig, original_context_length=orig,
                              short_factor=short_f, long_factor=long_f,
                              attention_factor=_f32(attn) if attn is not None else None)
    elif "rope_freqs.weight" in tensors:  # llama3-style scaling, stored as per-frequency divisors
        scaling = RopeScaling("freq_factors",
                              long_factor=tuple(floats("rope_freqs.weight").tolist()))
    elif kind == "linear":
        scaling = RopeScaling("linear", factor=_f32(g("rope.scaling.factor")))
    elif kind == "yarn":
        scaling = RopeScaling("yarn", factor=_f32(g("rope.scaling.factor")),
                              original_context_length=int(g("rope.scaling.original_context_length")))

    window = g("attention.sliding_window")
    layer_types: tuple[str, ...] = ()
    extra = {}
    if arch.model_type == "gemma3_text":
        from lmforge.arch.gemma3 import pattern_layer_types

        pattern = g("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            layer_types = tuple("sliding" if p else "full" for p in pattern)
        else:
            layer_types = pattern_layer_types(n_layers, int(pattern) if pattern else 6)
        extra = dict(rope_local_theta=_f32(g("rope.freq_base_swa", 10000.0)),
                     # llama.cpp scales by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): hidden/heads
                     query_pre_attn_scalar=float(hidden // n_heads if n_layers == 62 else head_dim),
                     embedding_scale=math.sqrt(hidden), norm_offset=1.0)
    elif window:
        layer_types = ("sliding",) * n_layers

    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelSpec(
        # llama.cpp writes Mistral as `llama`; a window (which only lmforge's files keep) tells it apart
        arch="mistral" if a == "llama" and window else a,
        hidden_size=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=ffn,
        vocab_size=int(vocab),
        context_length=context,
        rope_theta=_f32(g("rope.freq_base", 10000.0)),
        norm_eps=_f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tied_embeddings="output.weight" not in tensors,
        activation=arch.activation,
        rope_scaling=scaling,
        partial_rotary_factor=rotary / head_dim,
        attention_bias="blk.0.attn_q.bias" in tensors,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        post_norms="blk.0.post_attention_norm.weight" in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        **extra,
    )


class GGUFCheckpoint(Checkpoint):
    """A GGUF file; tensors stay memory-mapped until the stream reaches them."""

    format = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = path
        self.file_bytes = path.stat().st_size
        self.meta, entries, self._mm = parse(path)
        gguf_arch = self.meta.get("general.architecture")
        if not gguf_arch:
            raise CheckpointError(f"{path} has no general.architecture; it is not a model GGUF")
        self.arch = get_gguf_arch(gguf_arch)
        by_name = {e.name: e for e in entries}
        self.spec = spec_from_gguf(self.meta, self.arch, by_name, lambda n: self._dequantize(by_name[n]))
        match = self.arch.matcher("gguf")
        self._entries = {}
        self.infos = []
        for e in entries:
            if e.name in ROPE_TENSORS:
                continue
            name = match(e.name)
            if name is None:
                raise CheckpointError(
                    f"tensor {e.name!r} has no place in lmforge's {gguf_arch} table; this GGUF variant is not supported")
            self._entries[name] = e
            qtype = gguf.GGMLQuantizationType(e.qtype).name
            self.infos.append(TensorInfo(name, e.name, e.shape, qtype, e.nbytes))

    def _rows(self, e) -> np.ndarray:
        """The stored bytes of a tensor as (rows, bytes_per_row) uint8, memory-mapped."""
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=e.nbytes, offset=e.offset)
        return buf.reshape(e.shape[0] if len(e.shape) > 1 else 1, -1)

    def _dequantize(self, e) -> np.ndarray:
        import gguf

        qtype = gguf.GGMLQuantizationType(e.qtype)
        rows = self._rows(e)
        out = np.empty((rows.shape[0], int(np.prod(e.shape[1:], dtype=np.int64)) if len(e.shape) > 1
                        else e.shape[0]), dtype=np.float32)
        # row chunks bound gguf-py's temporaries to a few MB instead of several tensor copies
        for r in range(0, rows.shape[0], DEQUANT_ROWS):
            out[r:r + DEQUANT_ROWS] = gguf.quants.dequantize(rows[r:r + DEQUANT_ROWS], qtype)
        return out.reshape(e.shape)

    def _heads_for(self, name: str) -> int | None:
        """Number of heads to un-permute by, when `name` is a permuted q/k tensor."""
        if not self.arch.permute_qk:
            return None
        kind = name.split(".")[2] if name.startswith("layers.") else ""
        return {"q": self.spec.n_heads, "k": self.spec.n_kv_heads}.get(kind)

    def read(self, name: str) -> np.ndarray:
        """One tensor by canonical name, dequantized to float32, in HF order and values."""
        arr = self._dequantize(self._entries[name])
        heads = self._heads_for(name)
        if heads:
            arr = unpermute_qk(arr, heads)
        if self.arch.gguf_norm_offset and name.endswith("norm"):
            arr = arr - np.float32(self.arch.gguf_norm_offset)
        return arr

    def read_raw(self, name: str) -> QuantizedTensor:
        """One tensor's stored blocks (rows un-permuted for q/k), for lossless transcoding."""
        import gguf

        e = self._entries[name]
        blocks = self._rows(e)
        heads = self._heads_for(name)
        if heads:
            blocks = unpermute_qk(blocks, heads)
        return QuantizedTensor(gguf.GGMLQuantizationType(e.qtype).name, e.shape, blocks)

    def stored_blocks(self, name: str) -> np.ndarray:
        """One tensor's bytes exactly as stored (llama.cpp's row order), for copying into a GGUF."""
        return self._rows(self._entries[name])

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for info in self.infos:
            yield info.name, self.read(info.name)

    def raw_tensors(self) -> Iterator[tuple[str, QuantizedTensor]]:
        """Yield (canonical name, QuantizedTensor) without dequantizing."""
        for info in self.infos:
            yield info.name, self.read_raw(info.name)

    def tokenizer(self):
        from lmforge.tokenizer import Tokenizer

        return Tokenizer.from_gguf_metadata(self.meta)

    def chat_template(self) -> str | None:
        return self.meta.get("tokenizer.chat_template")
