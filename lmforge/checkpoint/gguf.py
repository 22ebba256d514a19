"""GGUF files: metadata -> ModelSpec, tensors -> numpy (dequantized) or raw quantized blocks.

llama.cpp's converter stores some tensors in its own row order or values (see each family's
`Arch.from_gguf`); the stream undoes that, so it is in HF order and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.arch import Arch, get_gguf_arch
from lmforge.arch.common import GGUF_KEYS, GGUF_WINDOW, f32
from lmforge.checkpoint.base import Checkpoint, TensorInfo
from lmforge.checkpoint.gguf_format import parse
from lmforge.checkpoint.validate import check_gguf_keys, check_gguf_vocab, check_tensors, checked_spec
from lmforge.errors import CheckpointError
from lmforge.spec import ModelSpec, RopeScaling

# Tensors that carry hyper-parameters rather than weights.
DEQUANT_ROWS = 2048  # rows dequantized at a time
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class QuantizedTensor:
    """Raw GGUF blocks of one tensor: `blocks` is uint8 (rows, bytes_per_row), rows in HF order."""

    qtype: str
    shape: tuple[int, ...]
    blocks: np.ndarray


def read_metadata(path: Path) -> dict:
    """A GGUF file's key-value metadata as plain Python values (arrays as lists)."""
    meta, _, mm = parse(Path(path))
    mm.close()
    return meta


def _rope_scaling(g, tensors: dict, floats, context: int) -> RopeScaling | None:
    """Rope scaling as llama.cpp stores it: Phi-3 longrope factors and Llama 3 frequency
    divisors as tensors, linear and yarn as keys."""
    kind = g("rope.scaling.type")
    if "rope_factors_long.weight" in tensors:
        orig = int(g("rope.scaling.original_context_length", context))
        attn = g("rope.scaling.attn_factor")
        return RopeScaling(
            "longrope",
            factor=context / orig,
            original_context_length=orig,
            short_factor=tuple(floats("rope_factors_short.weight").tolist()),
            long_factor=tuple(floats("rope_factors_long.weight").tolist()),
            attention_factor=f32(attn) if attn is not None else None,
        )
    if "rope_freqs.weight" in tensors:  # llama3-style scaling, stored as per-frequency divisors
        return RopeScaling("freq_factors", long_factor=tuple(floats("rope_freqs.weight").tolist()))
    if kind == "linear":
        return RopeScaling("linear", factor=f32(g("rope.scaling.factor")))
    if kind == "yarn":
        return RopeScaling(
            "yarn",
            factor=f32(g("rope.scaling.factor")),
            original_context_length=int(g("rope.scaling.original_context_length")),
        )
    return None


