"""Architecture tables: one small module per HF `model_type`.

Each module defines an `Arch`: how its tensors are named in HF checkpoints and in GGUF files
(canonical name -> template with `{i}` for the layer), how its config.json becomes a
`ModelSpec`, and the checkpoint quirks readers must undo.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from lmforge.spec import ModelSpec
from lmforge.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Arch:
    """Format knowledge of one architecture family.

    hf_names / gguf_names: canonical tensor name -> source name template (`{i}` = layer index).
    spec_from_hf: config.json dict -> ModelSpec.
    gguf_arch: `general.architecture` llama.cpp uses for it (Mistral is written as `llama`).
    permute_qk: llama.cpp's converter interleaves q/k rows for its rotary layout; readers undo it.
    gguf_norm_offset: added to RMSNorm weights by llama.cpp's converter (Gemma stores 1 + w).
    hf_prefixes: name prefixes stripped before matching (multimodal wrappers).
    """

    model_type: str
    gguf_arch: str
    hf_names: dict[str, str]
    gguf_names: dict[str, str]
    spec_from_hf: Callable[[dict], ModelSpec]
    activation: str = "silu"
    permute_qk: bool = False
    gguf_norm_offset: float = 0.0
    hf_prefixes: tuple[str, ...] = ()
    hf_ignore: tuple[str, ...] = (r".*rotary_emb\.inv_freq$",)
    aliases: tuple[str, ...] = field(default=())

    def matcher(self, which: str) -> Callable[[str], str | None]:
        """A function mapping a source tensor name ("hf" or "gguf") to its canonical name or None."""
        table = self.hf_names if which == "hf" else self.gguf_names
        patterns = []
        for canonical, template in table.items():
            rx = "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
            patterns.append((re.compile(rx), canonical))
        prefixes = self.hf_prefixes if which == "hf" else ()

        def match(name: str) -> str | None:
            for prefix in prefixes:
                if name.startswith(prefix):
                    name = "model." + name[len(prefix):]
            for rx, canonical in patterns:
                m = rx.match(name)
                if m:
                    return canonical.replace("{i}", m.group("i")) if "i" in m.groupdict() else canonical
            return None

        return match

    def source_name(self, canonical: str, which: str) -> str | None:
        """Inverse of `matcher`: canonical name -> source name, or None if the format lacks it."""
        table = self.hf_names if which == "hf" else self.gguf_names
        m = re.match(r"^layers\.(\d+)\.(.+)$", canonical)
        key, i = (f"layers.{{i}}.{m.group(2)}", m.group(1)) if m else (canonical, None)
        template = table.get(key)
        return None if template is None else template.replace("{i}", i or "")


def _registry() -> dict[str, Arch]:
    from lmforge.arch import gemma3, llama, mistral, phi3, qwen2

    archs = {}
    for mod in (llama, mistral, phi3, qwen2, gemma3):
        a = mod.ARCH
        for name in (a.model_type, *a.aliases):
            archs[name] = a
    return archs


def get_arch(model_type: str) -> Arch:
    """The Arch for an HF `model_type` (or its alias); a user error when unknown."""
    archs = _registry()
    if model_type not in archs:
        known = ", ".join(sorted({a.model_type for a in archs.values()}))
        raise UnsupportedArchitectureError(
            f"unknown model_type {model_type!r}; lmforge supports: {known}")
    return archs[model_type]


def get_gguf_arch(gguf_arch: str) -> Arch:
    """The Arch for a GGUF `general.architecture` value."""
    for a in _registry().values():
        if a.gguf_arch == gguf_arch:
            return a
    known = ", ".join(sorted({a.gguf_arch for a in _registry().values()}))
    raise UnsupportedArchitectureError(
        f"unknown GGUF architecture {gguf_arch!r}; lmforge reads: {known}")
