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
from lmforge.export.weights import QuantOptions, WeightSource
from lmforge.quant.nbits import NBits

MS = "com.microsoft"
DATA_FILE = "model.onnx.data"
ALIGN = 4096  # page-aligned tensors let ONNX Runtime map external data instead of copying it
NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.uint8): TensorProto.UINT8}


@dataclass(frozen=True)
class GraphOptions:
    """dtype: "float32" or "float16" (weights, activations, I/O, KV cache); quant: None for
    float weights, else how linear layers become MatMulNBits; max_positions: rotary table length."""

    dtype: str = "float32"
    quant: QuantOptions | None = None
    max_positions: int | None = None
    taps: bool = False  # also output each linear group's input ("tap.layers.{i}.qkv", ...) for AWQ
    separate_rotary: bool = False  # DirectML: q/k/v projections apart, RotaryEmbedding with position_ids


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
        self.taps: dict[str, str] = {}  # linear group -> the tensor feeding it
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


def _skip_norm(g: Graph, residual: str, x: str, weight: str, eps: float) -> tuple[str, str]:
    """RMSNorm(residual + x) and the new residual, one SkipSimplifiedLayerNormalization; its mean
    and inverse-deviation outputs stay unnamed so the kernel does not write them."""
    h, _, _, res = g.node("SkipSimplifiedLayerNormalization", [residual, x, weight], n_out=4, domain=MS, epsilon=eps)
    g.nodes[-1].output[1] = g.nodes[-1].output[2] = ""
    return h, res


def _linear(g: Graph, x: str, w, name: str, bias: np.ndarray | None = None, accuracy_level: int = 0) -> str:
    """x @ W.T (+ bias) for W (out, in) as in HF: MatMul on W.T, or MatMulNBits on its codes."""
    if isinstance(w, NBits):
        y = _matmul_nbits(g, x, _nbits_weights(g, w, name), accuracy_level)
    else:
        y = g.node("MatMul", [x, g.weight(name, np.ascontiguousarray(w.T))])
    if bias is not None:
        y = g.node("Add", [y, g.weight(name + ".bias", bias)])
    return y


def _nbits_weights(g: Graph, w: NBits, name: str) -> tuple:
    """Write W's codes once; returns ("nbits", W, qweight, scales, zero points, offsets) names."""
    zp = w.packed_zero_points()
    return ("nbits", w, g.weight(name + ".qweight", w.packed_b()), g.weight(name + ".scales", w.scales),
            g.weight(name + ".zero_points", zp) if zp is not None else None,
            g.weight(name + ".offsets", np.ascontiguousarray(w.offsets.T)) if w.offsets is not None else None)


def _matmul_nbits(g: Graph, x: str, desc: tuple, accuracy_level: int) -> str:
    """MatMulNBits over written codes, plus each block's offset times that block's input sum."""
    _, w, qweight, scales, zp, offsets = desc
    y = g.node("MatMulNBits", [x, qweight, scales] + ([zp] if zp else []), domain=MS, K=w.K, N=w.N,
               bits=w.bits, block_size=w.block_size, accuracy_level=accuracy_level)
    if offsets:
        sums = g.node("ReduceSum", [g.node("Reshape", [x, g.const([0, 0, -1, w.block_size])]), g.const([-1])],
                      keepdims=0)                                                                      # (B, S, n_blocks)
        y = g.node("Add", [y, g.node("MatMul", [sums, offsets])])
    return y


def _qkv(g: Graph, h: str, src: WeightSource, i: int, options: GraphOptions, level: int) -> tuple[str, str, str]:
    """q, k, v for layer i: one packed projection (GroupQueryAttention unpacks it when k and v are
    empty), unpacked with Split when q/k need norms, or three projections for DirectML."""
    spec, p = src.spec, f"layers.{i}"
    if options.separate_rotary and not src.qkv_parts(i) == [f"{p}.qkv"]:
        return tuple(_linear(g, h, src.matrix([f"{p}.{t}"], f"{p}.qkv"), f"{p}.{t}", src.get(f"{p}.{t}.bias"), level)
                     for t in "qkv")
    qkv = _linear(g, h, src.matrix(src.qkv_parts(i), f"{p}.qkv"), f"{p}.qkv", src.qkv_bias(i), level)
    if spec.qk_norm or options.separate_rotary:
        sizes = [spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim]
        return tuple(g.node("Split", [qkv, g.const(sizes)], n_out=3, axis=-1))
    return qkv, "", ""


def window_size(spec: ModelSpec, i: int) -> int:
    """GroupQueryAttention's local_window_size for layer i: the model's sliding window (the same
    count transformers masks with, checked against it in the tests); -1 for global layers."""
    if spec.layer_types[i] == "sliding" and spec.sliding_window:
        return spec.sliding_window
    return -1


