"""Checks every reader runs before it trusts a file: hyper-parameters typed and in range before
anything is sized by them, and tensor shapes consistent with them, so a damaged or hostile file
ends in one CheckpointError instead of a traceback, a huge allocation or an engine's abort."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from lmforge.arch.common import GGUF_KEYS, GGUF_WINDOW
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.spec import FLOAT_LIMITS, ModelSpec, check_float, check_int

# Python errors that building a spec from damaged values can raise (int("x"), a list where a
# dict belongs, a key missing, 1 // 0, int(inf), a nesting too deep)
DAMAGE = (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError, RecursionError)
GGUF_FLOATS = {key for key, (attr, _) in GGUF_KEYS.items() if attr in FLOAT_LIMITS}
# keys llama.cpp reads as sizes or counts, besides GGUF_KEYS (ranges of the ModelSpec field named)
GGUF_EXTRA_INTS = {
    GGUF_WINDOW: "sliding_window",
    "rope.scaling.original_context_length": "context_length",
    "attention.sliding_window_pattern": "n_layers",
    "expert_count": "n_heads",
    "expert_used_count": "n_heads",
}
HF_INTS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "context_length",
    "original_max_position_embeddings": "context_length",
    "sliding_window": "sliding_window",
    "sliding_window_pattern": "n_layers",
}
HF_FLOATS = {"rms_norm_eps": "norm_eps", "rope_theta": "rope_theta", "partial_rotary_factor": "partial_rotary_factor"}


def checked_spec(where, build: Callable[[], ModelSpec]) -> ModelSpec:
    """`build()`, with any error that damaged values cause turned into one CheckpointError naming `where`."""
    try:
        return build()
    except LmforgeError as e:
        msg = str(e)
        raise type(e)(f"{where}: {msg[7:]}" if msg.startswith("model: ") else msg) from None
    except DAMAGE as e:
        detail = str(e).splitlines()[0][:100] if str(e) else ""
        raise CheckpointError(
            f"{where} has invalid hyper-parameters ({e.__class__.__name__}{': ' + detail if detail else ''}); "
            "the file is corrupt"
        ) from None


def check_gguf_keys(meta: dict, arch: str, where) -> None:
    """The `{arch}.*` numbers llama.cpp sizes the model by: whole numbers in range, finite floats,
    epsilons and bases positive; a list only where llama.cpp takes one per layer."""
    prefix = f"{arch}."
    for key, value in meta.items():
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix) :]
        if sub in GGUF_KEYS and sub not in GGUF_FLOATS:
            _gguf_int(value, GGUF_KEYS[sub][0], key, where)
        elif sub in GGUF_EXTRA_INTS:
            _gguf_int(value, GGUF_EXTRA_INTS[sub], key, where)
        elif sub in GGUF_FLOATS:
            check_float(value, GGUF_KEYS[sub][0], f"{where}: {key}")
        elif "epsilon" in sub:
            check_float(value, "norm_eps", f"{where}: {key}")
        elif sub.endswith(("freq_base", "freq_base_swa")):
            check_float(value, "rope_theta", f"{where}: {key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{where}: {key} = {value}; the file is corrupt")
        elif isinstance(value, list) and len(value) > 1 << 20:
            raise CheckpointError(f"{where}: {key} has {len(value)} entries; the file is corrupt")
    experts, used = meta.get(prefix + "expert_count", 0), meta.get(prefix + "expert_used_count", 0)
    if not all(isinstance(x, int) for x in (experts, used)) or (experts or used) and not 0 < used <= experts:
        raise CheckpointError(f"{where}: {used} of {experts} experts used per token; the file is corrupt")
    heads = meta.get(prefix + "attention.head_count")
    kv = meta.get(prefix + "attention.head_count_kv")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise CheckpointError(
            f"{where}: {heads} attention heads are not a multiple of {kv} KV heads; the file is corrupt"
        )


def _gguf_int(value, attr: str, key: str, where) -> None:
    """A count, or a list of counts (llama.cpp's per-layer form), each in range."""
    values = value if isinstance(value, list) else [value]
    if not values or len(values) > 1024:
        raise CheckpointError(f"{where}: {key} has {len(values)} entries; the file is corrupt")
    for v in values:
        if isinstance(v, bool) and attr == "n_layers":  # Gemma 3's per-layer sliding flags
            continue
        if v == 0 and type(v) is int and isinstance(value, list):  # llama.cpp: this layer has none (attention, MLP)
            continue
        check_int(v, attr, f"{where}: {key}")


def check_hf_config(cfg, where) -> None:
    """config.json is an object whose size and count fields are whole numbers in range and
    whose float fields are finite (also inside `text_config`), before any is used."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} holds a JSON {type(cfg).__name__}, not an object; fix or re-download it")
    for part in (cfg, cfg.get("text_config")):
        if part is None:
            continue
        if not isinstance(part, dict):
            raise CheckpointError(f"{where}: text_config is not an object; the file is corrupt")
        for key, attr in HF_INTS.items():
            if part.get(key) is not None:
                check_int(part[key], attr, f"{where}: {key}")
        for key, attr in HF_FLOATS.items():
            if part.get(key) is not None:
                check_float(part[key], attr, f"{where}: {key}")
        types = part.get("layer_types")
        if types is not None and (not isinstance(types, list) or len(types) > 1024):
            raise CheckpointError(f"{where}: layer_types is not a list of at most 1024 entries; the file is corrupt")


def expected_shapes(spec: ModelSpec, rows: int) -> dict[str, list[tuple[int, ...]]]:
    """Canonical tensor kind (layer index removed) -> the shapes it may have for `spec` (HF numpy
    order); `rows` is the embedding's row count."""
    h, hd, q, kv, ff = spec.hidden_size, spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.intermediate_size
    ne = spec.n_experts
    one = {
        "embed": (rows, h),
        "lm_head": (rows, h),
        "norm": (h,),
        "attn_norm": (h,),
        "mlp_norm": (h,),
        "norm.bias": (h,),  # LayerNorm's (Phi-3.5-MoE)
        "attn_norm.bias": (h,),
        "mlp_norm.bias": (h,),
        "lm_head.bias": (rows,),
        "post_attn_norm": (h,),
        "post_mlp_norm": (h,),
        "q": (q * hd, h),
        "k": (kv * hd, h),
        "v": (kv * hd, h),
        "o": (h, q * hd),
        "q.bias": (q * hd,),
        "k.bias": (kv * hd,),
        "v.bias": (kv * hd,),
        "o.bias": (h,),
        "qkv": ((q + 2 * kv) * hd, h),
        "gate": (ff, h),
        "up": (ff, h),
        "gate_up": (2 * ff, h),
        "down": (h, ff),
        "router": (ne, h),
        "gate_exps": (ne, ff, h),
        "up_exps": (ne, ff, h),
        "down_exps": (ne, h, ff),
    }
    want = {kind: [shape] for kind, shape in one.items()}
    # q/k norms per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
    want.update(q_norm=[(hd,), (q * hd,)], k_norm=[(hd,), (kv * hd,)])
    return want


def _mlp_kinds(spec: ModelSpec, layers: dict[str, set[int]]) -> list[str]:
    """The MLP tensors every layer must have: the experts and their router, or a gated MLP."""
    if spec.n_experts:
        return ["router", "gate_exps", "up_exps", "down_exps"]
    return ["down", *(["gate_up"] if "gate_up" in layers else ["gate", "up"])]  # every dense family's MLP is gated


def check_tensors(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], where, n_tokens: int | None = None) -> None:
    """Each tensor's shape agrees with the hyper-parameters, every layer 0..n_layers-1 is there
    and none beyond it, and the vocabulary size is the embedding's rows (or, in a GGUF, its
    `n_tokens` tokens: llama.cpp pads a shorter vocabulary, as Phi-3's)."""
    if "embed" not in shapes or len(shapes["embed"]) != 2:
        raise CheckpointError(f"{where} has no token embedding; the file is incomplete or corrupt")
    rows = shapes["embed"][0]
    if spec.vocab_size not in (rows, n_tokens) or spec.vocab_size > rows:
        raise CheckpointError(
            f"{where}: the embedding has {rows} rows for a vocabulary of {spec.vocab_size}; the file is corrupt"
        )
    ids = [spec.bos_token_id, spec.pad_token_id, *spec.eos_token_ids]
    if any(i is not None and i >= rows for i in ids):
        raise CheckpointError(
            f"{where}: a special token id ({ids}) is past the {rows} embedding rows; the file is corrupt"
        )
    want = expected_shapes(spec, rows)
    layers: dict[str, set[int]] = {}
    for name, shape in shapes.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", name)
        kind = m.group(2) if m else name
        if m:
            layers.setdefault(kind, set()).add(int(m.group(1)))
        if kind in want and tuple(shape) not in want[kind]:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(shape)}, the hyper-parameters say {list(want[kind][0])}; "
                "the file is corrupt"
            )
    every = set(range(spec.n_layers))
    required = ["o", *(["qkv"] if "qkv" in layers else ["q", "k", "v"]), *_mlp_kinds(spec, layers)]
    required += ["attn_norm"] if spec.pre_norms else ["post_attn_norm"]  # OLMo 2 normalizes after only
    for kind in dict.fromkeys([*required, *layers]):  # a kind that one layer has, all have
        seen = layers.get(kind, set())
        if seen != every:
            odd = sorted(seen - every) or sorted(every - seen)
            raise CheckpointError(
                f"{where} has {kind} tensors for {len(seen)} layers, not {spec.n_layers} (layer {odd[0]}); "
                "the file is incomplete or corrupt"
            )


