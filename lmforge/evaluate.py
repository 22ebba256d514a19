"""Perplexity as llama.cpp's `llama-perplexity` measures it, so numbers sit beside its own.

The text is tokenized once, with BOS in front when the vocabulary adds one (llama-perplexity
tokenizes with add_special); it is cut into non-overlapping windows of `ctx` tokens; when the
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

from lmforge.errors import LmforgeError, read_user_text
from lmforge.progress import Progress
from lmforge.sampling import log_softmax

# The text llama.cpp's own scripts (scripts/get-wikitext-2.sh) fetch for llama-perplexity:
# (dataset repo on the Hub, file in it, member of that zip)
WIKITEXT2 = ("ggml-org/ci", "wikitext-2-raw-v1.zip", "wikitext-2-raw/wiki.test.raw")
# The dataset's commit, so that perplexity figures do not drift with `main`: several public projects
# pin the archive at huggingface.co/datasets/ggml-org/ci/resolve/927b364.../wikitext-2-raw-v1.zip
# (4,721,645 bytes, sha256 ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11);
# read from their documents, not from the Hub (these machines cannot reach it).
WIKITEXT2_REVISION = "927b3642933080f1b0e811e2f916e14c292992f9"


@dataclass
class PerplexityResult:
    ppl: float
    tokens_scored: int
    chunks: int
    ctx: int
    seconds: float
    engine: str = "onnxruntime"  # which engine measured it

    def to_dict(self) -> dict:
        return {
            "engine": self.engine,
            "ppl": self.ppl,
            "tokens_scored": self.tokens_scored,
            "chunks": self.chunks,
            "ctx": self.ctx,
            "seconds": round(self.seconds, 2),
        }


def read_text(path: str | os.PathLike | None, progress: bool | None = None) -> str:
    """The evaluation text, line endings kept: the file PATH, or by default WikiText-2's test
    split as llama.cpp's scripts fetch it (downloaded once into the Hub cache)."""
    if path is None:
        return default_text(progress)
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"no evaluation text at {path}; pass --data PATH")
    return read_user_text(path, hint="; pass a text file with --data")


def default_text(progress: bool | None = None) -> str:
    """WikiText-2 raw test text from the `ggml-org/ci` dataset repo, through the Hub cache."""
    import zipfile

    from lmforge.checkpoint.hub_client import fetch_dataset_file

    repo, name, member = WIKITEXT2
    hint = "pass a text file with --data FILE"
    what = "the default evaluation text, WikiText-2"
    archive = fetch_dataset_file(repo, name, progress, what, hint, revision=WIKITEXT2_REVISION)
    try:
        with zipfile.ZipFile(archive) as z:
            return z.read(member).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{archive} holds no UTF-8 {member} ({e.__class__.__name__}); {hint}") from None


def check_ctx(ctx: int, engine) -> None:
    if ctx < 4 or ctx > engine.context_length:
        raise LmforgeError(f"--ctx {ctx} must be between 4 and the model's context ({engine.context_length})")


def check_chunks(chunks: int | None) -> None:
    if chunks is not None and chunks < 1:
        raise LmforgeError("--chunks must be at least 1")


def windows(tokens: list[int], ctx: int, chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """llama-perplexity's windows: non-overlapping, BOS replacing the first token when used."""
    check_chunks(chunks)
    n = len(tokens) // ctx
    if n == 0:
        raise LmforgeError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}; use a smaller --ctx")
    n = min(n, chunks) if chunks else n
    out = []
    for i in range(n):
        w = list(tokens[i * ctx : (i + 1) * ctx])
        if bos_id is not None:
            w[0] = bos_id
        out.append(w)
    return out


def text_windows(tok, text: str, ctx: int, chunks: int | None) -> list[list[int]]:
    """llama-perplexity's windows of TEXT under tokenizer TOK: the whole text tokenized with BOS
    first when the vocabulary adds one, then `windows` (BOS again replacing each window's first
    token). Tokenizing without that first BOS shifts every window by one token."""
    bos = tok.bos_id if tok.add_bos else None
    ids = tok.encode(text, add_special=True)
    return windows(ids, ctx, chunks, bos)


def nll_of_window(logits: np.ndarray, window: list[int]) -> tuple[float, int]:
    """Sum of -log p(next token) over the window's second half, and how many were scored."""
    ctx = len(window)
    first = ctx // 2
    lp = log_softmax(logits[first : ctx - 1])  # predict window[first+1:]
    targets = np.asarray(window[first + 1 :], dtype=np.int64)
    return float(-lp[np.arange(len(targets)), targets].sum()), len(targets)