def _embedding(g: Graph, src: WeightSource, options: GraphOptions):
    """The embedded tokens (B, S, H) and the output head: written now when the embedding shares
    it, else a function that writes it once after the layers (holding nothing meanwhile).
    When quantizing, an untied embedding table is stored quantized too (head_bits).

    A tied, quantized embedding is stored once: GatherBlockQuantized reads the head's
    MatMulNBits codes through a Reshape (integer zero points, no block offsets, and whole blocks
    per row; otherwise the input side gets a float table)."""
    spec, quant = src.spec, options.quant
    if spec.tied_embeddings:
        head = src.matrix(["embed"]) if quant and quant.share_tied else src.get("embed")
    else:
        head = src.matrix(["embed"]) if quant else src.get("embed")  # the input table alone
    if isinstance(head, NBits) and head.zp_kind != "float" and head.offsets is None and head.K % head.block_size == 0:
        name = "lm_head" if spec.tied_embeddings else "embed"
        desc = _nbits_weights(g, head, name)
        _, w, qweight, scales, zp, _ = desc
        table = g.node("Reshape", [qweight, g.const([w.N, -1])])                                     # (V, H*bits/8)
        x = g.node("GatherBlockQuantized", [table, "input_ids", scales] + ([zp] if zp else []), domain=MS,
                   bits=w.bits, block_size=w.block_size, quantize_axis=1, gather_axis=0)
    else:
        desc = None
        table = g.weight("embed", head.dequantize() if isinstance(head, NBits) else head)
        x = g.node("Gather", [table, "input_ids"])
    if not spec.tied_embeddings:

        def untied():
            w = src.matrix(["lm_head"])
            return _nbits_weights(g, w, "lm_head") if isinstance(w, NBits) else ("float", g.weight("lm_head", w))

        return x, untied
    if desc is not None:
        return x, lambda: desc
    if isinstance(head, NBits):
        return x, lambda: _nbits_weights(g, head, "lm_head")
    return x, lambda: ("float", table)


def _head(g: Graph, h: str, desc: tuple, spec: ModelSpec, accuracy_level: int) -> str:
    """Logits (B, S, V) from hidden states (B, S, H)."""
    if desc[0] == "nbits":
        return _matmul_nbits(g, h, desc, accuracy_level)
    flat = g.node("Gemm", [g.node("Reshape", [h, g.const([-1, spec.hidden_size])]), desc[1]], transB=1)
    shape = g.node("Concat", [g.node("Shape", [h], start=0, end=2), g.const([spec.vocab_size])], axis=0)
    return g.node("Reshape", [flat, shape])


def build(ckpt: Checkpoint, folder: Path, options: GraphOptions, src: WeightSource | None = None,
          progress=None) -> dict[str, onnx.ModelProto]:
    """Write `folder/model.onnx.data`; return {"last": graph with last-position logits,
    "full": graph with every position's logits}, both over the same weights."""
    spec = ckpt.spec
    dtype = np.float16 if options.dtype == "float16" else np.float32
    if spec.rotary_dim % 16:
        raise LmforgeError(f"rotary dimension {spec.rotary_dim} is not a multiple of 16, which ONNX Runtime's "
                           "GroupQueryAttention requires; this model cannot be exported to ONNX")
    weights = WeightFile(folder / DATA_FILE)
    try:
        return _build(ckpt, options, src or WeightSource(ckpt, options.quant), Graph(weights, dtype), progress)
    finally:
        weights.close()