def _hparams(g, meta: dict, tensors: dict) -> dict:
    """The `{arch}.*` hyper-parameters every family has (GGUF_KEYS), with llama.cpp's defaults."""
    v = {}
    for key, (attr, _) in GGUF_KEYS.items():
        v.setdefault(attr, g(key))  # the first key of an attribute (key_length, not value_length)
    if None in (v["hidden_size"], v["n_heads"], v["n_layers"], v["intermediate_size"]):
        raise CheckpointError(
            f"GGUF file lacks {meta.get('general.architecture')}.embedding_length/block_count/...; it is incomplete"
        )

    def get(attr, default):
        return default if v[attr] is None else v[attr]

    hidden, n_heads = int(v["hidden_size"]), int(v["n_heads"])
    head_dim = int(get("head_dim", hidden // n_heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = v["vocab_size"] or (len(tokens) if tokens else int(tensors["token_embd.weight"].shape[0]))
    return dict(
        hidden_size=hidden,
        n_layers=int(v["n_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(get("n_kv_heads", n_heads)),
        head_dim=head_dim,
        intermediate_size=int(v["intermediate_size"]),
        vocab_size=int(vocab),
        context_length=int(get("context_length", 2048)),
        rope_theta=f32(get("rope_theta", 10000.0)),
        norm_eps=f32(get("norm_eps", 1e-5)),
        partial_rotary_factor=int(get("rotary_dim", head_dim)) / head_dim,
    )


def spec_from_gguf(meta: dict, arch: Arch, tensors: dict, floats) -> ModelSpec:
    """ModelSpec from GGUF metadata; `tensors` maps GGUF names to entries (llama.cpp infers the
    tied output, biases and q/k norms from the tensor list) and `floats(name)` reads a small
    float tensor (rope factors). The family adds its own fields (`Arch.gguf_spec`)."""
    a = meta.get("general.architecture")

    def g(key, default=None):
        return meta.get(f"{a}.{key}", default)

    def has(canonical: str) -> bool:
        return arch.source_name(canonical, "gguf") in tensors

    fields = _hparams(g, meta, tensors)
    window = g(GGUF_WINDOW)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    fields.update(
        arch=arch.name,
        tied_embeddings=not has("lm_head"),
        activation=arch.activation,
        rope_scaling=_rope_scaling(g, tensors, floats, fields["context_length"]),
        attention_bias=has("layers.0.q.bias"),
        lm_head_bias=has("lm_head.bias"),
        sliding_window=int(window) if window else None,
        layer_types=("sliding",) * fields["n_layers"] if window else (),
        qk_norm=has("layers.0.q_norm"),
        post_norms=has("layers.0.post_attn_norm"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    fields.update(arch.gguf_spec(g, fields))
    return ModelSpec(**fields)


class GGUFCheckpoint(Checkpoint):
    """A GGUF file; tensors stay memory-mapped until the stream reaches them."""

    format = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = path
        self.file_bytes = path.stat().st_size
        self.meta, entries, self._mm = parse(path)
        gguf_arch = self.meta.get("general.architecture")
        if not gguf_arch or not isinstance(gguf_arch, str):
            raise CheckpointError(f"{path} has no general.architecture; it is not a model GGUF")
        check_gguf_keys(self.meta, gguf_arch, path)
        check_gguf_vocab(self.meta, path)
        self.arch = checked_spec(
            path,
            lambda: get_gguf_arch(gguf_arch, lambda key, default=None: self.meta.get(f"{gguf_arch}.{key}", default)),
        )
        by_name = {e.name: e for e in entries}
        if "token_embd.weight" not in by_name:
            raise CheckpointError(f"{path} has no token_embd.weight; the file is incomplete or corrupt")
        self.spec = checked_spec(
            path, lambda: spec_from_gguf(self.meta, self.arch, by_name, lambda n: self._dequantize(by_name[n]))
        )
        match = self.arch.matcher("gguf")
        self._entries = {}
        self.infos = []
        for e in entries:
            if e.name in ROPE_TENSORS:
                continue
            name = match(e.name)
            if name is None:
                raise CheckpointError(
                    f"tensor {e.name!r} has no place in lmforge's {gguf_arch} table; this GGUF variant is not supported"
                )
            self._entries[name] = e
            qtype = gguf.GGMLQuantizationType(e.qtype).name
            self.infos.append(TensorInfo(name, e.name, e.shape, qtype, e.nbytes))
        tokens = self.meta.get("tokenizer.ggml.tokens")
        check_tensors(self.spec, {t.name: t.shape for t in self.infos}, path, len(tokens) if tokens else None)

    def _rows(self, e) -> np.ndarray:
        """The stored bytes of a tensor as (rows, bytes_per_row) uint8, memory-mapped."""
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=e.nbytes, offset=e.offset)
        return buf.reshape(e.shape[0] if len(e.shape) > 1 else 1, -1)

    def _dequantize(self, e) -> np.ndarray:
        import gguf

        qtype = gguf.GGMLQuantizationType(e.qtype)
        rows = self._rows(e)
        out = np.empty(
            (rows.shape[0], int(np.prod(e.shape[1:], dtype=np.int64)) if len(e.shape) > 1 else e.shape[0]),
            dtype=np.float32,
        )
        # row chunks bound gguf-py's temporaries to a few MB instead of several tensor copies
        for r in range(0, rows.shape[0], DEQUANT_ROWS):
            out[r : r + DEQUANT_ROWS] = gguf.quants.dequantize(rows[r : r + DEQUANT_ROWS], qtype)
        return out.reshape(e.shape)

    def read(self, name: str) -> np.ndarray:
        """One tensor by canonical name, dequantized to float32, in HF order and values."""
        return self.arch.from_gguf(name, self._dequantize(self._entries[name]), self.spec)

    def read_raw(self, name: str) -> QuantizedTensor:
        """One tensor's stored blocks (rows in HF order), for lossless transcoding."""
        import gguf

        e = self._entries[name]
        blocks = self.arch.from_gguf(name, self._rows(e), self.spec, raw=True)
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
