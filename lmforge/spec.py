"""ModelSpec: the normalized hyper-parameters of a decoder-only transformer.

Readers (HF config.json, GGUF metadata) produce it; architectures, writers and engines consume
it, so it sits below all of them. Raw config dicts stop at the reader that parsed them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())
    pad_token_id: int | None = None  # the source's padding id, when it names one

    def __post_init__(self):
        assert self.hidden_size > 0 and self.n_layers > 0
        assert self.n_heads % self.n_kv_heads == 0, "GQA needs n_heads divisible by n_kv_heads"
        if not self.layer_types:
            kind = "sliding" if self.sliding_window else "full"
            object.__setattr__(self, "layer_types", (kind,) * self.n_layers)
        assert len(self.layer_types) == self.n_layers

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dimensions that rotary embedding rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)
