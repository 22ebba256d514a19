"""Hugging Face Hub sources: `ORG/NAME[@REVISION]` (safetensors), `ORG/NAME:QUANT` and
`ORG/NAME/FILE.gguf` (GGUF), `ORG/NAME:SUBFOLDER` (an onnxruntime-genai folder).

Downloads go through `huggingface_hub` into the standard Hub cache (HF_HOME / HF_HUB_CACHE),
so files users already have are reused, interrupted downloads resume, HF_TOKEN opens gated
repos and HF_HUB_OFFLINE=1 reads the cache only. What to fetch is decided from the repo's file
list first, and config.json is read before any weight: a pickle-only repo or an architecture
lmforge does not run is refused before a single weight byte is fetched.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lmforge.arch import get_arch
from lmforge.checkpoint.hf import PICKLE_SUFFIXES
from lmforge.errors import CheckpointError, LmforgeError, ModelNotFoundError

# ORG/NAME, then @REVISION, then :TAG (quant or subfolder) or /FILE.gguf; Ollama's hf.co/ prefix allowed.
HUB_ID = re.compile(
    r"^(?:(?:https://)?(?:hf\.co|huggingface\.co)/)?"
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?:@(?P<revision>[\w.-]+))?"
    r"(?::(?P<tag>[\w./-]+)|/(?P<file>[\w./-]+\.gguf))?$"
)
# What an HF checkpoint needs besides its weights; nothing else in the repo is fetched.
HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
SHARD_INDEX = "model.safetensors.index.json"
# llama-cli -hf and Ollama take this quant when a GGUF repo is named without one.
DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub id."""

    repo: str
    revision: str | None = None
    tag: str | None = None  # a GGUF quant or an ONNX subfolder
    file: str | None = None  # a .gguf file in the repo

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return self.repo + rev + (f":{self.tag}" if self.tag else f"/{self.file}" if self.file else "")


@dataclass
class Plan:
    """What to fetch from a repo: the kind of source, its files in fetch order, and the path
    (relative to the snapshot) that MODEL then names."""

    kind: str  # "hf" | "gguf" | "onnx"
    files: list[str] = field(default_factory=list)
    root: str = ""


def parse_hub_id(text: str) -> HubRef | None:
    """The HubRef of TEXT, or None when it does not look like a Hub id."""
    m = HUB_ID.match(text)
    if m and m["revision"] in (".", ".."):
        m = None  # a revision is a branch, tag or commit, never a path step
    if not m or text.startswith((".", "/", "~")):
        return None
    return HubRef(m["repo"], m["revision"], m["tag"], m["file"])


def _top_level(files: list[str], suffixes: tuple[str, ...]) -> list[str]:
    return sorted(f for f in files if "/" not in f and f.lower().endswith(suffixes))


def _gguf_matches(ggufs: list[str], tag: str) -> list[str]:
    """GGUF files whose name ends in TAG (`-Q4_K_M.gguf`), else those that carry it between separators."""
    t = re.escape(tag.lower())
    stems = {g: re.sub(r"-\d{5}-of-\d{5}$", "", PurePosixPath(g).stem.lower()) for g in ggufs}
    exact = [g for g, s in stems.items() if re.search(rf"(^|[-._]){t}$", s)]
    return exact or [g for g, s in stems.items() if re.search(rf"(^|[-._]){t}([-._]|$)", s)]


def _onnx_matches(folders: list[str], tag: str) -> list[str]:
    """onnxruntime-genai folders named TAG (the path or its last part), else those starting with it."""
    exact = [d for d in folders if tag.strip("/") in (d, PurePosixPath(d).name)]
    return exact or [d for d in folders if PurePosixPath(d).name.startswith(tag)]


def _choose(ref: HubRef, what: str, candidates: list[str], available: list[str]) -> str:
    if len(candidates) == 1:
        return candidates[0]
    listed = ", ".join(available) or "none"
    if candidates:
        raise ModelNotFoundError(f"{ref} names more than one {what} ({', '.join(candidates)}); name one of them")
    raise ModelNotFoundError(f"{ref.repo} has no {what} {ref.tag or ref.file!r}; it has: {listed}")


def _gguf_plan(ref: HubRef, ggufs: list[str]) -> Plan:
    if ref.file:
        matches, shown = [g for g in ggufs if g == ref.file], ref
    else:
        quant = ref.tag or DEFAULT_QUANT
        matches, shown = _gguf_matches(ggufs, quant), ref if ref.tag else HubRef(ref.repo, tag=quant)
        if not matches and not ref.tag and len(ggufs) == 1:
            matches = ggufs
    if matches and all(re.search(r"-\d{5}-of-\d{5}\.gguf$", m) for m in matches):
        raise CheckpointError(f"{matches[0]} is part of a split GGUF; lmforge reads single-file GGUFs: merge it first")
    name = _choose(shown, "GGUF file" if ref.file else "GGUF quant", matches, ggufs)
    return Plan("gguf", [name], name)


