"""ONNX graph builder: a decoder-only transformer as ONNX Runtime's fused contrib ops.

Per layer: SkipSimplifiedLayerNormalization joins the residual stream; one packed QKV MatMul
feeds GroupQueryAttention with rotary fused in (cos/sin caches from the spec) and the KV cache
as past/present inputs and outputs; a fused gate|up MatMul feeds the gated MLP.

Weights stream: the builder asks the checkpoint for one layer's tensors at a time and appends
each to the external-data file as soon as it is laid out, so memory holds about one layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lmforge.checkpoint.base import Checkpoint
from lmforge.checkpoint.spec import ModelSpec
from lmforge.errors import LmforgeError
from lmforge.export.rope import rope_tables

MS = "com.microsoft"
DATA_FILE = "model.onnx.data"
ALIGN = 4096  # page-aligned tensors let ONNX Runtime map external data instead of copying it
NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.uint8): TensorProto.UINT8}


@dataclass(frozen=True)
class GraphOptions:
    """dtype: "float32" or "float16" (weights, activations, I/O, KV cache).
    full_logits: logits for every position (evaluation, onnxruntime-genai); otherwise only
    the last valid position of each row, which spares prefill a prompt x vocabulary product."""

    dtype: str = "float32"
    full_logits: bool = False
    max_positions: int | None = None


class WeightFile:
    """Appends tensors to one external-data file and returns initializers that point into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = (-self.offset) % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(memoryview(array).cast("B"))  # no bytes copy of a large tensor
        length = array.nbytes
        t = TensorProto()
        t.name = name
        t.data_type = NP_TO_ONNX[array.dtype]
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.offset += length
        return t

    def close(self):
        self.file.close()


