"""A lean GGUF header parser (ggml's docs/gguf.md): metadata and tensor infos, read with struct
from a memory map; tensor data stays on disk until asked for.

gguf-py's reader builds a numpy array per metadata string (~170 MB for a 49k-token vocabulary);
this one keeps plain Python values. Dequantization still uses gguf-py's codecs.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import CheckpointError

MAGIC = b"GGUF"
# GGUFValueType -> (struct format, numpy dtype) for scalar types
SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
STRING, ARRAY = 8, 9
MAX_NESTING = 2  # llama.cpp writes flat arrays; an array of arrays is as deep as a valid file goes


@dataclass(frozen=True)
class TensorEntry:
    """One tensor info: GGUF name, numpy-order shape (rows first), ggml type, absolute offset, size."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int
    nbytes: int


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise IndexError("string past end of file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0):
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype][0])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if depth >= MAX_NESTING:
                raise ValueError(f"arrays nested deeper than {MAX_NESTING}")
            if etype in SCALARS:
                dtype = np.dtype(SCALARS[etype][1]).newbyteorder("<")
                end = self.pos + n * dtype.itemsize
                if end > len(self.buf):
                    raise IndexError("array past end of file")
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
                self.pos = end
                return arr.tolist()
            # each element takes at least 8 bytes (a string's length, an array's type and count)
            if self.pos + n * 8 > len(self.buf):
                raise IndexError("array past end of file")
            return [self.value(etype, depth + 1) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


class Metadata(dict):
    """GGUF key -> value, and in `types` key -> (GGUFValueType, element type of an array or None),
    so a writer can copy a value with the type it had."""

    def __init__(self):
        super().__init__()
        self.types: dict[str, tuple[int, int | None]] = {}


def parse(path: Path) -> tuple[dict, list[TensorEntry], mmap.mmap]:
    """(metadata, tensor entries, the file's memory map); corrupt or truncated files raise
    CheckpointError with a one-line message."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            f.seek(0)
            raise CheckpointError(f"{path} is not a GGUF file (magic {f.read(4)!r}, expected b'GGUF')")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, mm, size)
    except BaseException:
        mm.close()
        raise


def _parse(path: Path, mm: mmap.mmap, size: int) -> tuple[dict, list[TensorEntry], mmap.mmap]:
    c = _Cursor(memoryview(mm))
    c.pos = 4
    try:
        version = c.unpack("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path} is GGUF version {version}; lmforge reads versions 2 and 3")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        # a tensor info takes at least 24 bytes and a key-value pair 13: counts the file cannot hold are damage
        if n_tensors * 24 + n_kv * 13 > size:
            raise ValueError(f"{n_tensors} tensors and {n_kv} keys cannot fit in {size} bytes")
        meta = Metadata()
        for _ in range(n_kv):
            key = c.string()
            vtype = c.unpack("<I")
            etype = int.from_bytes(c.buf[c.pos : c.pos + 4], "little") if vtype == ARRAY else None
            meta[key] = c.value(vtype)
            meta.types[key] = (vtype, etype)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            if n_dims > 8:
                raise ValueError("implausible tensor rank")
            if n_dims == 0:
                raise ValueError("tensor of rank 0")
            dims = [c.unpack("<Q") for _ in range(n_dims)]
            qtype, offset = c.unpack("<I"), c.unpack("<Q")
            infos.append((name, dims, qtype, offset))
    except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({e.__class__.__name__} in its header: {str(e)[:80]}); "
            "re-download or re-convert it"
        ) from None
    finally:
        c.buf.release()
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise CheckpointError(f"{path} has an invalid general.alignment ({align!r}); re-download or re-convert it")
    data_start = (c.pos + align - 1) // align * align
    entries = [_entry(path, size, data_start, align, *info) for info in infos]
    _check_layout(path, entries, data_start)
    return meta, entries, mm


def _entry(path: Path, size: int, data_start: int, align: int, name: str, dims, qtype: int, offset: int):
    """One tensor info checked: a known type, whole blocks, aligned and inside the file."""
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise CheckpointError(f"tensor {name!r} in {path} has unknown ggml type {qtype}") from None
    n = math.prod(dims)  # Python ints: corrupt dims cannot wrap around to a small size
    if n == 0 or n % block or (dims and dims[0] % block) or any(d >= 1 << 40 for d in dims):
        raise CheckpointError(f"tensor {name!r} in {path} has impossible dimensions {dims}; the file is corrupt")
    nbytes = n // block * type_size
    start = data_start + offset
    if offset % align:
        raise CheckpointError(f"tensor {name!r} in {path} is not aligned to {align} bytes; the file is corrupt")
    if start + nbytes > size:
        raise CheckpointError(f"{path} is truncated (tensor {name} runs past the end); re-download it")
    return TensorEntry(name, tuple(int(d) for d in reversed(dims)), qtype, start, nbytes)


def _check_layout(path: Path, entries: list[TensorEntry], data_start: int) -> None:
    """Tensor names unique and their data regions disjoint."""
    if len({e.name for e in entries}) != len(entries):
        raise CheckpointError(f"{path} names a tensor twice; the file is corrupt")
    end = data_start
    for e in sorted(entries, key=lambda e: e.offset):
        if e.offset < end:
            raise CheckpointError(f"tensors in {path} overlap (tensor {e.name}); the file is corrupt")
        end = e.offset + e.nbytes