def plan_files(ref: HubRef, files: list[str]) -> Plan:
    """Decide from a repo's file list what MODEL names and which files to fetch (config.json
    first for a safetensors repo; weights only when there is nothing unsafe or unknown)."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    onnx_dirs = sorted(str(PurePosixPath(f).parent) for f in files if PurePosixPath(f).name == "genai_config.json")
    if ref.file:
        return _gguf_plan(ref, ggufs)
    if ref.tag:
        if _gguf_matches(ggufs, ref.tag):
            return _gguf_plan(ref, ggufs)
        if _onnx_matches(onnx_dirs, ref.tag):
            folder = _choose(ref, "ONNX folder", _onnx_matches(onnx_dirs, ref.tag), onnx_dirs)
            return Plan("onnx", sorted(f for f in files if f.startswith(folder + "/")), folder)
        _choose(ref, "GGUF quant or ONNX folder", [], ggufs + onnx_dirs)
    if "config.json" in files and _top_level(files, (".safetensors",)):
        side = [f for f in HF_SIDE_FILES if f in files]
        # with an index, the shards it names are fetched once it is read (never a consolidated.* copy)
        weights = [SHARD_INDEX] if SHARD_INDEX in files else _top_level(files, (".safetensors",))
        return Plan("hf", ["config.json", *side, *weights])
    if "config.json" in files and _top_level(files, PICKLE_SUFFIXES):
        pickles = ", ".join(_top_level(files, PICKLE_SUFFIXES)[:3])
        raise CheckpointError(
            f"{ref.repo} holds only pickle weights ({pickles}); lmforge never unpickles: "
            "use a repo with safetensors (or a GGUF) of this model"
        )
    if ggufs:
        return _gguf_plan(ref, ggufs)
    if onnx_dirs:
        if len(onnx_dirs) > 1:
            listed = ", ".join(onnx_dirs)
            raise ModelNotFoundError(f"{ref.repo} holds several ONNX folders; name one as {ref.repo}:FOLDER: {listed}")
        folder = onnx_dirs[0]
        return Plan("onnx", sorted(f for f in files if f.startswith(folder + "/") or folder == "."), folder)
    raise CheckpointError(f"{ref.repo} holds no safetensors, GGUF or onnxruntime-genai model that lmforge reads")


def check_config(ref: HubRef, path: str | os.PathLike) -> None:
    """Refuse a repo whose config.json names an architecture lmforge does not run."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"config.json of {ref.repo} is not valid JSON") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise CheckpointError(f"config.json of {ref.repo} has no model_type; is it a transformers checkpoint?")
    try:
        get_arch(model_type)
    except LmforgeError as e:
        raise type(e)(f"{ref.repo}: {e}") from None


def _shards(ref: HubRef, index_path: str) -> list[str]:
    """The safetensors files the shard index names: each a .safetensors file at the repo's top."""
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{SHARD_INDEX} of {ref.repo} is not a valid shard index") from None
    strays = [s for s in shards if not (isinstance(s, str) and s.endswith(".safetensors") and _top_name(s))]
    if strays:
        raise CheckpointError(f"{SHARD_INDEX} of {ref.repo} names {strays[0]!r}, not a safetensors file of the repo")
    return shards


def _top_name(name: str) -> bool:
    return "/" not in name and "\\" not in name and not name.startswith(".")


def _fetch_plan(ref: HubRef, plan: Plan, fetch) -> Path:
    """Fetch PLAN's files with FETCH(name) -> local path; the snapshot path MODEL names."""
    if plan.kind != "hf":
        paths = [fetch(f) for f in plan.files]
        snapshot = Path(paths[0]).parents[len(PurePosixPath(plan.files[0]).parts) - 1]
        return snapshot / plan.root if plan.root != "." else snapshot
    config = fetch("config.json")
    check_config(ref, config)  # before any weight byte
    names = [f for f in plan.files[1:] if f.endswith(HF_SIDE_FILES)]
    weights = [f for f in plan.files if f.endswith(".safetensors")]
    if SHARD_INDEX in plan.files:
        names.append(SHARD_INDEX)
        weights = _shards(ref, fetch(SHARD_INDEX))  # only the shards the index names (not consolidated.*)
    for name in names + weights:
        fetch(name)
    return Path(config).parent


def download(ref: HubRef, progress: bool | None = None) -> Path:
    """Fetch what REF names into the Hub cache (or find it there offline); returns the local
    path: the snapshot folder (safetensors), the .gguf file, or the ONNX folder."""
    from lmforge.checkpoint import hub_client

    files = hub_client.list_files(ref)
    try:
        plan = plan_files(ref, files.names)
    except LmforgeError:
        if not files.offline:
            raise
        plan = None  # what the cache holds is not all of it
    if files.offline and (plan is None or any(not (files.snapshot / f).exists() for f in plan.files)):
        raise ModelNotFoundError(f"{ref} is only partly in the Hub cache and {files.why}; {hub_client.pull_hint(ref)}")
    return _fetch_plan(ref, plan, lambda name: hub_client.fetch(ref, files.revision, name, progress, files.offline))
