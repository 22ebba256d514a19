"""Architecture tables: one small module per HF `model_type`.

Each module defines an `Arch`: how its tensors are named in HF checkpoints and in GGUF files
(canonical name -> template with `{i}` for the layer), how its config.json and its GGUF metadata
become a `ModelSpec` and back, and the checkpoint quirks readers undo and writers redo. Readers
and writers ask the Arch and never branch on a family name, so a new family is one new module
here plus test fixtures (`_registry` finds every module that defines an ARCH).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.arch.common import GGUF_QK_HEADS, gguf_window_metadata, hf_window_config, permute_qk, unpermute_qk
from lmforge.errors import UnsupportedArchitectureError
from lmforge.spec import ModelSpec

# GGUF metadata reader: key under `{arch}.` (and a default) -> value
GGUFGetter = Callable[..., Any]
EXPERT = "@"  # canonical name + EXPERT + index: one expert's slice of a stacked tensor
FUSED_GROUPS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}  # a fused tensor's rows: its parts in order


@dataclass(frozen=True)
class Arch:
    """Format knowledge of one architecture family.

    model_type: HF `model_type` (onnxruntime-genai names its decoder types the same way).
    name: `ModelSpec.arch` of this family.
    gguf_arch: `general.architecture` llama.cpp uses for it (Mistral is written as `llama`).
    hf_class: the transformers class written into config.json.
    hf_names / gguf_names: canonical tensor name -> source name template (`{i}` = layer index).
    spec_from_hf: config.json dict -> ModelSpec.
    activation: the MLP activation; GGUF metadata does not say it.
    permute_qk: llama.cpp's converter interleaves q/k rows for its rotary layout; GGUF readers
        undo it and the GGUF writer redoes it.
    gguf_spec: (metadata getter, generic ModelSpec fields) -> family fields read from GGUF.
    gguf_metadata: ModelSpec -> {key under `{arch}.`: (value, GGUF type)} of family keys.
    hf_config: fills the family keys of a config.json dict from a ModelSpec.
    gguf_claims: for families that share a `gguf_arch`: whether a file's metadata is this family.
    gguf_name_rule: (general.name, vocabulary) -> the name llama.cpp accepts (see `gguf_general_name`).
    hf_prefixes: name prefixes stripped before matching (multimodal wrappers).
    genai_type: the decoder type genai_config.json names when onnxruntime-genai lacks `model_type`
        ("decoder", its generic one, runs lmforge's graph as it is).
    """

    model_type: str
    name: str
    gguf_arch: str
    hf_class: str
    hf_names: dict[str, str]
    gguf_names: dict[str, str]
    spec_from_hf: Callable[[dict], ModelSpec]
    activation: str = "silu"
    permute_qk: bool = False
    gguf_spec: Callable[[GGUFGetter, dict], dict] = lambda g, fields: {}
    gguf_metadata: Callable[[ModelSpec], dict] = gguf_window_metadata
    hf_config: Callable[[ModelSpec, dict], None] = hf_window_config
    gguf_claims: Callable[[GGUFGetter], bool] | None = None
    gguf_name_rule: Callable[[str, list], str] | None = None
    hf_prefixes: tuple[str, ...] = ()
    genai_type: str | None = None
    hf_ignore: tuple[str, ...] = (r".*rotary_emb\.inv_freq$",)
    aliases: tuple[str, ...] = field(default=())

    def parts(self, i: int, group: str) -> list[str]:
        """Canonical names of layer i's `group` ("qkv" or "gate_up") in the stream: the fused
        tensor when this family stores one (Phi-3), else its parts (q, k, v / gate, up)."""
        if f"layers.{{i}}.{group}" in self.hf_names:
            return [f"layers.{i}.{group}"]
        return [f"layers.{i}.{p}" for p in FUSED_GROUPS[group]]

    def _qk_heads(self, name: str, spec: ModelSpec) -> int | None:
        """Heads to (un)interleave `name`'s rows by, when it is a q/k weight or bias of this family."""
        parts = name.split(".")
        if not self.permute_qk or len(parts) < 3 or parts[0] != "layers" or parts[2] not in GGUF_QK_HEADS:
            return None
        return getattr(spec, GGUF_QK_HEADS[parts[2]])

    def from_gguf(self, name: str, arr: np.ndarray, spec: ModelSpec, raw: bool = False) -> np.ndarray:
        """A tensor as llama.cpp stores it -> HF row order and values: q/k rows un-interleaved,
        norms back from the multiplier llama.cpp stores (offset + w, see ModelSpec.norm_offset)
        to w. `raw`: `arr` is quantized blocks (rows, bytes), whose rows alone can be reordered."""
        heads = self._qk_heads(name, spec)
        if heads:
            arr = unpermute_qk(arr, heads)
        if spec.norm_offset and name.endswith("norm") and not raw:
            arr = arr - np.float32(spec.norm_offset)
        return arr

    def to_gguf(self, name: str, arr: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """Inverse of `from_gguf` on float values: HF order and values -> llama.cpp's."""
        heads = self._qk_heads(name, spec)
        if heads:
            arr = permute_qk(arr, heads)
        if spec.norm_offset and name.endswith("norm"):
            arr = arr + np.float32(spec.norm_offset)
        return arr

    def matcher(self, which: str) -> Callable[[str], str | None]:
        """A function mapping a source tensor name ("hf" or "gguf") to its canonical name or None.
        A template with `{j}` holds one expert's slice of a stacked tensor (HF's per-expert
        matrices): its names map to "{canonical}@{j}", which the reader stacks."""
        table = self.hf_names if which == "hf" else self.gguf_names
        patterns = []
        for canonical, template in table.items():
            rx = "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)") + "$"
            patterns.append((re.compile(rx), canonical))
        prefixes = self.hf_prefixes if which == "hf" else ()

        def match(name: str) -> str | None:
            for prefix in prefixes:
                if name.startswith(prefix):
                    name = "model." + name[len(prefix) :]
            for rx, canonical in patterns:
                m = rx.match(name)
                if m:
                    groups = m.groupdict()
                    canonical = canonical.replace("{i}", groups["i"]) if "i" in groups else canonical
                    return f"{canonical}{EXPERT}{groups['j']}" if "j" in groups else canonical
            return None

        return match

    def source_name(self, canonical: str, which: str) -> str | None:
        """Inverse of `matcher`: canonical name -> source name, or None if the format lacks it."""
        table = self.hf_names if which == "hf" else self.gguf_names
        m = re.match(r"^layers\.(\d+)\.(.+)$", canonical)
        key, i = (f"layers.{{i}}.{m.group(2)}", m.group(1)) if m else (canonical, None)
        template = table.get(key)
        return None if template is None else template.replace("{i}", i or "")


FIRST = ("llama", "mistral", "phi3", "qwen2", "gemma3")  # registry order of the first families; new ones follow by name


@functools.cache
def _modules() -> tuple:
    """Every module of this package that defines an ARCH: a new family is one new file here."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common")
    names.sort(key=lambda n: FIRST.index(n) if n in FIRST else len(FIRST))
    mods = (importlib.import_module(f"{__name__}.{n}") for n in names)
    return tuple(m for m in mods if isinstance(getattr(m, "ARCH", None), Arch))


def _registry() -> dict[str, Arch]:
    archs = {}
    for mod in _modules():
        a = mod.ARCH
        for name in (a.model_type, a.name, *a.aliases):
            archs[name] = a
    return archs


def _families() -> list[Arch]:
    """Each Arch once, in registry order."""
    return list({id(a): a for a in _registry().values()}.values())


def get_arch(model_type: str) -> Arch:
    """The Arch for an HF `model_type`, a `ModelSpec.arch` or an alias; a user error when unknown."""
    archs = _registry()
    if model_type not in archs:
        known = ", ".join(sorted({a.model_type for a in archs.values()}))
        raise UnsupportedArchitectureError(f"unknown model_type {model_type!r}; lmforge supports: {known}")
    return archs[model_type]


def get_gguf_arch(gguf_arch: str, meta: GGUFGetter | None = None) -> Arch:
    """The Arch for a GGUF `general.architecture` value; `meta(key)` reads the file's `{arch}.`
    keys, which tell apart families that llama.cpp writes under one name (Mistral as `llama`)."""
    candidates = [a for a in _families() if a.gguf_arch == gguf_arch]
    for a in candidates:
        if a.gguf_claims and meta and a.gguf_claims(meta):
            return a
    for a in candidates:
        if a.gguf_claims is None:
            return a
    known = ", ".join(sorted({a.gguf_arch for a in _registry().values()}))
    raise UnsupportedArchitectureError(f"unknown GGUF architecture {gguf_arch!r}; lmforge reads: {known}")


def gguf_general_name(name: str, tokens: list) -> str:
    """general.name for a GGUF file: llama.cpp special-cases some families by the model's name,
    whatever its architecture, so every family's rule applies."""
    for a in _families():
        if a.gguf_name_rule:
            name = a.gguf_name_rule(name, tokens)
    return name