def _build(ckpt: Checkpoint, options: GraphOptions, src: WeightSource, g: Graph, progress) -> dict[str, onnx.ModelProto]:
    spec = ckpt.spec
    dtype = g.dtype.type
    onnx_dtype = NP_TO_ONNX[g.dtype]
    level = options.quant.accuracy_level if options.quant else 0
    H, kv, hd = spec.hidden_size, spec.n_kv_heads, spec.head_dim

    g.inputs += [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                 helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    if options.separate_rotary:
        g.inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
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

    x, head = _embedding(g, src, options)                                                          # (B, S, H)
    if spec.embedding_scale:
        x = g.node("Mul", [x, g.const(spec.embedding_scale, dtype)])
    eps = float(spec.norm_eps)
    h = g.node("RMSNormalization", [x, g.weight("layers.0.attn_norm", src.norm("layers.0.attn_norm"))],
               axis=-1, epsilon=eps, stash_type=1)
    residual = x
    scale = 1.0 / math.sqrt(spec.query_pre_attn_scalar) if spec.query_pre_attn_scalar else 1.0 / math.sqrt(hd)
    for i in range(spec.n_layers):
        p = f"layers.{i}"
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        for name in (past_k, past_v):
            g.inputs.append(helper.make_tensor_value_info(name, onnx_dtype, ["batch_size", kv, "past_sequence_length", hd]))
        g.taps[f"{p}.qkv"] = h
        cos, sin = caches[spec.layer_types[i] == "sliding" and bool(spec.rope_local_theta)]
        q, k, v = _qkv(g, h, src, i, options, level)
        if spec.qk_norm:  # per-head RMSNorm on q and k before rotary
            q, k = (g.node("Reshape", [g.node("RMSNormalization", [
                        g.node("Reshape", [t, g.const([0, 0, -1, hd])]), g.weight(f"{p}.{n}_norm", src.norm(f"{p}.{n}_norm"))],
                        axis=-1, epsilon=eps, stash_type=1), g.const([0, 0, -1])])
                    for t, n in ((q, "q"), (k, "k")))
        if options.separate_rotary:  # DirectML's form: RotaryEmbedding nodes fed by position_ids
            rot = {"rotary_embedding_dim": spec.rotary_dim} if spec.rotary_dim != hd else {}
            q, k = (g.node("RotaryEmbedding", [t, "position_ids", cos, sin], domain=MS, interleaved=0,
                           num_heads=n, **rot) for t, n in ((q, spec.n_heads), (k, kv)))
        rotary = {} if options.separate_rotary else {"do_rotary": 1, "rotary_interleaved": 0}
        attn, present_k, present_v = g.node(
            "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total_len] + ([] if options.separate_rotary else [cos, sin]),
            n_out=3, domain=MS, num_heads=spec.n_heads, kv_num_heads=kv, scale=scale,
            local_window_size=window_size(spec, i), **rotary)
        for out, name in ((present_k, f"present.{i}.key"), (present_v, f"present.{i}.value")):
            g.nodes.append(helper.make_node("Identity", [out], [name]))
            g.outputs.append(helper.make_tensor_value_info(name, onnx_dtype, ["batch_size", kv, "total_sequence_length", hd]))
        g.taps[f"{p}.o"] = attn
        o = _linear(g, attn, src.matrix([f"{p}.o"], f"{p}.o"), f"{p}.o", src.get(f"{p}.o.bias"), level)
        if spec.post_norms:  # Gemma 3's sandwich norms
            o = g.node("RMSNormalization", [o, g.weight(f"{p}.post_attn_norm", src.norm(f"{p}.post_attn_norm"))],
                       axis=-1, epsilon=eps, stash_type=1)
        h, residual = _skip_norm(g, residual, o, g.weight(f"{p}.mlp_norm", src.norm(f"{p}.mlp_norm")), eps)
        g.taps[f"{p}.gate_up"] = h
        gate_up = _linear(g, h, src.matrix(src.gate_up_parts(i), f"{p}.gate_up"), f"{p}.gate_up", None, level)
        gate, up = g.node("Split", [gate_up, g.const([spec.intermediate_size] * 2)], n_out=2, axis=-1)
        act = g.node("FastGelu", [gate], domain=MS) if spec.activation == "gelu_tanh" \
            else g.node("Mul", [gate, g.node("Sigmoid", [gate])])
        g.taps[f"{p}.down"] = g.node("Mul", [act, up])
        m = _linear(g, g.taps[f"{p}.down"], src.matrix([f"{p}.down"], f"{p}.down"), f"{p}.down", None, level)
        if spec.post_norms:
            m = g.node("RMSNormalization", [m, g.weight(f"{p}.post_mlp_norm", src.norm(f"{p}.post_mlp_norm"))],
                       axis=-1, epsilon=eps, stash_type=1)
        nxt = f"layers.{i + 1}.attn_norm" if i + 1 < spec.n_layers else "norm"
        h, residual = _skip_norm(g, residual, m, g.weight(nxt, src.norm(nxt)), eps)
        if progress:
            progress(i + 1, spec.n_layers)
    head = head()  # write the output head's weights once; both graph variants read them
    taps = []
    for name, tensor in (g.taps.items() if options.taps else ()):
        g.nodes.append(helper.make_node("Identity", [tensor], [f"tap.{name}"]))
        taps.append(helper.make_tensor_value_info(f"tap.{name}", onnx_dtype, None))
    common_nodes, common_inits = list(g.nodes), list(g.initializers)
    graphs = {}
    for variant in ("full", "last"):
        g.nodes, g.initializers = list(common_nodes), list(common_inits)
        hv = h
        if variant == "last":  # the last valid position of each (right-padded) row only
            seq_last = g.node("Sub", [g.node("Gather", [g.node("Shape", ["input_ids"]), g.const(1)]), g.const(1)])
            idx = g.node("Min", [g.node("Sub", [mask_sum, g.const(1)]), seq_last])                  # (B,)
            idx = g.node("Expand", [g.node("Reshape", [idx, g.const([-1, 1, 1])]),
                                    g.node("Concat", [g.node("Shape", ["input_ids"], start=0, end=1), g.const([1, H])], axis=0)])
            hv = g.node("GatherElements", [h, idx], axis=1)                                           # (B, 1, H)
        logits = _head(g, hv, head, spec, level)
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        out = helper.make_tensor_value_info("logits", onnx_dtype,
                                            ["batch_size", "sequence_length" if variant == "full" else 1, spec.vocab_size])
        graph = helper.make_graph(g.nodes, "lmforge", g.inputs, [out] + g.outputs + taps, g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)],
                                  producer_name="lmforge")
        model.ir_version = 11  # opset 23: RMSNormalization
        graphs[variant] = model
    return graphs
