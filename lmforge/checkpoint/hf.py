"""HF checkpoint folders: config.json + safetensors (single or sharded; fp32/fp16/bf16).

Safetensors are parsed here (8-byte header length, JSON header, raw little-endian data) so
bf16 reads without torch and each tensor is read from disk only when the stream reaches it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.arch import EXPERT, get_arch
from lmforge.checkpoint.base import Checkpoint, TensorInfo
from lmforge.checkpoint.validate import check_hf_config, check_tensors, checked_spec
from lmforge.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype -> (numpy storage dtype, bytes per element)
DTYPES = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # widened to float32 on read
    "F64": (np.float64, 8),
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


# bytes per element of every safetensors dtype, to check each tensor's data region
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
ITEM_SIZES.update({"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8})


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header; returns ({name: entry}, offset of the data section).
    Each entry has a known dtype, a shape of whole numbers and data_offsets [begin, end] inside
    the data section, of exactly dtype size x shape bytes, not overlapping any other tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(f"{path} is not a valid safetensors file (header length {n}); re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header ({e.__class__.__name__}); re-download it"
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a safetensors header that is not a JSON object; re-download it")
    header.pop("__metadata__", None)
    data_start = 8 + n
    regions = sorted((_region(path, name, e, size - data_start), name) for name, e in header.items())
    end = 0
    for (begin, stop), name in regions:
        if begin < end:
            raise CheckpointError(f"{path}: tensor {name} overlaps another tensor's data; the file is corrupt")
        end = stop
    return header, data_start


def _region(path: Path, name, e, data_size: int) -> tuple[int, int]:
    """(begin, end) of one header entry, checked against its dtype and shape and the data size."""

    def bad(why: str):
        return CheckpointError(f"{path}: tensor {str(name)[:80]!r} {why}; the file is corrupt")

    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise bad("lacks dtype, shape or data_offsets")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise bad(f"has unknown dtype {str(dtype)[:20]!r}")
    ints = (list, tuple)
    if not isinstance(shape, ints) or len(shape) > 8 or not all(_count(d) for d in shape):
        raise bad(f"has an invalid shape {str(shape)[:60]}")
    if not isinstance(offsets, ints) or len(offsets) != 2 or not all(_count(x) for x in offsets):
        raise bad(f"has invalid data_offsets {str(offsets)[:60]}")
    begin, end = offsets
    if begin > end:
        raise bad(f"has reversed data_offsets {offsets}")
    if end > data_size:
        raise CheckpointError(f"{path} is truncated (tensor {name} runs past the end); re-download it")
    if end - begin != math.prod(shape) * ITEM_SIZES[dtype]:
        raise bad(f"has {end - begin} bytes for shape {list(shape)} of {dtype}")
    return begin, end


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 50


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, AttributeError, RecursionError):
            raise CheckpointError(f"{index} is not a valid shard index; fix or re-download it") from None
        if any(f.parent != folder for f in files):
            raise CheckpointError(f"{index} names files outside {folder}; fix or re-download it")
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder} lacks shard(s) {', '.join(missing)} named in its index; download them")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); lmforge never unpickles: "
            "save the model as safetensors (save_pretrained(..., safe_serialization=True)) and retry"
        )
    raise CheckpointError(f"{folder} has no *.safetensors weights; point lmforge at a complete HF checkpoint folder")


class HFCheckpoint(Checkpoint):
    """An HF folder, read tensor by tensor."""

    format = "hf"

    def __init__(self, folder: Path):
        self.path = folder
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{folder} has no config.json; point lmforge at an HF checkpoint folder")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON (line {e.lineno}); fix or re-download it") from None
        except (UnicodeDecodeError, RecursionError, OSError) as e:
            raise CheckpointError(f"{cfg_path} is not readable JSON ({e.__class__.__name__}); fix it") from None
        check_hf_config(self.config, cfg_path)
        model_type = self.config.get("model_type")
        if not model_type or not isinstance(model_type, str):
            raise CheckpointError(f"{cfg_path} has no model_type; is this a transformers checkpoint?")
        self.arch = get_arch(model_type)
        self.spec = checked_spec(cfg_path, lambda: self.arch.spec_from_hf(self.config))
        self._locations: dict[str, tuple[Path, int, dict]] = {}
        self.infos = []
        match = self.arch.matcher("hf")
        ignore = [re.compile(p) for p in self.arch.hf_ignore]
        files = _shard_files(folder)
        self.file_bytes = sum(f.stat().st_size for f in files)
        for f in files:
            header, data_start = read_safetensors_header(f)
            for src, entry in header.items():
                if any(rx.match(src) for rx in ignore):
                    continue
                name = match(src)
                if name is None:
                    raise CheckpointError(
                        f"tensor {src!r} in {f.name} has no place in lmforge's {self.arch.model_type} table; "
                        "this checkpoint variant is not supported"
                    )
                if entry["dtype"] not in DTYPES:
                    raise CheckpointError(f"tensor {src!r} has dtype {entry['dtype']}; lmforge reads F32, F16, BF16")
                begin, end = entry["data_offsets"]
                self._locations[name] = (f, data_start + begin, entry)
                self.infos.append(TensorInfo(name, src, tuple(entry["shape"]), entry["dtype"], end - begin))
        self._stacks = self._stack_experts()
        check_tensors(self.spec, {t.name: t.shape for t in self.infos}, folder)

    def _stack_experts(self) -> dict[str, list[str]]:
        """Per-expert matrices ("{name}@{j}", see `Arch.matcher`) become one (n_experts, ...) tensor
        each, as GGUF stores them; returns {stacked name: its parts in expert order}."""
        parts: dict[str, dict[int, TensorInfo]] = {}
        for info in self.infos:
            if EXPERT in info.name:
                base, j = info.name.split(EXPERT)
                parts.setdefault(base, {})[int(j)] = info
        stacks, infos = {}, []
        for info in self.infos:
            base = info.name.split(EXPERT)[0]
            if base not in parts:
                infos.append(info)
            elif base not in stacks:
                by_j = parts[base]
                if sorted(by_j) != list(range(len(by_j))):
                    raise CheckpointError(
                        f"{self.path} lacks some experts of {base} (has {sorted(by_j)}); re-download it"
                    )
                ordered = [by_j[j] for j in range(len(by_j))]
                stacks[base] = [i.name for i in ordered]
                shape = (len(ordered), *ordered[0].shape)
                infos.append(
                    TensorInfo(base, ordered[0].source_name, shape, info.dtype, sum(i.nbytes for i in ordered))
                )
        self.infos = infos
        return stacks

    def read(self, name: str) -> np.ndarray:
        """One tensor by canonical name, as float32 (bf16 widened) or float16."""
        if name in self._stacks:
            return np.stack([self.read(part) for part in self._stacks[name]])
        f, offset, entry = self._locations[name]
        dtype, width = DTYPES[entry["dtype"]]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        arr = np.fromfile(f, dtype=dtype, count=count, offset=offset)
        if entry["dtype"] == "BF16":
            arr = bf16_to_f32(arr)
        return arr.reshape(entry["shape"])

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for info in self.infos:
            yield info.name, self.read(info.name)

    def tokenizer(self):
        from lmforge.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.path)

    def chat_template(self) -> str | None:
        from lmforge.chat import template_from_folder

        return template_from_folder(self.path)
