"""AWQ calibration: runs calibration text through lmforge's own fp32 ONNX graph, which also
outputs the input of every linear group, and picks each group's scales with `quant.awq`.

It lives in `export` because it needs the graph builder and the weight source; the scale search
itself (`lmforge.quant.awq`) is pure numpy and knows nothing of graphs.

Default calibration text: the documentation that ships with every Python (`pydoc_data.topics`),
never the evaluation corpus.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError, read_user_text
from lmforge.export.onnx import GraphOptions, build
from lmforge.export.weights import AwqScales, QuantOptions, WeightSource
from lmforge.progress import Progress
from lmforge.quant.awq import scale_groups, search_scale


def calibration_text(path: str | os.PathLike | None) -> str:
    """The calibration text: the file at `path` (UTF-8), or Python's documentation when None."""
    if path is None:
        import pydoc_data.topics

        return "\n\n".join(pydoc_data.topics.topics.values())
    return read_user_text(path, "calibration text", newline=None)


def _activations(ckpt, ids: list[int], n: int, window: int, sample_rows: int, bar, seed: int):
    """Run `n` windows of `ids` through the fp32 graph with taps. Returns ({tap: sum of |x| per
    input channel}, {tap: list of sampled rows (float16)})."""
    import onnx
    import onnxruntime as ort

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
        empty = {
            f"past_key_values.{i}.{kv}": np.zeros((1, spec.n_kv_heads, 0, spec.head_dim), np.float32)
            for i in range(spec.n_layers)
            for kv in ("key", "value")
        }
        for w in range(n):
            chunk = np.asarray([ids[w * window : (w + 1) * window]], dtype=np.int64)
            feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk), "logits_to_keep": np.array([1]), **empty}
            outs = sess.run(taps, feed)
            pick = rng.choice(window, per_window, replace=False)
            for t, a in zip(taps, outs):
                a = a[0]  # (window, K)
                sums[t] = sums[t] + np.abs(a).sum(axis=0)
                rows[t].append(a[pick].astype(np.float16))
            bar.update()
        del sess
    return sums, rows


def compute_awq_scales(
    ckpt,
    quant: QuantOptions,
    calibration: str | None = None,
    n_windows: int = 32,
    window: int = 256,
    sample_rows: int = 512,
    progress: bool = False,
    seed: int = 0,
) -> AwqScales:
    """AWQ scales for every linear group of `ckpt`, from calibration text through its fp32 graph.

    Args: the checkpoint; quantization the scales are searched for (bits, block size, symmetric);
    calibration text file (None: Python's documentation); number and length of token windows;
    activation rows sampled per group; progress bar; sampling seed. Returns the scales."""
    ids = ckpt.tokenizer().encode(calibration_text(calibration))
    n = min(n_windows, len(ids) // window)
    if n == 0:
        raise LmforgeError(
            f"calibration text gives {len(ids)} tokens, fewer than one window of {window}; "
            "give a longer --calibration file"
        )
    spec = ckpt.spec
    bar = Progress(n + spec.n_layers, progress, "AWQ")
    sums, rows = _activations(ckpt, ids, n, window, sample_rows, bar, seed)
    total = n * window
    src = WeightSource(ckpt)
    scales = AwqScales()
    for i in range(spec.n_layers):
        for group, before in scale_groups(spec, i):
            t = f"tap.{group}"
            parts = {"qkv": src.qkv_parts(i), "gate_up": src.gate_up_parts(i)}.get(group.split(".")[-1], [group])
            w = src.matrix(parts)
            x = np.concatenate(rows.pop(t)).astype(np.float32)
            s, _, _ = search_scale(w, x, sums.pop(t) / total, quant)
            scales.col[group] = s
            scales.row_div[before] = s
        bar.update()
    return scales
