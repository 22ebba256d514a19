"""Where the exporter's weights come from: float tensors read one layer at a time, quantized
on the way (RTN or AWQ-scaled RTN) or transcoded exactly from GGUF blocks.

AWQ scales fold in here: a linear group's input columns are multiplied by s before quantizing,
and the op feeding that group (a norm, the `up` rows, the `v` rows) is divided by s, which
leaves the float model unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from lmforge.arch import FUSED_GROUPS
from lmforge.checkpoint.base import Checkpoint
from lmforge.errors import LmforgeError
from lmforge.quant.nbits import NBits, concat, rtn
from lmforge.quant.transcode import EXACT_TYPES, transcode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantOptions:
    """method: "rtn" | "awq"; bits 4 or 8; block_size a power of two >= 16; symmetric codes or
    integer zero points; MatMulNBits accuracy_level; requantize: ignore GGUF blocks (dequantize
    and quantize again); share_tied: quantize a tied embedding once for the input and the head;
    head_bits: bits of the output head (llama.cpp keeps it at 6-8 bits too: 4-bit heads cost
    the default model 15% perplexity, measured)."""

    method: str = "rtn"
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True  # measured better than integer zero points on the default model
    accuracy_level: int = 4
    requantize: bool = False
    share_tied: bool = True
    head_bits: int = 8

    def __post_init__(self):
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise LmforgeError(f"block size {bs} is not a power of two >= 16; use 16, 32, 64, 128 or 256")
        if self.bits not in (4, 8) or self.head_bits not in (4, 8):
            raise LmforgeError(f"{self.bits}-bit weights are not supported; use 4 or 8")
        if self.method not in ("rtn", "awq"):
            raise LmforgeError(f"unknown quantization {self.method!r}; use rtn or awq")


def head_block(block_size: int, k: int) -> int:
    """The embedding/head block: the preset's, or the largest power of two >= 16 dividing K, so
    GatherBlockQuantized can share the head's codes (it needs whole blocks per row)."""
    b = block_size
    while k % b and b > 16:
        b //= 2
    return b


@dataclass
class AwqScales:
    """col: group key -> input-column multipliers; row_div: tensor name -> row divisors."""

    col: dict[str, np.ndarray] = field(default_factory=dict)
    row_div: dict[str, np.ndarray] = field(default_factory=dict)


