"""Prompt cache files: the KV prefix a run keeps, on disk (`lmforge run --prompt-cache FILE`,
as llama.cpp's `--prompt-cache`), so the next run prefills only what follows the shared prefix.

A file is safetensors (never pickle): the prefix's token ids (`tokens`) and its KV as the engine
gives it (ONNX Runtime: one (kv_heads, n, head_dim) tensor per layer and K/V; llama.cpp: its own
sequence state bytes), with string metadata: format and version, the engine's identity (engine,
device, KV dtype, layer/head shapes, llama.cpp version) and a digest of the model's files, and a
SHA-256 of the tensors. A file that does not match in every field is refused, never half used.
Writes go to a hidden temporary file that is renamed into place once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError, writing
from lmforge.export.atomic import clean_stale, replace, temp_path
from lmforge.generate import PrefixCache

FORMAT = "lmforge-prompt-cache"
VERSION = 1
HINT = "remove it or give another --prompt-cache path"
WRITE_HINT = "give a --prompt-cache path in a writable folder"
SAMPLES, SAMPLE_BYTES = 256, 16 << 10  # a large file's digest reads 4 MiB of it, spread evenly
WHOLE_UNDER = 16 << 20  # smaller files are hashed whole


class PromptCacheError(LmforgeError):
    """A prompt cache file that cannot be used: another model's, another version, damaged."""


def _file_digest(h, path: Path) -> None:
    """Feed `path`'s size and bytes into `h`: all of them for a small file, else SAMPLES chunks
    at evenly spaced offsets (cheap on a multi-GB file; any other model differs in them)."""
    size = path.stat().st_size
    h.update(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_UNDER:
            h.update(f.read())
            return
        for i in range(SAMPLES):
            f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))


def identity(engine) -> dict[str, str]:
    """What a saved KV depends on: the engine's fields and a digest of the model's files."""
    files, info = engine.state_identity()
    h = hashlib.sha256()
    for path in files:
        _file_digest(h, Path(path))
    return {**info, "model_digest": h.hexdigest()}


def _tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{t.dtype.str}|{t.shape}|".encode())
        h.update(t.view(np.uint8).reshape(-1) if t.size else b"")
    return h.hexdigest()


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64", "uint8": "U8"}


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """`tensors` in the safetensors layout, written one at a time by Python's own file I/O (so a
    full disk is an OSError that `writing` turns into one line), then synced to disk."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype.name],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps({**header, "__metadata__": metadata}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(memoryview(np.ascontiguousarray(t)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def check_writable(path: str | os.PathLike) -> Path:
    """`path`, or a user error (before any generating) when a cache file cannot be written there."""
    if not str(path).strip():
        raise PromptCacheError("--prompt-cache is empty; give a file path")
    path = Path(path).expanduser()
    if path.is_dir():
        raise PromptCacheError(f"--prompt-cache {path} is a folder; give a file path")
    with writing(f"--prompt-cache {path}", WRITE_HINT, every=True):
        probe = temp_path(path)
        probe.open("wb").close()
        probe.unlink()
    return path


def _check_metadata(path: Path, meta: dict[str, str], mine: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
        raise PromptCacheError(f"{path} is not an lmforge prompt cache; {HINT}")
    if meta.get("version") != str(VERSION):
        raise PromptCacheError(
            f"{path} is a prompt cache of format version {meta.get('version')!r}; this lmforge reads version "
            f"{VERSION}: remove it (the next run writes it again)"
        )
    for key, value in mine.items():
        if meta.get(key) != value:
            saved = meta.get(key) or "none"
            raise PromptCacheError(
                f"{path} was saved for another model or engine ({key} {saved[:16]}, this run {value[:16]}); {HINT}"
            )


def _read_file(path: Path, mine: dict[str, str]) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and tensors of `path`, its metadata checked against `mine` before any tensor
    is read (a large file of something else is refused without loading it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            _check_metadata(path, meta, mine)
            return meta, {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
        raise PromptCacheError(f"{path} is not a complete prompt cache ({reason}); {HINT}") from None


def read_prompt_cache(path: str | os.PathLike, engine, capacity: int) -> PrefixCache | None:
    """The PrefixCache saved in `path` for `engine` (None when there is no such file), its cache
    with room for `capacity` positions; a PromptCacheError for a file of another model, engine or
    version, or a truncated or damaged one."""
    path = Path(path).expanduser()
    if not path.exists():
        return None
    if not path.is_file():
        raise PromptCacheError(f"--prompt-cache {path} is not a file; {HINT}")
    meta, tensors = _read_file(path, identity(engine))
    tokens = tensors.pop("tokens", None)
    damaged = f"{path} is damaged"
    if tokens is None or tokens.ndim != 1 or tokens.dtype != np.int64 or meta.get("n_tokens") != str(len(tokens)):
        raise PromptCacheError(f"{damaged} (no token ids); {HINT}")
    if meta.get("sha256") != _tensor_digest({**tensors, "tokens": tokens}):
        raise PromptCacheError(f"{damaged} (its checksum does not match); {HINT}")
    if any(t.dtype.kind == "f" and not np.isfinite(t).all() for t in tensors.values()):
        raise PromptCacheError(f"{damaged} (its KV holds NaN or infinity); {HINT}")
    try:
        cache = engine.cache_from_kv(tensors, len(tokens), max(capacity, len(tokens)))
    except ValueError as e:
        raise PromptCacheError(f"{damaged} ({e}); {HINT}") from None
    return PrefixCache(cache, [int(t) for t in tokens])


def write_prompt_cache(path: str | os.PathLike, engine, prefix: PrefixCache | None) -> int:
    """Save `prefix` (a kept cache and its tokens) to `path` atomically: a hidden temporary file
    renamed over it once complete, so a killed write never leaves a file that looks whole.
    Returns the tokens saved (0, and nothing written, when there is no kept cache)."""
    if prefix is None or prefix.cache is None:
        return 0
    path = Path(path).expanduser()
    tensors = engine.kv_tensors(prefix.cache)
    tensors["tokens"] = np.asarray(prefix.tokens, dtype=np.int64)
    assert int(prefix.cache.lengths[0]) == len(prefix.tokens)
    meta = {"format": FORMAT, "version": str(VERSION), **identity(engine)}
    meta.update(n_tokens=str(len(prefix.tokens)), sha256=_tensor_digest(tensors))
    with writing(f"--prompt-cache {path}", WRITE_HINT):
        clean_stale(path)
        tmp = temp_path(path)
        try:
            _write_safetensors(tmp, tensors, meta)
            replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _sync_folder(path.parent)
    return len(prefix.tokens)


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the file system lets a folder be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_prompt_cache(model, path: str | os.PathLike, capacity: int) -> int:
    """Start `model`'s prefix reuse from the cache saved in `path` (see `read_prompt_cache`);
    returns the tokens it holds (0 when there is no file yet)."""
    prefix = read_prompt_cache(path, model.engine, capacity)
    if prefix is None:
        return 0
    model.prefix = prefix
    return len(prefix.tokens)


def save_prompt_cache(model, path: str | os.PathLike) -> int:
    """Save `model`'s kept prefix (the last call's, see `Model.prefix`) to `path`; returns the tokens saved."""
    return write_prompt_cache(path, model.engine, model.prefix)
