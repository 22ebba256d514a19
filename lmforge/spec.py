"""ModelSpec: the normalized hyper-parameters of a decoder-only transformer.

Readers (HF config.json, GGUF metadata) produce it; architectures, writers and engines consume
it, so it sits below all of them. Raw config dicts stop at the reader that parsed them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from lmforge.errors import CheckpointError, LmforgeError

# Plausible ranges of the hyper-parameters, checked before anything is sized by them: the
# largest published decoder-only models stay far inside (405B: 126 layers, hidden 16384).
LIMITS = {
    "hidden_size": (1, 1 << 17),
    "n_layers": (1, 1024),
    "n_heads": (1, 4096),
    "n_kv_heads": (1, 4096),
    "head_dim": (1, 4096),
    "intermediate_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 22),
    # 128M positions: Llama-4-Scout has 10,485,760; nothing is sized by it until an export
    # builds rotary tables (bounded there, `check_rope_tables`) or a runtime sizes its cache
    "context_length": (1, 1 << 27),
    "sliding_window": (1, 1 << 27),
    "rotary_dim": (1, 4096),
}
ROPE_TABLE_LIMIT = 1 << 28  # positions x rotary_dim an export tabulates: cos + sin of at most 1 GiB in float32
FLOAT_LIMITS = {  # (low, high, low allowed)
    "rope_theta": (0.0, 1e12, False),
    "norm_eps": (0.0, 1.0, False),
    "partial_rotary_factor": (0.0, 1.0, False),
    "rope_local_theta": (0.0, 1e12, False),
    "query_pre_attn_scalar": (0.0, 1e9, False),
    "embedding_scale": (0.0, 1e9, False),
    "router_jitter": (0.0, 1e3, True),
}


def check_int(value, name: str, where: str) -> int:
    """`value` as an int inside LIMITS[name] (when listed), or a CheckpointError naming `where`."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {name} is {_show(value)}, not a whole number; the file is corrupt")
    low, high = LIMITS.get(name, (0, 1 << 62))
    if value < low:  # a size or count of zero or less: no model has one
        raise CheckpointError(f"{where}: {name} = {value} is outside {low}..{high}; the file is corrupt")
    if value > high:  # possible in principle, past what lmforge sizes anything by
        raise CheckpointError(f"{where}: {name} = {value} is outside what lmforge supports (at most {high})")
    return value


def check_rope_tables(spec: ModelSpec, n_positions: int) -> None:
    """A LmforgeError unless the cos/sin tables for `n_positions` positions fit ROPE_TABLE_LIMIT:
    checked where an export builds them, not at load (a long context is no damage)."""
    if n_positions * spec.rotary_dim > ROPE_TABLE_LIMIT:
        raise LmforgeError(
            f"rotary tables for {n_positions} positions x rotary dimension {spec.rotary_dim} would take "
            f"{n_positions * spec.rotary_dim * 4 >> 20} MiB, more than lmforge supports "
            f"({ROPE_TABLE_LIMIT * 4 >> 20} MiB); export with fewer positions"
        )


def check_float(value, name: str, where: str) -> float:
    """`value` as a finite float inside FLOAT_LIMITS[name] (when listed), or a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: {name} is {_show(value)}, not a number; the file is corrupt")
    value = float(value)
    low, high, closed = FLOAT_LIMITS.get(name, (-math.inf, math.inf, True))
    if not math.isfinite(value) or not (low <= value if closed else low < value) or value > high:
        raise CheckpointError(f"{where}: {name} = {value} is outside ({low}, {high}]; the file is corrupt")
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling.

    kind: "linear" | "llama3" | "longrope" (Phi-3 `su`/`longrope`) | "yarn".
    """

    kind: str
    factor: float = 1.0
    original_context_length: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    short_factor: tuple[float, ...] | None = None  # longrope, one per rotary frequency
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None  # longrope/yarn magnitude correction, when given


def _check_rope(r: RopeScaling, where: str) -> None:
    check_float(r.factor, "rope_scaling.factor", where)
    if r.factor <= 0:
        raise CheckpointError(f"{where}: rope_scaling.factor = {r.factor} is not positive; the file is corrupt")
    if r.original_context_length is not None:
        check_int(r.original_context_length, "context_length", where)
    for name in ("low_freq_factor", "high_freq_factor", "attention_factor"):
        if getattr(r, name) is not None:
            check_float(getattr(r, name), f"rope_scaling.{name}", where)
    for name in ("short_factor", "long_factor"):
        values = getattr(r, name)
        if values is not None:
            if len(values) > 4096:
                raise CheckpointError(f"{where}: rope_scaling.{name} has {len(values)} entries; the file is corrupt")
            for x in values:
                check_float(x, f"rope_scaling.{name}", where)


