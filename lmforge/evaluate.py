"""Perplexity as llama.cpp's `llama-perplexity` measures it, so numbers sit beside its own.

The text is tokenized once; it is cut into non-overlapping windows of `ctx` tokens; when the
model adds BOS, each window's first token is replaced by BOS; each window runs from an empty
cache and only its second half is scored (every token there has at least ctx/2 of context).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@dataclass
class PerplexityResult:
    ppl: float
    tokens_scored: int
    chunks: int
    ctx: int
    seconds: float

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens_scored": self.tokens_scored, "chunks": self.chunks, "ctx": self.ctx,
                "seconds": round(self.seconds, 2)}


def read_text(path: str | os.PathLike | None) -> str:
    """The evaluation text (default: WikiText-2 test beside the project), line endings kept."""
    path = Path(path) if path else DEFAULT_DATA
    if not path.exists():
        raise LmforgeError(f"no evaluation text at {path}; pass --data PATH")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def windows(tokens: list[int], ctx: int, chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """llama-perplexity's windows: non-overlapping, BOS replacing the first token when used."""
    n = len(tokens) // ctx
    if n == 0:
        raise LmforgeError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}; use a smaller --ctx")
    n = min(n, chunks) if chunks else n
    out = []
    for i in range(n):
        w = list(tokens[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            w[0] = bos_id
        out.append(w)
    return out


def nll_of_window(logits: np.ndarray, window: list[int]) -> tuple[float, int]:
    """Sum of -log p(next token) over the window's second half, and how many were scored."""
    ctx = len(window)
    first = ctx // 2
    rows = logits[first:ctx - 1].astype(np.float64)                             # predict window[first+1:]
    targets = np.asarray(window[first + 1:], dtype=np.int64)
    mx = rows.max(axis=1, keepdims=True)
    logz = np.log(np.exp(rows - mx).sum(axis=1)) + mx[:, 0]
    return float((logz - rows[np.arange(len(targets)), targets]).sum()), len(targets)


def perplexity(model, data: str | None = None, ctx: int = 512, chunks: int | None = None,
               target: str | None = None, threads: int | None = None, progress: bool | None = None) -> PerplexityResult:
    """Perplexity of MODEL (anything `lmforge.load` takes) on DATA with llama-perplexity's protocol.

    Args: the model; text file (default WikiText-2 test); window length; at most this many
    windows; target preset if MODEL must be converted; threads; progress bar.
    """
    from lmforge.model import cached_onnx
    from lmforge.runtime.ort import OrtEngine
    from lmforge.tokenizer import Tokenizer

    folder = cached_onnx(model, target or "cpu-fp32", progress)
    engine = OrtEngine(folder, threads=threads, full_logits=True)
    if ctx < 4 or ctx > engine.context_length:
        raise LmforgeError(f"--ctx {ctx} must be between 4 and the model's context ({engine.context_length})")
    tok = Tokenizer.from_folder(folder)
    tokens = tok.encode(read_text(data))
    wins = windows(tokens, ctx, chunks, tok.bos_id if tok.add_bos else None)
    show = os.isatty(2) if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(wins), unit="chunk", desc="perplexity", leave=False)
    start = time.perf_counter()
    total, count = 0.0, 0
    for w in wins:
        nll, n = nll_of_window(engine.score(w), w)
        total, count = total + nll, count + n
        if bar:
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(total / count):.4f}")
    if bar:
        bar.close()
    return PerplexityResult(math.exp(total / count), count, len(wins), ctx, time.perf_counter() - start)