def perplexity(
    model,
    data: str | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    target: str | None = None,
    threads: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of MODEL (anything `lmforge.load` takes) on DATA with llama-perplexity's protocol.

    Args: the model; text file (default WikiText-2 test); window length; at most this many
    windows; target preset if MODEL must be converted; threads; progress bar. A .gguf file with
    no target runs in llama.cpp when llama-cpp-python is installed (the file itself measured);
    the result's `engine` says which engine measured it.
    """
    check_chunks(chunks)
    text = read_text(data, progress)  # a missing file fails before any conversion
    engine, tok, name = _scoring_engine(model, target, threads, progress, ctx)
    check_ctx(ctx, engine)
    wins = text_windows(tok, text, ctx, chunks)
    with Progress(len(wins), progress, "perplexity", unit="chunk") as bar:
        start = time.perf_counter()
        total, count = 0.0, 0
        for w in wins:
            nll, n = nll_of_window(engine.score(w), w)
            total, count = total + nll, count + n
            bar.update()
            bar.note(ppl=f"{math.exp(total / count):.4f}")
    return PerplexityResult(math.exp(total / count), count, len(wins), ctx, time.perf_counter() - start, name)


def _scoring_engine(model, target: str | None, threads: int | None, progress: bool | None, ctx: int):
    """(engine with `score`, tokenizer, engine name) for MODEL: llama.cpp on a .gguf file when no
    target is asked for and llama-cpp-python is installed, else onnxruntime on the ONNX folder
    (a cached conversion of MODEL)."""
    import importlib.util

    from lmforge.checkpoint import resolve
    from lmforge.model import cached_onnx
    from lmforge.runtime.ort import OrtEngine
    from lmforge.tokenizer import Tokenizer

    path = resolve(model)
    if target is None and path.is_file() and path.suffix == ".gguf" and importlib.util.find_spec("llama_cpp"):
        from lmforge.checkpoint import open_checkpoint
        from lmforge.runtime.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(path, threads=threads, n_batch=max(ctx, 4))  # one batch per window
        return engine, open_checkpoint(path).tokenizer(), "llama.cpp"
    folder = cached_onnx(model, target or "cpu-fp32", progress)
    return OrtEngine(folder, threads=threads, full_logits=True), Tokenizer.from_folder(folder), "onnxruntime"


@dataclass
class KLResult:
    mean: float  # mean KL(P_ref || P_model) per scored token, nats
    p99: float  # its 99th percentile
    same_top: float  # share of scored tokens where both put the same token first
    ppl: float
    ref_ppl: float
    tokens_scored: int
    chunks: int
    engine: str = "onnxruntime"  # which engine computed MODEL's distributions
    ref_engine: str = "onnxruntime"  # and REF's

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def kl_of_window(logits: np.ndarray, ref_logits: np.ndarray, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per scored position (the window's second half): KL(P_ref || P) in nats and whether the
    two distributions share their most likely token."""
    first = len(window) // 2
    la = log_softmax(logits[first : len(window) - 1])
    lb = log_softmax(ref_logits[first : len(window) - 1])
    kl = (np.exp(lb) * (lb - la)).sum(axis=1)
    return kl, la.argmax(1) == lb.argmax(1)


def kl_divergence(
    model,
    ref,
    data: str | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    target: str | None = None,
    threads: int | None = None,
    ref_target: str | None = None,
) -> KLResult:
    """KL divergence of MODEL's next-token distributions from REF's on the same windows, as
    llama-perplexity's --kl-divergence reports it (mean, 99th percentile, same top token).
    `target` applies to MODEL, `ref_target` (default cpu-fp32) to REF, when they need converting;
    a .gguf with no target runs in llama.cpp when it is installed, as `perplexity` does (the
    result's `engine` and `ref_engine` say which engine computed each)."""
    check_chunks(chunks)
    text = read_text(data)
    (engine, _, name), (ref_engine, tok, ref_name) = (
        _scoring_engine(m, t, threads, None, ctx) for m, t in ((model, target), (ref, ref_target))
    )
    engines = [engine, ref_engine]
    for e in engines:
        check_ctx(ctx, e)
    if engines[0].vocab_size != engines[1].vocab_size:
        raise LmforgeError(
            f"MODEL has {engines[0].vocab_size} tokens and REF {engines[1].vocab_size}: "
            "KL divergence needs one vocabulary"
        )
    wins = text_windows(tok, text, ctx, chunks)
    kls, same, nll, ref_nll = [], [], 0.0, 0.0
    for w in wins:
        logits, ref_logits = engines[0].score(w), engines[1].score(w)
        kl, top = kl_of_window(logits, ref_logits, w)
        kls.append(kl)
        same.append(top)
        nll += nll_of_window(logits, w)[0]
        ref_nll += nll_of_window(ref_logits, w)[0]
    kl = np.concatenate(kls)
    n = len(kl)
    return KLResult(
        float(kl.mean()),
        float(np.percentile(kl, 99)),
        float(np.concatenate(same).mean()),
        math.exp(nll / n),
        math.exp(ref_nll / n),
        n,
        len(wins),
        name,
        ref_name,
    )
