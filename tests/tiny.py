"""Tiny random HF checkpoints built with transformers (the reference nobody here wrote).

Each architecture gets 2 layers, a small hidden size, GQA where the arch has it, random norm
weights (so a reader that drops or misplaces a norm is caught), and a real tokenizer:
SmolLM2's byte-level BPE for llama/qwen2 (Qwen2's pre-tokenizer for qwen2), a SentencePiece BPE
trained here for the others.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

SPM_ARCHS = {"phi3", "mistral", "gemma3", "gemma2", "phimoe"}

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=256,
)


def config_for(arch: str, vocab_size: int, bos: int, eos: int, pad: int, variant: str | None = None):
    """A transformers config object for a tiny model of `arch`."""
    import transformers as T

    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab_size)
    if arch == "llama":
        extra = {}
        if variant == "llama32":  # Llama 3.2's rope (its real values) and tied embeddings
            rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
            rope["original_max_position_embeddings"] = 8192
            return T.LlamaConfig(**COMMON, **ids, rope_theta=500000.0, rope_scaling=rope, tie_word_embeddings=True)
        if variant == "k256":  # rows of 256: llama.cpp's K-quants apply without fallback
            return T.LlamaConfig(
                **{**COMMON, "hidden_size": 256, "intermediate_size": 512},
                **ids,
                rope_theta=100000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
            )
        if variant == "llama3":
            extra["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        return T.LlamaConfig(**COMMON, **ids, rope_theta=100000.0, rms_norm_eps=1e-5, **extra)
    if arch == "mistral" and variant == "nemo":  # Mistral-Nemo: head_dim set apart from hidden / heads
        return T.MistralConfig(**COMMON, **ids, head_dim=32, sliding_window=None, rope_theta=1000000.0)
    if arch == "mistral":
        return T.MistralConfig(**COMMON, **ids, sliding_window=16, rms_norm_eps=1e-5)
    if arch == "qwen2":
        return T.Qwen2Config(**COMMON, **ids, rope_theta=1000000.0, tie_word_embeddings=True)
    if arch == "phi3":
        extra = {}
        if variant == "longrope":
            # head_dim 32, rotary 16: ONNX Runtime needs rotary_dim / 2 to be a multiple of 8
            n = 32 // 2 // 2
            extra = dict(
                partial_rotary_factor=0.5,
                original_max_position_embeddings=64,
                hidden_size=128,
                rope_scaling={
                    "type": "longrope",
                    "short_factor": [1.0 + 0.1 * i for i in range(n)],
                    "long_factor": [2.0 + 0.5 * i for i in range(n)],
                },
            )
        if variant == "phi4mini":
            return phi4_mini_config(T, ids, hidden_size=192, num_attention_heads=3, num_key_value_heads=1)
        if variant == "phi4mini-shaped":  # the real sizes, one layer
            return phi4_mini_config(T, ids, num_hidden_layers=1)
        return T.Phi3Config(**{**COMMON, **extra}, **ids)
    if arch in FAMILIES:
        return FAMILIES[arch](T, ids, variant)
    if arch == "gemma3":
        cfg = dict(
            COMMON,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )
        return T.Gemma3TextConfig(**cfg, **ids, rope_theta=1000000.0)
    raise ValueError(arch)


def phi4_mini_config(T, ids: dict, **shape):
    """Phi-4-mini-instruct's config.json (partial rotary 3/4, longrope with its 48 factor pairs
    scaled to the head size, tied embeddings), with `shape` (fewer layers, smaller sizes) over it."""
    cfg = dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        partial_rotary_factor=0.75,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        sliding_window=262144,
        hidden_act="silu",
    )
    cfg.update(shape if "num_hidden_layers" in shape else {**COMMON_PHI4, **shape})
    n = int(cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["partial_rotary_factor"]) // 2
    # made-up factors (the published lists are not on this machine), one per rotary frequency
    short = [1.0 + 0.05 * (i % 8) for i in range(n)]
    long = [1.0 + 40.0 * i / n for i in range(n)]
    cfg["rope_scaling"] = {"type": "longrope", "short_factor": short, "long_factor": long}
    return T.Phi3Config(**cfg, **ids)


COMMON_PHI4 = dict(num_hidden_layers=2, intermediate_size=256)


def _qwen3(T, ids, variant):
    return T.Qwen3Config(**COMMON, **ids, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True)


def _granite(T, ids, variant):
    # Granite 3.x 2B's multipliers
    mult = dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=8.0)
    return T.GraniteConfig(**COMMON, **ids, **mult, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def _olmo2(T, ids, variant):
    return T.Olmo2Config(**COMMON, **ids, rope_theta=500000.0, rms_norm_eps=1e-6)


def _smollm3(T, ids, variant):
    # four layers: the fourth attends without rotary, as every fourth of SmolLM3-3B's does
    return T.SmolLM3Config(**{**COMMON, "num_hidden_layers": 4}, **ids, rope_theta=2000000.0, no_rope_layer_interval=4)


def _gemma2(T, ids, variant):
    # caps far below Gemma 2's 50 / 30 so that a tiny random model's scores and logits reach them
    caps = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    layers = ["sliding_attention", "full_attention"]
    return T.Gemma2Config(
        **COMMON, **ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=layers, **caps
    )


K256 = dict(hidden_size=256, intermediate_size=512)  # rows of 256: llama.cpp's K-quants apply


def _mixtral(T, ids, variant):
    # four experts, two per token; no window (llama.cpp runs Mixtral without one)
    moe = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if variant == "k256":  # eight experts, as llama.cpp's quantizer special-cases
        moe["num_local_experts"] = 8
    shape = {**COMMON, **(K256 if variant == "k256" else {})}
    return T.MixtralConfig(**shape, **ids, **moe, rope_theta=1000000.0, rms_norm_eps=1e-5)


def _qwen3_moe(T, ids, variant):
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    shape = {**COMMON, **(K256 if variant == "k256" else {})}
    if variant == "k256":
        moe["moe_intermediate_size"] = 256
    return T.Qwen3MoeConfig(**shape, **ids, **moe, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True)


def _phimoe(T, ids, variant):
    if variant == "shaped":
        return phimoe_shaped_config(T, ids)
    # Phi-3.5-MoE's layout (attention and head biases, LayerNorm, longrope with its mscale) with
    # four experts; a router jitter far above its 0.01 so that the sparsemixer's mask keeps
    # several experts in some tokens' softmax and drops them in others'
    shape = {**COMMON, **(K256 if variant == "k256" else {})}
    n = shape["hidden_size"] // shape["num_attention_heads"] // 2  # one factor per rotary frequency
    rope = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(n)]}
    rope.update(long_factor=[2.0 + 0.5 * i for i in range(n)], short_mscale=1.243, long_mscale=1.243)
    moe = dict(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.3, input_jitter_noise=0.0)
    return T.PhimoeConfig(
        **shape,
        **ids,
        **moe,
        attention_bias=True,
        lm_head_bias=True,
        sliding_window=None,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        original_max_position_embeddings=64,
        rope_scaling=rope,
    )


def phimoe_shaped_config(T, ids: dict):
    """Phi-3.5-MoE-instruct's config.json (hidden 4096, 32 heads over 8 kv heads, experts of 6400,
    longrope with its mscale, the window that equals its context) with one layer and 4 of its 16
    experts; made-up rotary factors (the published lists are not on this machine)."""
    n = 128 // 2
    rope = dict(type="longrope", short_mscale=1.243163121016122, long_mscale=1.243163121016122)
    rope.update(
        short_factor=[1.0 + 0.05 * (i % 8) for i in range(n)], long_factor=[1.0 + 40.0 * i / n for i in range(n)]
    )
    return T.PhimoeConfig(
        **ids,
        hidden_size=4096,
        intermediate_size=6400,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        sliding_window=131072,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_jitter_noise=0.01,
        input_jitter_noise=0.01,
        attention_bias=True,
        lm_head_bias=True,
        rope_scaling=rope,
    )


# the families added with issue 16: arch -> config builder (transformers, ids, variant)
FAMILIES = {
    "qwen3": _qwen3,
    "granite": _granite,
    "olmo2": _olmo2,
    "smollm3": _smollm3,
    "gemma2": _gemma2,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "phimoe": _phimoe,
}
# tokenizer fixture each checkpoint gets: (arch, variant) first, then arch, else SmolLM2's BPE
TOKENIZERS = {
    ("phi3", "phi4mini"): "gpt4o",
    "qwen2": "qwen2",
    "qwen3": "qwen2",
    "qwen3_moe": "qwen2",
    **dict.fromkeys(SPM_ARCHS, "spm"),
}


def train_spm(folder: Path) -> Path:
    """A SentencePiece BPE model (byte fallback, no normalization, as Llama's) trained on the
    Python documentation that ships with every Python; returns the .model path."""
    import pydoc_data.topics

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "train.txt"
    text.write_text("\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "sp"),
        vocab_size=2000,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        max_sentence_length=100000,
        num_threads=2,
        minloglevel=2,
    )
    return folder / "sp.model"


def spm_hf_tokenizer(sp_model: Path, folder: Path):
    """transformers' own conversion of a SentencePiece model to a fast tokenizer."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "legacy": False,
            }
        )
    )
    return AutoTokenizer.from_pretrained(folder)


