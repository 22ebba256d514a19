"""GGUF files for llama.cpp from any source lmforge reads (HF folder, GGUF, known name).

Metadata follows llama.cpp's converter per architecture (each family's `Arch` gives its GGUF
name, its own keys and the tensor transforms, such as the q/k row interleave of Llama-family
attention); rope scaling goes in as llama.cpp stores it (Phi-3's longrope factors and Llama 3's
frequency divisors as tensors). The file is streamed: every
tensor info first (types are decided from names and shapes), then the data one tensor at a time
into a hidden temporary file beside OUT, renamed into place when complete.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from lmforge.arch import gguf_general_name
from lmforge.arch.common import GGUF_KEYS
from lmforge.arch.llama import llama3_inv_freq
from lmforge.checkpoint import open_checkpoint
from lmforge.checkpoint.base import TensorInfo
from lmforge.errors import LmforgeError, writing
from lmforge.export.atomic import clean_stale, replace, temp_path
from lmforge.export.gguf_mix import FileType, get_file_type, tensor_type
from lmforge.export.gguf_vocab import hf_vocab
from lmforge.progress import Progress
from lmforge.spec import ModelSpec

log = logging.getLogger(__name__)
QUANTIZATION_VERSION = 2
NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def _arch_metadata(ckpt) -> tuple[dict, dict[str, np.ndarray]]:
    """`{arch}.*` hyper-parameters (key -> (value, type)) and hyper-parameter tensors: the keys
    every family has (GGUF_KEYS), rope scaling, then the family's own (`Arch.gguf_metadata`)."""
    spec, a = ckpt.spec, ckpt.arch.gguf_arch
    meta = {f"{a}.{key}": (getattr(spec, attr), kind) for key, (attr, kind) in GGUF_KEYS.items()}
    tensors: dict[str, np.ndarray] = {}
    rs = spec.rope_scaling
    if rs is not None:
        if rs.kind == "linear":
            meta[f"{a}.rope.scaling.type"] = ("linear", "string")
            meta[f"{a}.rope.scaling.factor"] = (rs.factor, "float32")
        elif rs.kind == "yarn":
            meta[f"{a}.rope.scaling.type"] = ("yarn", "string")
            meta[f"{a}.rope.scaling.factor"] = (rs.factor, "float32")
            meta[f"{a}.rope.scaling.original_context_length"] = (rs.original_context_length, "uint32")
        elif rs.kind == "longrope":
            meta[f"{a}.rope.scaling.original_context_length"] = (rs.original_context_length, "uint32")
            meta[f"{a}.rope.scaling.attn_factor"] = (rs.attention_factor or 1.0, "float32")
            tensors["rope_factors_long.weight"] = np.asarray(rs.long_factor, dtype=np.float32)
            tensors["rope_factors_short.weight"] = np.asarray(rs.short_factor, dtype=np.float32)
        elif rs.kind == "llama3":
            tensors["rope_freqs.weight"] = llama3_freq_factors(spec)
        elif rs.kind == "freq_factors":
            tensors["rope_freqs.weight"] = np.asarray(rs.long_factor, dtype=np.float32)
        else:
            raise LmforgeError(f"writing GGUF for rope scaling {rs.kind!r} is not supported")
    meta.update({f"{a}.{key}": value for key, value in ckpt.arch.gguf_metadata(spec).items()})
    return meta, tensors


def llama3_freq_factors(spec: ModelSpec) -> np.ndarray:
    """Llama 3 rope scaling as llama.cpp stores it: one divisor per rotary frequency (float64
    frequencies, then float32)."""
    inv = 1.0 / spec.rope_theta ** (np.arange(0, spec.rotary_dim, 2, dtype=np.float64) / spec.rotary_dim)
    return (inv / llama3_inv_freq(inv, spec.rope_scaling)).astype(np.float32)


def _add(writer, key: str, value, kind: str) -> None:
    import gguf

    T = gguf.GGUFValueType
    if kind == "array":
        first = value[0] if len(value) else ""
        sub = (
            T.STRING
            if isinstance(first, str)
            else T.BOOL
            if isinstance(first, bool)
            else T.INT32
            if isinstance(first, (int, np.integer))
            else T.FLOAT32
        )
        writer.add_key_value(key, list(value), T.ARRAY, sub_type=sub)
    else:
        writer.add_key_value(
            key, value, {"uint32": T.UINT32, "float32": T.FLOAT32, "string": T.STRING, "bool": T.BOOL}[kind]
        )


def _copy(writer, meta, key: str) -> None:
    """Copy one key of a GGUF source with the value type it had there."""
    import gguf

    T = gguf.GGUFValueType
    vtype, etype = meta.types[key]
    value = meta[key]
    if vtype == T.ARRAY:
        if len(value) == 0:  # gguf-py cannot write an empty array; llama.cpp treats absent as empty
            return
        writer.add_key_value(key, [v.item() if hasattr(v, "item") else v for v in value], T.ARRAY, sub_type=T(etype))
    else:
        writer.add_key_value(key, value, T(vtype))


