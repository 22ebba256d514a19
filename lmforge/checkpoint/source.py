"""MODEL -> a local path: the one place every command and `load()` turn what users type into files.

In order: a local path that exists (always wins), a packaged name (`smollm2-135m`, offline), a
catalogue name (`phi-3-mini-4k[@REVISION]`), a Hugging Face Hub id (`ORG/NAME[@REVISION]`,
`ORG/NAME:QUANT`, `ORG/NAME/FILE.gguf`, `ORG/NAME:SUBFOLDER`), fetched into the Hub cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.checkpoint.hub import HubRef, parse_hub_id
from lmforge.errors import ModelNotFoundError
from lmforge.registry import CATALOGUE, KNOWN_MODELS, did_you_mean, known_model_path

# Hub ids already fetched by this process: a command resolves MODEL more than once.
_RESOLVED: dict[str, Path] = {}


def hub_ref(text: str) -> HubRef | None:
    """The Hub reference TEXT names: a catalogue name (with an optional @REVISION), a Hub id, or None."""
    name, _, revision = text.partition("@")
    if name in CATALOGUE:
        entry = CATALOGUE[name]
        return HubRef(entry.repo, revision or entry.revision)
    return parse_hub_id(text)


def resolve(model: str | os.PathLike, progress: bool | None = None) -> Path:
    """MODEL (local path, known name, catalogue name or Hub id) -> a local path that exists,
    downloading Hub sources (progress bar on a terminal unless PROGRESS says otherwise)."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text in KNOWN_MODELS:
        return known_model_path(text)
    if text in _RESOLVED and _RESOLVED[text].exists():
        return _RESOLVED[text]
    ref = hub_ref(text)
    if ref is None:
        near = did_you_mean(text)
        hint = f"did you mean {near!r}?" if near else "give a name from `lmforge models`, a Hub id (ORG/NAME),"
        raise ModelNotFoundError(
            f"no such model or path: {text!r}; {hint}" + ("" if near else " a folder or a .gguf file")
        )
    from lmforge.checkpoint.hub import download

    _RESOLVED[text] = download(ref, progress)
    return _RESOLVED[text]


def source_label(path: Path) -> str:
    """A short readable name for a resolved source: the repo name and commit for a Hub
    snapshot folder (whose own name is the commit), else the file or folder name."""
    if path.is_dir() and path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return f"{path.parent.parent.name.split('--')[-1]}@{path.name[:7]}"
    return path.stem