SMOL_TEMPLATE = None  # filled from the default model by the fixture


def build(
    folder: Path,
    arch: str,
    dtype: str = "float32",
    sharded: bool = False,
    variant: str | None = None,
    tokenizers: dict | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny random `arch` checkpoint (safetensors) with its tokenizer into `folder`."""
    import torch
    import transformers as T

    tok_folder = tokenizers[TOKENIZERS.get((arch, variant)) or TOKENIZERS.get(arch, "bpe")]
    tok_cfg = json.loads((tok_folder / "tokenizer_config.json").read_text())
    vocab = json.loads((tok_folder / "tokenizer.json").read_text())
    n_vocab = len(vocab["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    bos = specials.get(tok_cfg.get("bos_token"), 1)
    eos = specials.get(tok_cfg.get("eos_token"), 2)
    config = config_for(arch, n_vocab, bos, eos, pad=eos, variant=variant)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms (transformers initializes them to a constant)
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if arch.startswith("gemma") else 1.0))
            elif arch == "phimoe" and name.endswith("bias"):  # random biases (transformers: zeros)
                p.copy_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB" if sharded else "10GB")
    for name in os.listdir(tok_folder):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(tok_folder / name, folder / name)
    return folder


def reference_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """transformers' view of the checkpoint's weights, as float32 numpy."""
    import torch
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
