"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases; optional sliding window on upper layers."""

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, hf_window_config, spec_from_hf
from lmforge.spec import ModelSpec


def _spec(cfg: dict):
    n_layers = int(cfg["num_hidden_layers"])
    window = None
    layer_types = ("full",) * n_layers
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        window = int(cfg["sliding_window"])
        first = int(cfg.get("max_window_layers", n_layers))
        layer_types = tuple("sliding" if i >= first else "full" for i in range(n_layers))
    return spec_from_hf(cfg, "qwen2", attention_bias=True, sliding_window=window, layer_types=layer_types)


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    """The window applies from layer `max_window_layers` up (inverse of `_spec`)."""
    hf_window_config(spec, cfg)
    if spec.sliding_window:
        first = next((i for i, t in enumerate(spec.layer_types) if t == "sliding"), spec.n_layers)
        cfg.update(use_sliding_window=True, max_window_layers=first)


ARCH = Arch(
    model_type="qwen2",
    name="qwen2",
    gguf_arch="qwen2",
    hf_class="Qwen2ForCausalLM",
    hf_names=LLAMA_HF,
    gguf_names=LLAMA_GGUF,
    spec_from_hf=_spec,
    hf_config=_hf_config,
)