def check_gguf_vocab(meta: dict, where) -> None:
    """The tokenizer.ggml.* arrays llama.cpp builds its vocabulary from: unique token strings,
    one score and type per token, finite scores, merges of two parts, special ids whole numbers."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens is not a list of strings; the file is corrupt")
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens holds a token twice; the file is corrupt")
    for key, kind in (("tokenizer.ggml.scores", float), ("tokenizer.ggml.token_type", int)):
        values = meta.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != len(tokens):
            raise CheckpointError(f"{where}: {key} does not have one entry per token; the file is corrupt")
        if kind is float and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise CheckpointError(f"{where}: {key} holds a value that is not a finite number; the file is corrupt")
        if kind is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{where}: {key} holds a value that is not a whole number; the file is corrupt")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (
        not isinstance(merges, list) or not all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
    ):
        raise CheckpointError(
            f"{where}: tokenizer.ggml.merges holds an entry that is not two tokens; the file is corrupt"
        )
    for key, value in meta.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:  # llama.cpp skips ids past the end
                raise CheckpointError(f"{where}: {key} = {value!r} is not a token id; the file is corrupt")


def check_llamacpp_types(entries, where) -> None:
    """llama.cpp's CPU kernels multiply by vectors (norms, biases) only in F32: any other type aborts."""
    for e in entries:
        if len(e.shape) == 1 and e.qtype != 0:
            raise CheckpointError(
                f"{where}: vector tensor {e.name} is stored as ggml type {e.qtype}, llama.cpp needs F32; "
                "re-convert the file"
            )
