"""SmolLM3: the Llama layout where some layers attend without rotary (`no_rope_layers[i]` is 0;
every fourth layer in the published models). llama.cpp's `smollm3` fixes that period at four
and has no key for it, so only that pattern can be written as GGUF."""

from lmforge.arch import Arch
from lmforge.arch.common import LLAMA_GGUF, LLAMA_HF, spec_from_hf
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.spec import ModelSpec

LLAMACPP_PERIOD = 4  # llama.cpp: layer i has no rotary when (i + 1) % 4 == 0


def every(n_layers: int, period: int) -> tuple[int, ...]:
    """The layers without rotary when every `period`-th one has none."""
    return tuple(i for i in range(n_layers) if (i + 1) % period == 0)


def _spec(cfg: dict) -> ModelSpec:
    if cfg.get("use_sliding_window"):
        raise CheckpointError("config.json field 'use_sliding_window' is true; lmforge runs SmolLM3 without a window")
    n_layers = int(cfg["num_hidden_layers"])
    flags = cfg.get("no_rope_layers")
    if flags is None:
        nope = every(n_layers, int(cfg.get("no_rope_layer_interval") or LLAMACPP_PERIOD))
    else:
        nope = tuple(i for i, uses_rope in enumerate(flags) if not uses_rope)
    return spec_from_hf(cfg, "smollm3", nope_layers=nope)


def _gguf_metadata(spec: ModelSpec) -> dict:
    if spec.nope_layers != every(spec.n_layers, LLAMACPP_PERIOD):
        raise LmforgeError(
            f"layers {list(spec.nope_layers)} attend without rotary; llama.cpp's smollm3 takes every "
            f"{LLAMACPP_PERIOD}th layer only, so this model cannot be written as GGUF"
        )
    return {}


def _hf_config(spec: ModelSpec, cfg: dict) -> None:
    cfg["no_rope_layers"] = [int(i not in spec.nope_layers) for i in range(spec.n_layers)]
    cfg.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)


ARCH = Arch(
    model_type="smollm3",
    name="smollm3",
    gguf_arch="smollm3",
    hf_class="SmolLM3ForCausalLM",
    hf_names=LLAMA_HF,
    gguf_names=LLAMA_GGUF,
    spec_from_hf=_spec,
    permute_qk=True,
    gguf_spec=lambda g, fields: {"nope_layers": every(fields["n_layers"], LLAMACPP_PERIOD)},
    gguf_metadata=_gguf_metadata,
    hf_config=_hf_config,
)