@dataclass(frozen=True)
class ModelSpec:
    """Normalized hyper-parameters of one decoder-only model.

    `layer_types` has one entry per layer, "full" or "sliding", so interleaved local/global
    attention (Gemma 3) and uniform sliding windows (Mistral) share one representation.
    """

    arch: str
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    norm_eps: float
    tied_embeddings: bool
    activation: str = "silu"  # "silu" | "gelu_tanh"
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default=())
    rope_local_theta: float | None = None  # rope base of sliding layers (Gemma 3)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Gemma 3)
    post_norms: bool = False  # RMSNorm after attention and after the MLP too (Gemma 3's sandwich)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power when set
    embedding_scale: float | None = None  # token embeddings multiplied by this (Gemma: sqrt(hidden))
    norm_offset: float = 0.0  # RMSNorm weight is (offset + w) (Gemma: 1)
    pre_norms: bool = True  # RMSNorm before attention and before the MLP (OLMo 2 normalizes after only)
    attention_scale: float | None = None  # softmax scale itself, when the model sets it (Granite)
    residual_scale: float | None = None  # attention and MLP outputs times this before the residual add (Granite)
    logit_scale: float | None = None  # logits divided by this (Granite's logits_scaling)
    attn_softcap: float | None = None  # attention scores capped as cap * tanh(s / cap) (Gemma 2)
    final_softcap: float | None = None  # the same cap on the output logits (Gemma 2)
    nope_layers: tuple[int, ...] = field(default=())  # layers that attend without rotary (SmolLM3)
    n_experts: int = 0  # mixture-of-experts MLPs: experts per layer (0: a dense MLP), Mixtral's router
    n_experts_used: int = 0  # experts each token goes through (top-k of the router's softmax)
    moe_renormalize: bool = True  # the top-k weights rescaled to sum to one (Mixtral; Qwen3-MoE's norm_topk_prob)
    moe_router: str = "softmax"  # "softmax" (top-k of one softmax) | "sparsemixer" (Phi-3.5-MoE's top-2)
    router_jitter: float = 0.0  # sparsemixer: experts whose logit is within 2x this (relative) of the best
    lm_head_bias: bool = False  # the output head adds a bias (Phi-3.5-MoE)
    layer_norm: bool = False  # norms are LayerNorm (mean removed, a bias when stored), not RMSNorm (Phi-3.5-MoE)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())
    pad_token_id: int | None = None  # the source's padding id, when it names one

    def __post_init__(self):
        self.check("model")  # readers name their file instead (`checked_spec`)
        if not self.layer_types:
            kind = "sliding" if self.sliding_window else "full"
            object.__setattr__(self, "layer_types", (kind,) * self.n_layers)
        if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= {"full", "sliding"}:
            raise CheckpointError(
                f"model: {len(self.layer_types)} layer types for {self.n_layers} layers; the file is corrupt"
            )

    def check(self, where: str) -> None:
        """CheckpointError (naming `where`) unless every hyper-parameter is in range and consistent."""
        for name in LIMITS:
            value = self.rotary_dim if name == "rotary_dim" else getattr(self, name)
            if value is not None or name != "sliding_window":
                check_int(value, name, where)
        for name in FLOAT_LIMITS:
            if getattr(self, name) is not None or name in ("rope_theta", "norm_eps", "partial_rotary_factor"):
                check_float(getattr(self, name), name, where)
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"{where}: {self.n_heads} attention heads are not a multiple of {self.n_kv_heads} KV heads; "
                "the file is corrupt"
            )
        if self.rotary_dim % 2 or self.head_dim % 2:
            raise CheckpointError(
                f"{where}: head dimension {self.head_dim} or its rotary part {self.rotary_dim} is odd; "
                "the file is corrupt"
            )
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise CheckpointError(f"{where}: {name} is {_show(value)}; the file is corrupt")
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.eos_token_ids):
            raise CheckpointError(f"{where}: eos_token_id is {_show(self.eos_token_ids)}; the file is corrupt")
        if self.rope_scaling is not None:
            _check_rope(self.rope_scaling, where)

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dimensions that rotary embedding rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)
