"""AWQ on the CPU (Lin et al., 2023): activation-aware per-channel scales for int4 weights.

Calibration text runs through lmforge's own fp32 ONNX graph, which also outputs the input of
every linear group. Per group, the mean |activation| of each input channel gives candidate
scales s = mean^alpha; a grid over alpha keeps the s whose quantized weights W s reproduce the
group's float outputs best on a sample of calibration rows. The 1/s goes into the op before the
group (RMSNorm weight, `up` rows, `v` rows), so the float model is unchanged. No GPU, no AutoAWQ.

Default calibration text: the documentation that ships with every Python (`pydoc_data.topics`),
never the evaluation corpus.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError, read_user_text
from lmforge.export.weights import AwqScales, QuantOptions, WeightSource
from lmforge.progress import Progress
from lmforge.quant.nbits import rtn

GRID = np.linspace(0.0, 1.0, 21)


def calibration_text(path: str | os.PathLike | None) -> str:
    if path is None:
        import pydoc_data.topics

        return "\n\n".join(pydoc_data.topics.topics.values())
    return read_user_text(path, "calibration text", newline=None)


def _groups(spec, i: int) -> list[tuple[str, str | None]]:
    """(group, tensor whose rows/values take 1/s) for layer i. The `o` group needs one v row per
    input channel, so it is scaled only without grouped-query attention; groups whose feeding
    projection has a bias (v, up) are left alone, since the bias would need the 1/s too."""
    groups = [(f"layers.{i}.qkv", f"layers.{i}.attn_norm"), (f"layers.{i}.gate_up", f"layers.{i}.mlp_norm")]
    if not spec.mlp_bias:
        groups.append((f"layers.{i}.down", f"layers.{i}.up"))
    if spec.n_heads == spec.n_kv_heads and not spec.qk_norm and not spec.attention_bias:
        groups.append((f"layers.{i}.o", f"layers.{i}.v"))
    return groups


def search_scale(w: np.ndarray, x: np.ndarray, mean_abs: np.ndarray, quant: QuantOptions) -> tuple[np.ndarray, float, float]:
    """Best s for weight W (N, K) given sample inputs X (T, K) and per-channel mean |x|.
    Returns (s, relative error with s, relative error without scaling)."""
    y = x @ w.T
    denom = float((y * y).mean()) or 1.0
    best, best_err, base_err = np.ones(w.shape[1], np.float32), np.inf, np.inf
    m = np.maximum(mean_abs, 1e-8)
    for alpha in GRID:
        s = np.power(m, alpha)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        wq = rtn(w * s[None, :], quant.bits, quant.block_size, quant.symmetric).dequantize() / s[None, :]
        err = float(((x @ wq.T - y) ** 2).mean()) / denom
        if alpha == 0.0:
            base_err = err
        if err < best_err:
            best, best_err = s, err
    return best, best_err, base_err


def compute_awq_scales(ckpt, quant: QuantOptions, calibration: str | None = None, n_windows: int = 32,
                       window: int = 256, sample_rows: int = 512, progress: bool = False, seed: int = 0) -> AwqScales:
    """AWQ scales for every linear group of `ckpt`, from calibration text through its fp32 graph."""
    import onnx
    import onnxruntime as ort

    from lmforge.export.onnx import GraphOptions, build

    tok = ckpt.tokenizer()
    ids = tok.encode(calibration_text(calibration))
    n = min(n_windows, len(ids) // window)
    if n == 0:
        raise LmforgeError(f"calibration text gives {len(ids)} tokens, fewer than one window of {window}; "
                           "give a longer --calibration file")
    spec = ckpt.spec
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="lmforge-awq-") as tmp:
        graphs = build(ckpt, Path(tmp), GraphOptions(taps=True, max_positions=window))
        onnx.save_model(graphs["last"], Path(tmp) / "model.onnx")
        del graphs
        sess = ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
        taps = [o.name for o in sess.get_outputs() if o.name.startswith("tap.")]
        sums = {t: 0.0 for t in taps}
        rows = {t: [] for t in taps}
        per_window = min(window, max(1, sample_rows // n))
        empty = {f"past_key_values.{i}.{kv}": np.zeros((1, spec.n_kv_heads, 0, spec.head_dim), np.float32)
                 for i in range(spec.n_layers) for kv in ("key", "value")}
        bar = Progress(n + spec.n_layers, progress, "AWQ")
        for w in range(n):
            chunk = np.asarray([ids[w * window:(w + 1) * window]], dtype=np.int64)
            outs = sess.run(taps, {"input_ids": chunk, "attention_mask": np.ones_like(chunk), **empty})
            pick = rng.choice(window, per_window, replace=False)
            for t, a in zip(taps, outs):
                a = a[0]                                                              # (window, K)
                sums[t] = sums[t] + np.abs(a).sum(axis=0)
                rows[t].append(a[pick].astype(np.float16))
            bar.update()
        del sess
    total = n * window
    src = WeightSource(ckpt)
    scales = AwqScales()
    for i in range(spec.n_layers):
        for group, before in _groups(spec, i):
            t = f"tap.{group}"
            parts = {"qkv": src.qkv_parts(i), "gate_up": src.gate_up_parts(i)}.get(group.split(".")[-1], [group])
            w = src.matrix(parts)
            x = np.concatenate(rows.pop(t)).astype(np.float32)
            s, _, _ = search_scale(w, x, sums.pop(t) / total, quant)
            scales.col[group] = s
            scales.row_div[before] = s
        bar.update()
    return scales