class _Plan:
    """The tensors of the output in order: GGUF name, numpy shape, ggml type, and where the data
    comes from (canonical name and stored type, or None for hyper-parameter tensors)."""

    def __init__(self, ckpt, ft: FileType, extra: dict[str, np.ndarray], keep_types: bool):
        import gguf

        spec, arch = ckpt.spec, ckpt.arch
        self.items: list[tuple[str, tuple[int, ...], object, TensorInfo | None]] = []
        self.notes: list[str] = []
        names = [i for i in ckpt.infos if not (spec.tied_embeddings and i.name == "lm_head")]
        has_output = any(i.name == "lm_head" for i in names)
        for info in names:
            gname = arch.source_name(info.name, "gguf")
            if gname is None:
                raise LmforgeError(
                    f"tensor {info.name!r} has no GGUF name for {spec.arch}; this model cannot be written as GGUF"
                )
            if keep_types:  # the source's own choice for this tensor, whatever our rules would pick
                self.items.append((gname, tuple(info.shape), gguf.GGMLQuantizationType[info.dtype], info))
                continue
            qtype, note = tensor_type(gname, info.shape, ft, spec.n_layers, has_output, spec.n_experts)
            if note:
                self.notes.append(note)
            self.items.append((gname, tuple(info.shape), qtype, info))
        for gname, arr in extra.items():
            self.items.append((gname, arr.shape, tensor_type(gname, arr.shape, ft, spec.n_layers, has_output)[0], None))


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    """`arr` in ggml type `qtype`: float arrays for F32/F16, uint8 blocks (rows, bytes) otherwise."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    from lmforge.quant.ggml import quantize

    return quantize(np.ascontiguousarray(arr, dtype=np.float32).reshape(arr.shape[0], -1), qtype)


def keeps_source_types(ckpt, ft: FileType, requantize: bool) -> bool:
    """Whether a GGUF source already of file type `ft` passes through: each tensor keeps its type
    and bytes (the file's own mix may differ from lmforge's rules, e.g. llama.cpp's per-family ones)."""
    return ckpt.format == "gguf" and not requantize and ckpt.meta.get("general.file_type") == int(ft.ftype)


def convert_to_gguf(
    source, out, gguf_type: str = "q8_0", force: bool = False, progress: bool | None = None, requantize: bool = False
) -> Path:
    """Write SOURCE (known name, HF folder, GGUF file) as a GGUF file OUT of type `gguf_type`
    (f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k_m q5_k_m q6_k). From a GGUF source, tensors whose
    type does not change are copied block for block; a source already of that file type is copied
    as it is, tensor types included, unless `requantize` (then each tensor's type follows
    llama.cpp's rules, as for any other source). Returns OUT."""
    import gguf

    ft = get_file_type(gguf_type)
    ckpt = open_checkpoint(source)
    out = Path(out).expanduser().resolve()
    if out.exists() and (not force or not out.is_file()):
        raise LmforgeError(f"{out} already exists; choose another -o or pass --force to replace it")
    if not out.parent.is_dir():
        raise LmforgeError(f"folder {out.parent} does not exist; create it first")
    if ckpt.path.resolve() == out:
        raise LmforgeError(f"-o {out} is the source; name a new file")
    spec = ckpt.spec
    if ckpt.format == "gguf":  # its tokenizer and model card, copied with their value types
        copied = [k for k in ckpt.meta if k.startswith(("tokenizer.", "general.")) and k not in NOT_COPIED]
        vocab, tokens = {}, ckpt.meta.get("tokenizer.ggml.tokens", [])
    else:
        copied, vocab = [], hf_vocab(ckpt.path, spec.vocab_size, spec.pad_token_id)
        tokens = vocab["tokenizer.ggml.tokens"][0]
    meta, extra = _arch_metadata(ckpt)
    plan = _Plan(ckpt, ft, extra, keeps_source_types(ckpt, ft, requantize))
    if plan.notes:  # one line per kind of fallback, as a summary
        log.warning(
            f"{len(plan.notes)} tensors fall back to another type ({plan.notes[0]}"
            f"{', ...' if len(plan.notes) > 1 else ''})"
        )

    with writing(out.parent, every=True):
        clean_stale(out)  # temporary files of killed conversions
        tmp = temp_path(out)
        open(tmp, "wb").close()  # the destination takes a file, or this is the one-line error
        writer = gguf.GGUFWriter(tmp, ckpt.arch.gguf_arch)
    try:
        with writing(out):
            _write(writer, ckpt, plan, copied, vocab, meta, extra, tokens, ft, progress)
            replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _write(writer, ckpt, plan, copied, vocab, meta, extra, tokens, ft, progress) -> None:
    """Header, metadata, tensor infos and data into `writer`'s file, flushed to disk."""
    import gguf

    spec = ckpt.spec
    if "general.name" not in copied:
        writer.add_name(gguf_general_name(ckpt.path.stem, tokens))
    for key in copied:
        _copy(writer, ckpt.meta, key)
    writer.add_file_type(int(ft.ftype))
    writer.add_quantization_version(QUANTIZATION_VERSION)
    for key, (value, kind) in {**meta, **vocab}.items():
        _add(writer, key, value, kind)
    template = ckpt.chat_template()
    if template and "tokenizer.chat_template" not in vocab and "tokenizer.chat_template" not in copied:
        writer.add_chat_template(template)
    for gname, shape, qtype, _ in plan.items:
        nbytes = math.prod(shape) // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1]
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = Progress(len(plan.items), progress, "gguf", unit="tensor")
    for gname, _shape, qtype, info in plan.items:
        if info is None:
            data = _encode(extra[gname], qtype)
        elif ckpt.format == "gguf" and info.dtype == qtype.name:
            data = ckpt.stored_blocks(info.name)  # same type: the stored bytes, untouched
        else:
            data = _encode(ckpt.arch.to_gguf(info.name, ckpt.read(info.name), spec), qtype)
        writer.write_tensor_data(data)
        bar.update()
    bar.close()
    for f in writer.fout or []:  # on disk before the name says complete
        f.flush()
        os.fsync(f.fileno())
    writer.close()