class Graph:
    """A small helper over onnx.helper: unique names, constants, external weights."""

    def __init__(self, weights: WeightFile, dtype: np.dtype):
        self.weights = weights
        self.dtype = np.dtype(dtype)
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str | None = None, **attrs):
        outs = [self.name(op) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_node"), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, name: str, array: np.ndarray, cast: bool = True) -> str:
        """An external initializer; float weights take the graph's dtype."""
        if cast and array.dtype.kind == "f":
            array = array.astype(self.dtype, copy=False)
        self.initializers.append(self.weights.add(name, array))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small inline constant."""
        name = self.name("const")
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _linear(g: Graph, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
    """x @ w.T (+ bias); w is (out, in) as in HF, stored transposed for MatMul."""
    y = g.node("MatMul", [x, g.weight(name, np.ascontiguousarray(w.T))])
    if bias is not None:
        y = g.node("Add", [y, g.weight(name + ".bias", bias)])
    return y


class _Layers:
    """Reads one layer's tensors from the checkpoint on demand, with the arch's layout folded in."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.names = {t.name for t in ckpt.infos}
        self.offset = np.float32(ckpt.spec.norm_offset)

    def get(self, name: str) -> np.ndarray | None:
        return self.ckpt.read(name).astype(np.float32, copy=False) if name in self.names else None

    def norm(self, name: str) -> np.ndarray:
        return self.get(name) + self.offset  # Gemma's RMSNorm scales by (1 + w)

    def qkv(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Packed (q; k; v) rows and biases."""
        fused = self.get(f"layers.{i}.qkv")
        if fused is not None:
            return fused, self.get(f"layers.{i}.qkv.bias")
        w = np.concatenate([self.get(f"layers.{i}.{p}") for p in "qkv"])
        biases = [self.get(f"layers.{i}.{p}.bias") for p in "qkv"]
        return w, (np.concatenate(biases) if biases[0] is not None else None)

    def gate_up(self, i: int) -> np.ndarray:
        fused = self.get(f"layers.{i}.gate_up")
        if fused is not None:
            return fused
        return np.concatenate([self.get(f"layers.{i}.gate"), self.get(f"layers.{i}.up")])


def window_size(spec: ModelSpec, i: int) -> int:
    """GroupQueryAttention's local_window_size for layer i: the model's sliding window (the same
    count transformers masks with, checked against it in the tests); -1 for global layers."""
    if spec.layer_types[i] == "sliding" and spec.sliding_window:
        return spec.sliding_window
    return -1


def build(ckpt: Checkpoint, folder: Path, options: GraphOptions, progress=None) -> onnx.ModelProto:
    """Write `folder/model.onnx.data` and return the graph (not yet saved)."""
    spec = ckpt.spec
    dtype = np.float16 if options.dtype == "float16" else np.float32
    onnx_dtype = NP_TO_ONNX[np.dtype(dtype)]
    weights = WeightFile(folder / DATA_FILE)
    g = Graph(weights, dtype)
    src = _Layers(ckpt)
    H, kv, hd = spec.hidden_size, spec.n_kv_heads, spec.head_dim
    if spec.rotary_dim % 16:
        raise LmforgeError(f"rotary dimension {spec.rotary_dim} is not a multiple of 16, which ONNX Runtime's "
                           "GroupQueryAttention requires; this model cannot be exported to ONNX")

    g.inputs += [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                 helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    mask_sum = g.node("ReduceSum", ["attention_mask", g.const([1])], keepdims=0)                    # (B,)
    seqlens_k = g.node("Cast", [g.node("Sub", [mask_sum, g.const(1)])], to=TensorProto.INT32)        # (B,)
    total_len = g.node("Cast", [g.node("Gather", [g.node("Shape", ["attention_mask"]), g.const(1)])],
                       to=TensorProto.INT32)                                                         # ()

    n_pos = options.max_positions or spec.context_length
    caches = {}
    for local in sorted({t == "sliding" and bool(spec.rope_local_theta) for t in spec.layer_types}):
        tables = rope_tables(spec, n_pos, local=local)
        names = {k: (g.weight(f"cos_cache{'_local' if local else ''}{'_' + k if k else ''}", c),
                     g.weight(f"sin_cache{'_local' if local else ''}{'_' + k if k else ''}", s))
                 for k, (c, s) in tables.items()}
        if "long" in names:  # Phi-3 longrope: long factors once the sequence passes the original context
            is_long = g.node("Greater", [total_len, g.const(spec.rope_scaling.original_context_length, np.int32)])
            names = {"": tuple(g.node("Where", [is_long, names["long"][j], names["short"][j]]) for j in range(2))}
        caches[local] = names[""]

    # embeddings (V, H)
    embed = g.weight("embed", src.get("embed"))
    x = g.node("Gather", [embed, "input_ids"])                                                       # (B, S, H)
    if spec.embedding_scale:
        x = g.node("Mul", [x, g.const(spec.embedding_scale, dtype)])
    eps = float(spec.norm_eps)
    h = g.node("SimplifiedLayerNormalization", [x, g.weight("layers.0.attn_norm", src.norm("layers.0.attn_norm"))],
               axis=-1, epsilon=eps, stash_type=1)
    residual = x
    scale = 1.0 / math.sqrt(spec.query_pre_attn_scalar) if spec.query_pre_attn_scalar else 1.0 / math.sqrt(hd)
    for i in range(spec.n_layers):
        p = f"layers.{i}"
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        for name in (past_k, past_v):
            g.inputs.append(helper.make_tensor_value_info(name, onnx_dtype, ["batch_size", kv, "past_sequence_length", hd]))
        w_qkv, b_qkv = src.qkv(i)                                                                    # (q+2kv)*hd, H
        qkv = _linear(g, h, w_qkv, f"{p}.qkv", b_qkv)
        cos, sin = caches[spec.layer_types[i] == "sliding" and bool(spec.rope_local_theta)]
        if spec.qk_norm:  # per-head RMSNorm on q and k before rotary: unpack, norm, hand over separately
            q, k, v = g.node("Split", [qkv, g.const([spec.n_heads * hd, kv * hd, kv * hd])], n_out=3, axis=-1)
            q, k = (g.node("Reshape", [g.node("SimplifiedLayerNormalization", [
                        g.node("Reshape", [t, g.const([0, 0, -1, hd])]), g.weight(f"{p}.{n}_norm", src.norm(f"{p}.{n}_norm"))],
                        axis=-1, epsilon=eps, stash_type=1), g.const([0, 0, -1])])
                    for t, n in ((q, "q"), (k, "k")))
            attn_in = [q, k, v]
        else:
            attn_in = [qkv, "", ""]
        attn, present_k, present_v = g.node(
            "GroupQueryAttention", attn_in + [past_k, past_v, seqlens_k, total_len, cos, sin], n_out=3, domain=MS,
            num_heads=spec.n_heads, kv_num_heads=kv, scale=scale, do_rotary=1, rotary_interleaved=0,
            local_window_size=window_size(spec, i))
        for out, name in ((present_k, f"present.{i}.key"), (present_v, f"present.{i}.value")):
            g.nodes.append(helper.make_node("Identity", [out], [name]))
            g.outputs.append(helper.make_tensor_value_info(name, onnx_dtype, ["batch_size", kv, "total_sequence_length", hd]))
        o = _linear(g, attn, src.get(f"{p}.o"), f"{p}.o", src.get(f"{p}.o.bias"))
        if spec.qk_norm:  # Gemma 3's sandwich norms
            o = g.node("SimplifiedLayerNormalization", [o, g.weight(f"{p}.post_attn_norm", src.norm(f"{p}.post_attn_norm"))],
                       axis=-1, epsilon=eps, stash_type=1)
        h, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                   [residual, o, g.weight(f"{p}.mlp_norm", src.norm(f"{p}.mlp_norm"))],
                                   n_out=4, domain=MS, epsilon=eps)
        gate, up = g.node("Split", [_linear(g, h, src.gate_up(i), f"{p}.gate_up"),
                                    g.const([spec.intermediate_size] * 2)], n_out=2, axis=-1)
        act = g.node("FastGelu", [gate], domain=MS) if spec.activation == "gelu_tanh" \
            else g.node("Mul", [gate, g.node("Sigmoid", [gate])])
        m = _linear(g, g.node("Mul", [act, up]), src.get(f"{p}.down"), f"{p}.down")
        if spec.qk_norm:
            m = g.node("SimplifiedLayerNormalization", [m, g.weight(f"{p}.post_mlp_norm", src.norm(f"{p}.post_mlp_norm"))],
                       axis=-1, epsilon=eps, stash_type=1)
        nxt = f"layers.{i + 1}.attn_norm" if i + 1 < spec.n_layers else "norm"
        h, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                   [residual, m, g.weight(nxt, src.norm(nxt))], n_out=4, domain=MS, epsilon=eps)
        if progress:
            progress(i + 1, spec.n_layers)

    if not options.full_logits:  # the last valid position of each (right-padded) row only
        seq_last = g.node("Sub", [g.node("Gather", [g.node("Shape", ["input_ids"]), g.const(1)]), g.const(1)])
        idx = g.node("Min", [g.node("Sub", [mask_sum, g.const(1)]), seq_last])                     # (B,)
        idx = g.node("Expand", [g.node("Reshape", [idx, g.const([-1, 1, 1])]),
                                g.node("Concat", [g.node("Shape", ["input_ids"], start=0, end=1), g.const([1, H])], axis=0)])
        h = g.node("GatherElements", [h, idx], axis=1)                                               # (B, 1, H)
    head = embed if spec.tied_embeddings else g.weight("lm_head", src.get("lm_head"))                # (V, H)
    logits = g.node("Gemm", [g.node("Reshape", [h, g.const([-1, H])]), head], transB=1)              # (B*S, V)
    out_shape = g.node("Concat", [g.node("Shape", ["input_ids"], start=0, end=1), g.const([-1, spec.vocab_size])], axis=0)
    g.nodes.append(helper.make_node("Reshape", [logits, out_shape], ["logits"]))                   # (B, S|1, V)
    g.outputs.insert(0, helper.make_tensor_value_info(
        "logits", onnx_dtype, ["batch_size", "sequence_length" if options.full_logits else 1, spec.vocab_size]))
    weights.close()

    graph = helper.make_graph(g.nodes, "lmforge", g.inputs, g.outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                              producer_name="lmforge")
    model.ir_version = 10
    return model