class WeightSource:
    """Tensors of one checkpoint as the graph builder wants them."""

    def __init__(self, ckpt: Checkpoint, quant: QuantOptions | None = None, awq: AwqScales | None = None):
        self.ckpt, self.spec, self.quant = ckpt, ckpt.spec, quant
        self.awq = awq or AwqScales()
        self.names = {t.name for t in ckpt.infos}
        self.types = {t.name: t.dtype for t in ckpt.infos}
        self._shapes = {t.name: tuple(t.shape) for t in ckpt.infos}
        self.offset = np.float32(ckpt.spec.norm_offset)
        self.requantized: set[str] = set()
        self.transcoded: set[str] = set()

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.names:
            return None
        w = self.ckpt.read(name).astype(np.float32, copy=False)
        div = self.awq.row_div.get(name)
        return w if div is None else w / (div[:, None] if w.ndim == 2 else div)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as stored, without reading it."""
        return self._shapes[name]

    def norm(self, name: str) -> np.ndarray:
        w = self.ckpt.read(name).astype(np.float32, copy=False) + self.offset  # Gemma: (1 + w)
        div = self.awq.row_div.get(name)
        return w if div is None else (w / div).astype(np.float32)

    def norm_bias(self, name: str) -> np.ndarray | None:
        """The bias of LayerNorm `name` (Phi-3.5-MoE), scaled as `norm` scales its weight; None without one."""
        b = self.get(name + ".bias")
        div = self.awq.row_div.get(name)
        return b if b is None or div is None else (b / div).astype(np.float32)

    def qkv_parts(self, i: int) -> list[str]:
        """Layer i's q, k, v tensors in the stream: one fused tensor or three (the arch says which)."""
        return self.ckpt.arch.parts(i, "qkv")

    def gate_up_parts(self, i: int) -> list[str]:
        """Layer i's gate and up tensors in the stream: one fused tensor or two."""
        return self.ckpt.arch.parts(i, "gate_up")

    def qkv_bias(self, i: int) -> np.ndarray | None:
        fused = self.get(f"layers.{i}.qkv.bias")
        if fused is not None:
            return fused
        parts = [self.get(f"layers.{i}.{p}.bias") for p in "qkv"]
        return np.concatenate(parts) if parts[0] is not None else None

    def _float(self, parts: list[str]) -> np.ndarray:
        ws = []
        for p in parts:
            w = self.get(p)
            i = p.split(".")[1] if p.startswith("layers.") else None
            # fused tensors: the AWQ row divisor of their last part (v, up) applies to their last rows
            for fused, group in FUSED_GROUPS.items():
                div = self.awq.row_div.get(f"layers.{i}.{group[-1]}")
                if div is not None and p == f"layers.{i}.{fused}":
                    w = w.copy()
                    w[-len(div) :] /= div[:, None]
            ws.append(w)
        return ws[0] if len(ws) == 1 else np.concatenate(ws)

    def _exact(self, parts: list[str]) -> NBits | list[NBits] | None:
        """Transcoded GGUF blocks when every part allows it: one NBits, or one per run of parts
        that share a (bits, block) layout when a mix stores them differently (e.g. Q4_K q and k
        beside a Q6_K v); the graph then runs one MatMulNBits per run and concatenates."""
        q = self.quant
        if q is None or q.requantize or q.method == "awq" or self.ckpt.format != "gguf":
            return None
        types = [self.types[p] for p in parts]
        if not all(t in EXACT_TYPES for t in types):
            return None
        runs: list[list[NBits]] = []
        for p in parts:
            raw = self.ckpt.read_raw(p)
            coded = transcode(raw.qtype, raw.blocks, raw.shape)
            if runs and (runs[-1][0].bits, runs[-1][0].block_size) == (coded.bits, coded.block_size):
                runs[-1].append(coded)
            else:
                runs.append([coded])
        self.transcoded.update(types)
        stacked = [run[0] if len(run) == 1 else concat(run) for run in runs]
        return stacked[0] if len(stacked) == 1 else stacked

    def matrix(self, parts: list[str], group: str | None = None) -> np.ndarray | NBits | list[NBits]:
        """The (N, K) weight of `parts` stacked along N: float, or NBits when quantizing (a list
        of NBits stacked along N when exact GGUF parts differ in bits or block size).

        `group` names the AWQ scale applied to the input columns."""
        exact = self._exact(parts)
        if exact is not None:
            return exact
        w = self._float(parts)
        s = self.awq.col.get(group) if group else None
        if s is not None:
            w = w * s[None, :]  # the matching 1/s lives in the op before this group
        if self.quant is None:
            return w
        if self.ckpt.format == "gguf" and not (self.quant.requantize or self.quant.method == "awq"):
            self.requantized.update(self.types[p] for p in parts if self.types[p] not in ("F32", "F16", "BF16"))
        if parts in (["embed"], ["lm_head"]):
            return rtn(w, self.quant.head_bits, head_block(self.quant.block_size, w.shape[1]), self.quant.symmetric)
        return rtn(w, self.quant.bits, self.quant.block_size, self.quant.symmetric)

    def report(self) -> None:
        """Say which GGUF types were transcoded exactly and which were quantized again."""
        if self.requantized:
            log.warning(
                f"{', '.join(sorted(self.requantized))} tensors have no exact MatMulNBits form; "
                "they were dequantized and quantized again with "
                f"{self.quant.method.upper()} ({self.quant.bits}-bit, block {self.quant.block_size})"
            )
