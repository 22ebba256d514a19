"""ONNX graph builder: a decoder-only transformer as ONNX Runtime's fused contrib ops.

Per layer: SkipSimplifiedLayerNormalization joins the residual stream; one packed QKV MatMul
feeds GroupQueryAttention with rotary fused in (cos/sin caches from the spec) and the KV cache
as past/present inputs and outputs; a fused gate|up MatMul feeds the gated MLP.

Weights stream: the builder asks the checkpoint for one layer's tensors at a time and appends
each to the external-data file as soon as it is laid out, so memory holds about one layer.

Read top-down: the weights as the graph refers to them, the ops a layer is made of, the graph's
inputs and outputs, the rotary tables, one decoder layer, the embedding and head, then `build`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lmforge.checkpoint.base import Checkpoint
from lmforge.errors import LmforgeError
from lmforge.export.folder import LOGITS_TO_KEEP
from lmforge.export.rope import rope_tables
from lmforge.export.weights import QuantOptions, WeightSource, head_block
from lmforge.quant.nbits import NBits, rtn
from lmforge.spec import ModelSpec, check_rope_tables

log = logging.getLogger(__name__)

MS = "com.microsoft"
DATA_FILE = "model.onnx.data"
ALIGN = 4096  # page-aligned tensors let ONNX Runtime map external data instead of copying it
NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
}


@dataclass(frozen=True)
class GraphOptions:
    """dtype: "float32" or "float16" (weights, activations, I/O, KV cache); quant: None for
    float weights, else how linear layers become MatMulNBits; max_positions: rotary table length."""

    dtype: str = "float32"
    quant: QuantOptions | None = None
    max_positions: int | None = None
    taps: bool = False  # also output each linear group's input ("tap.layers.{i}.qkv", ...) for AWQ
    separate_rotary: bool = False  # DirectML: q/k/v projections apart, RotaryEmbedding with position_ids

    @property
    def accuracy_level(self) -> int:
        """MatMulNBits' accuracy_level (0 for float weights, which have no MatMulNBits)."""
        return self.quant.accuracy_level if self.quant else 0


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


# ---- weights as the graph reads them --------------------------------------------------------


@dataclass(frozen=True)
class DenseWeight:
    """A float matrix W (N, K), as in HF, stored as the initializer `name`."""

    name: str


@dataclass(frozen=True)
class NBitsWeight:
    """A matrix W (N, K) stored as MatMulNBits' initializers: its packed codes
    (N, n_blocks, block_size * bits / 8), scales (N, n_blocks), packed zero points (None: the
    implicit 2^(bits-1)) and per-block offsets (n_blocks, N) (None unless the source has them)."""

    qweight: str
    scales: str
    zero_points: str | None
    offsets: str | None
    bits: int
    block_size: int
    K: int
    N: int


HeadWeight = DenseWeight | NBitsWeight  # the output head is stored either way


def _nbits_weights(g: Graph, w: NBits, name: str) -> NBitsWeight:
    """Write W's codes once, as the initializers `name`.qweight, .scales, .zero_points, .offsets."""
    zp = w.packed_zero_points()
    return NBitsWeight(
        qweight=g.weight(name + ".qweight", w.packed_b()),
        scales=g.weight(name + ".scales", w.scales),
        zero_points=g.weight(name + ".zero_points", zp) if zp is not None else None,
        offsets=g.weight(name + ".offsets", np.ascontiguousarray(w.offsets.T)) if w.offsets is not None else None,
        bits=w.bits,
        block_size=w.block_size,
        K=w.K,
        N=w.N,
    )


def _write_head(g: Graph, w: np.ndarray | NBits) -> HeadWeight:
    """The output head W (V, H) written as `lm_head`."""
    return _nbits_weights(g, w, "lm_head") if isinstance(w, NBits) else DenseWeight(g.weight("lm_head", w))


def _norm_weight(g: Graph, src: WeightSource, name: str) -> str:
    """The RMSNorm weight `name` (H,), with the architecture's offset folded in by the source."""
    return g.weight(name, src.norm(name))


# ---- the ops a layer is made of -------------------------------------------------------------


def _skip_norm(g: Graph, src: WeightSource, residual: str, x: str, name: str) -> tuple[str, str]:
    """Norm(residual + x) with the norm `name` and the new residual, one fused op:
    SkipSimplifiedLayerNormalization (RMSNorm), or SkipLayerNormalization with the bias for a
    LayerNorm model (Phi-3.5-MoE); the mean and inverse-deviation outputs stay unnamed so the
    kernel does not write them."""
    op = "SkipLayerNormalization" if src.spec.layer_norm else "SkipSimplifiedLayerNormalization"
    eps = float(src.spec.norm_eps)
    h, _, _, res = g.node(op, [residual, x, *_norm_inputs(g, src, name)], n_out=4, domain=MS, epsilon=eps)
    g.nodes[-1].output[1] = g.nodes[-1].output[2] = ""
    return h, res


def _norm_inputs(g: Graph, src: WeightSource, name: str) -> list[str]:
    """The norm `name`'s weight, and its bias when a LayerNorm model stores one."""
    bias = src.norm_bias(name) if src.spec.layer_norm else None
    return [_norm_weight(g, src, name)] + ([g.weight(name + ".bias", bias)] if bias is not None else [])


def _pre_norm(g: Graph, src: WeightSource, x: str, name: str) -> str:
    """The first layer's input norm: RMSNorm, or LayerNorm (with its bias) for a LayerNorm model."""
    if not src.spec.layer_norm:
        return _rms_norm(g, src, x, name)
    return g.node("LayerNormalization", [x, *_norm_inputs(g, src, name)], axis=-1, epsilon=float(src.spec.norm_eps))


def _rms_norm(g: Graph, src: WeightSource, x: str, name: str) -> str:
    """RMSNorm of x over its last axis with the norm weight `name`."""
    return g.node(
        "RMSNormalization", [x, _norm_weight(g, src, name)], axis=-1, epsilon=float(src.spec.norm_eps), stash_type=1
    )


def _linear(g: Graph, x: str, w, name: str, bias: np.ndarray | None = None, accuracy_level: int = 0) -> str:
    """x @ W.T (+ bias) for W (out, in) as in HF: MatMul on W.T, or MatMulNBits on its codes (one
    per stacked part, concatenated, when W is a list of NBits of different layouts)."""
    if isinstance(w, list):
        ys = [_matmul_nbits(g, x, _nbits_weights(g, part, f"{name}.{j}"), accuracy_level) for j, part in enumerate(w)]
        y = g.node("Concat", ys, axis=-1)
    elif isinstance(w, NBits):
        y = _matmul_nbits(g, x, _nbits_weights(g, w, name), accuracy_level)
    else:
        y = g.node("MatMul", [x, g.weight(name, np.ascontiguousarray(w.T))])
    if bias is not None:
        y = g.node("Add", [y, g.weight(name + ".bias", bias)])
    return y


def _matmul_nbits(g: Graph, x: str, w: NBitsWeight, accuracy_level: int) -> str:
    """MatMulNBits over written codes, plus each block's offset times that block's input sum."""
    y = g.node(
        "MatMulNBits",
        [x, w.qweight, w.scales] + ([w.zero_points] if w.zero_points else []),
        domain=MS,
        K=w.K,
        N=w.N,
        bits=w.bits,
        block_size=w.block_size,
        accuracy_level=accuracy_level,
    )
    if w.offsets:
        sums = g.node(
            "ReduceSum", [g.node("Reshape", [x, g.const([0, 0, -1, w.block_size])]), g.const([-1])], keepdims=0
        )  # (B, S, n_blocks)
        y = g.node("Add", [y, g.node("MatMul", [sums, w.offsets])])
    return y


# spec.activation -> the nodes computing it on x
ACTIVATIONS = {
    "silu": lambda g, x: g.node("Mul", [x, g.node("Sigmoid", [x])]),
    "gelu_tanh": lambda g, x: g.node("FastGelu", [x], domain=MS),
}


# ---- graph inputs and outputs ---------------------------------------------------------------


def _past(i: int) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def _present(i: int) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


def _declare_io(g: Graph, spec: ModelSpec, options: GraphOptions) -> None:
    """The graph inputs (token ids, attention mask, DirectML's position ids, each layer's past KV
    cache) and each layer's present KV cache output, named as onnxruntime-genai expects them."""
    info, onnx_dtype, kv, hd = helper.make_tensor_value_info, NP_TO_ONNX[g.dtype], spec.n_kv_heads, spec.head_dim
    g.inputs += [
        info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    if options.separate_rotary:
        g.inputs.append(info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    for i in range(spec.n_layers):
        g.inputs += [info(name, onnx_dtype, ["batch_size", kv, "past_sequence_length", hd]) for name in _past(i)]
    for i in range(spec.n_layers):
        g.outputs += [info(name, onnx_dtype, ["batch_size", kv, "total_sequence_length", hd]) for name in _present(i)]


@dataclass(frozen=True)
class _Lengths:
    """What attention_mask says about the batch, computed once per graph."""

    mask_sum: str  # (B,) int64: each row's valid positions, past and new (rows are right-padded)
    seqlens_k: str  # (B,) int32: the same less one, as GroupQueryAttention takes it
    total_len: str  # () int32: past plus new positions


def _lengths(g: Graph) -> _Lengths:
    """The lengths GroupQueryAttention and the last-position gather read, from attention_mask."""
    mask_sum = g.node("ReduceSum", ["attention_mask", g.const([1])], keepdims=0)
    seqlens_k = g.node("Cast", [g.node("Sub", [mask_sum, g.const(1)])], to=TensorProto.INT32)
    total_len = g.node(
        "Cast", [g.node("Gather", [g.node("Shape", ["attention_mask"]), g.const(1)])], to=TensorProto.INT32
    )
    return _Lengths(mask_sum, seqlens_k, total_len)


# ---- rotary tables --------------------------------------------------------------------------


def _local_rope(spec: ModelSpec, i: int) -> bool:
    """Whether layer i rotates with the sliding layers' own base (Gemma 3) instead of the global one."""
    return spec.layer_types[i] == "sliding" and bool(spec.rope_local_theta)


def _rotary_caches(g: Graph, spec: ModelSpec, options: GraphOptions, total_len: str) -> dict[bool, tuple[str, str]]:
    """{_local_rope: (cos, sin)} caches, each (max_positions, rotary_dim / 2), for the layer kinds present."""
    n_pos = options.max_positions or spec.context_length
    check_rope_tables(spec, n_pos)
    caches = {}
    for local in sorted({_local_rope(spec, i) for i in range(spec.n_layers)}):
        tables = rope_tables(spec, n_pos, local=local)
        names = {
            k: (
                g.weight(f"cos_cache{'_local' if local else ''}{'_' + k if k else ''}", c),
                g.weight(f"sin_cache{'_local' if local else ''}{'_' + k if k else ''}", s),
            )
            for k, (c, s) in tables.items()
        }
        if "long" in names:  # Phi-3 longrope: long factors once the sequence passes the original context
            is_long = g.node("Greater", [total_len, g.const(spec.rope_scaling.original_context_length, np.int32)])
            names = {"": tuple(g.node("Where", [is_long, names["long"][j], names["short"][j]]) for j in range(2))}
        caches[local] = names[""]
    return caches


# ---- one decoder layer ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Shared:
    """Tensors computed once per graph that every layer's attention reads."""

    lengths: _Lengths
    rotary: dict[bool, tuple[str, str]]  # from _rotary_caches


def _qkv(g: Graph, h: str, src: WeightSource, i: int, options: GraphOptions) -> tuple[str, str, str]:
    """q, k, v for layer i: one packed projection (GroupQueryAttention unpacks it when k and v are
    empty), unpacked with Split when q/k need norms, or three projections for DirectML."""
    spec, p, level = src.spec, f"layers.{i}", options.accuracy_level
    if options.separate_rotary and not src.qkv_parts(i) == [f"{p}.qkv"]:
        return tuple(
            _linear(g, h, src.matrix([f"{p}.{t}"], f"{p}.qkv"), f"{p}.{t}", src.get(f"{p}.{t}.bias"), level)
            for t in "qkv"
        )
    qkv = _linear(g, h, src.matrix(src.qkv_parts(i), f"{p}.qkv"), f"{p}.qkv", src.qkv_bias(i), level)
    if spec.qk_norm or options.separate_rotary:
        sizes = [spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim]
        return tuple(g.node("Split", [qkv, g.const(sizes)], n_out=3, axis=-1))
    return qkv, "", ""


def _qk_norm(g: Graph, src: WeightSource, x: str, name: str) -> str:
    """RMSNorm of q or k (B, S, heads * head_dim) with the norm weight `name`: over each head when
    the weight is (head_dim,) (Qwen3, Gemma 3), over the whole projection when it spans it (OLMo 2)."""
    if src.shape(name)[0] != src.spec.head_dim:
        return _rms_norm(g, src, x, name)
    heads = g.node("Reshape", [x, g.const([0, 0, -1, src.spec.head_dim])])  # (B, S, n_heads, head_dim)
    return g.node("Reshape", [_rms_norm(g, src, heads, name), g.const([0, 0, -1])])


def window_size(spec: ModelSpec, i: int) -> int:
    """GroupQueryAttention's local_window_size for layer i: the model's sliding window (the same
    count transformers masks with, checked against it in the tests); -1 for global layers."""
    if spec.layer_types[i] == "sliding" and spec.sliding_window:
        return spec.sliding_window
    return -1


def attention_scale(spec: ModelSpec) -> float:
    """The softmax scale: the model's own (Granite), else 1/sqrt of query_pre_attn_scalar or head_dim."""
    return spec.attention_scale or 1.0 / math.sqrt(spec.query_pre_attn_scalar or spec.head_dim)


def _attention(g: Graph, src: WeightSource, options: GraphOptions, i: int, h: str, shared: _Shared) -> str:
    """Self-attention of layer i over its normed input h (B, S, H), reading and extending the KV
    cache; returns the o projection's output (B, S, H)."""
    spec, p, level = src.spec, f"layers.{i}", options.accuracy_level
    g.taps[f"{p}.qkv"] = h
    cos, sin = shared.rotary[_local_rope(spec, i)]
    q, k, v = _qkv(g, h, src, i, options)
    if spec.qk_norm:  # RMSNorm on q and k before rotary
        q, k = (_qk_norm(g, src, t, f"{p}.{n}_norm") for t, n in ((q, "q"), (k, "k")))
    if i in spec.nope_layers:  # SmolLM3: this layer attends without rotary
        fused_rotary, caches = {"do_rotary": 0}, []
    elif options.separate_rotary:  # DirectML's form: RotaryEmbedding nodes fed by position_ids
        rot = {"rotary_embedding_dim": spec.rotary_dim} if spec.rotary_dim != spec.head_dim else {}
        q, k = (
            g.node("RotaryEmbedding", [t, "position_ids", cos, sin], domain=MS, interleaved=0, num_heads=n, **rot)
            for t, n in ((q, spec.n_heads), (k, spec.n_kv_heads))
        )
        fused_rotary, caches = {}, []
    else:
        fused_rotary, caches = {"do_rotary": 1, "rotary_interleaved": 0}, [cos, sin]
    attn, present_k, present_v = g.node(
        "GroupQueryAttention",
        [q, k, v, *_past(i), shared.lengths.seqlens_k, shared.lengths.total_len] + caches,
        n_out=3,
        domain=MS,
        num_heads=spec.n_heads,
        kv_num_heads=spec.n_kv_heads,
        scale=attention_scale(spec),
        local_window_size=window_size(spec, i),
        **fused_rotary,
        **({"softcap": float(spec.attn_softcap)} if spec.attn_softcap else {}),
    )
    for out, name in zip((present_k, present_v), _present(i)):
        g.nodes.append(helper.make_node("Identity", [out], [name]))
    g.taps[f"{p}.o"] = attn
    return _linear(g, attn, src.matrix([f"{p}.o"], f"{p}.o"), f"{p}.o", src.get(f"{p}.o.bias"), level)


def _expert_codes(g: Graph, name: str, w: np.ndarray, bits: int, block: int) -> list[str]:
    """Stacked expert weights w (E, N, K) as QMoE reads them: packed symmetric codes (E, N, K *
    bits / 8) and scales (E, N, K / block)."""
    coded = [rtn(w[e], bits, block, symmetric=True) for e in range(w.shape[0])]
    packed = np.stack([c.packed_b().reshape(c.N, -1) for c in coded])
    return [g.weight(name + ".qweight", packed), g.weight(name + ".scales", np.stack([c.scales for c in coded]))]


def _moe(g: Graph, src: WeightSource, options: GraphOptions, i: int, h: str) -> str:
    """The mixture-of-experts MLP of layer i over h (B, S, H): router logits, then ONNX Runtime's
    MoE op (softmax, top n_experts_used renormalized, SwiGLU experts), or QMoE over symmetric
    int4/int8 expert codes when quantizing; returns (B, S, H)."""
    spec, p, quant = src.spec, f"layers.{i}", options.quant
    flat = g.node("Reshape", [h, g.const([-1, spec.hidden_size])])  # (B*S, H)
    logits = _linear(g, flat, src.get(f"{p}.router"), f"{p}.router")  # (B*S, n_experts)
    scale = None
    if spec.moe_router == "sparsemixer":
        logits, scale = _sparsemixer(g, logits, spec)
    gate, up, down = (src.get(f"{p}.{n}_exps") for n in ("gate", "up", "down"))  # (E, I, H) (E, I, H) (E, H, I)
    fc1 = np.stack([gate, up], axis=2).reshape(gate.shape[0], -1, gate.shape[2])  # rows interleaved: (E, 2I, H)
    renormalize = spec.moe_renormalize and scale is None
    attrs = dict(domain=MS, k=spec.n_experts_used, normalize_routing_weights=int(renormalize))
    attrs["activation_type"] = "swiglu"
    attrs["swiglu_fusion"] = 1  # the CPU provider's only SwiGLU layout
    # one block size for both: the preset's, or the largest power of two >= 16 dividing both widths
    widths = math.gcd(fc1.shape[2], down.shape[2])
    block = head_block(quant.block_size, widths) if quant else 0
    if quant and quant.symmetric and widths % block == 0:
        codes = [
            _expert_codes(g, f"{p}.{n}", w, quant.bits, block) for n, w in (("fc1_exps", fc1), ("down_exps", down))
        ]
        y = g.node(
            "QMoE",
            [flat, logits, *codes[0], "", *codes[1], ""],
            expert_weight_bits=quant.bits,
            block_size=block,
            **attrs,
        )
    else:
        if quant and i == 0:  # once per model: the experts are most of its weights
            why = "asymmetric codes" if not quant.symmetric else f"block size {block} (expert widths {widths})"
            log.warning(
                f"the {spec.n_experts} experts of each layer stay {g.dtype} weights: ONNX Runtime's QMoE takes "
                f"symmetric codes in blocks dividing both expert widths, not {why}; other weights are "
                f"int{quant.bits}"
            )
        fc1_name, fc2_name = g.weight(f"{p}.fc1_exps", fc1), g.weight(f"{p}.down_exps", down)
        y = g.node("MoE", [flat, logits, fc1_name, "", fc2_name], **attrs)
    if scale:
        y = g.node("Mul", [y, scale])
    return g.node("Reshape", [y, g.node("Shape", [h])])


def _sparsemixer(g: Graph, scores: str, spec: ModelSpec) -> tuple[str, str]:
    """Phi-3.5-MoE's router at inference over router logits `scores` (T, E), in exact ops, as the
    MoE op's input: the best expert, weighted by the softmax of the logits with those more than
    2 x jitter (relative to max(|logit|, best)) below the best masked out; then the best of the
    rest, weighted the same way with the first also masked. MoE takes router logits and applies
    its own softmax over them: it is given log(w1), log(w2) and the lowest float elsewhere, which
    it turns into w1 / (w1 + w2) and w2 / (w1 + w2) on the same two experts; the returned scale
    (w1 + w2, (T, 1)) multiplied into its output restores w1 and w2."""
    dt = g.dtype.type
    ninf, eps2 = g.const(-np.inf, dt), g.const(2 * spec.router_jitter, dt)
    experts = g.const(np.arange(spec.n_experts))
    magnitude = g.node("Abs", [scores])

    def pick(masked: str) -> tuple[str, str]:
        top = g.node("ReduceMax", [masked, g.const([-1])], keepdims=1)  # (T, 1)
        chosen = g.node("Equal", [experts, g.node("ArgMax", [masked], axis=-1, keepdims=1)])  # (T, E)
        far = g.node("Greater", [g.node("Div", [g.node("Sub", [top, scores]), g.node("Max", [magnitude, top])]), eps2])
        probs = g.node("Softmax", [g.node("Where", [far, ninf, masked])], axis=-1)
        weight = g.node("ReduceSum", [g.node("Where", [chosen, probs, g.const(0.0, dt)]), g.const([-1])], keepdims=1)
        return chosen, weight

    first, w1 = pick(scores)
    second, w2 = pick(g.node("Where", [first, ninf, scores]))
    weights = g.node("Where", [first, w1, g.node("Where", [second, w2, g.const(1.0, dt)])])
    router = g.node("Where", [g.node("Or", [first, second]), g.node("Log", [weights]), g.const(np.finfo(dt).min, dt)])
    return router, g.node("Add", [w1, w2])


def _mlp(g: Graph, src: WeightSource, options: GraphOptions, i: int, h: str) -> str:
    """The gated MLP of layer i over its normed input h (B, S, H): down(act(gate) * up), with
    gate|up one fused projection; returns (B, S, H)."""
    spec, p, level = src.spec, f"layers.{i}", options.accuracy_level
    if spec.n_experts:
        return _moe(g, src, options, i, h)
    g.taps[f"{p}.gate_up"] = h
    gate_up = _linear(g, h, src.matrix(src.gate_up_parts(i), f"{p}.gate_up"), f"{p}.gate_up", None, level)
    gate, up = g.node("Split", [gate_up, g.const([spec.intermediate_size] * 2)], n_out=2, axis=-1)
    g.taps[f"{p}.down"] = g.node("Mul", [ACTIVATIONS[spec.activation](g, gate), up])
    return _linear(g, g.taps[f"{p}.down"], src.matrix([f"{p}.down"], f"{p}.down"), f"{p}.down", None, level)


def _residual_add(g: Graph, src: WeightSource, residual: str, x: str, norm: str) -> tuple[str, str]:
    """residual + x (x scaled first when the model scales it, Granite) and the next sublayer's
    input: RMSNorm of the sum with the weight `norm`, one fused op, or the sum itself for a
    model without pre-norms (OLMo 2), whose final norm still applies. Returns (input, residual)."""
    spec = src.spec
    if spec.residual_scale:
        x = g.node("Mul", [x, g.const(spec.residual_scale, g.dtype.type)])
    if spec.pre_norms or norm == "norm":
        return _skip_norm(g, src, residual, x, norm)
    total = g.node("Add", [residual, x])
    return total, total


def _layer(
    g: Graph, src: WeightSource, options: GraphOptions, i: int, h: str, residual: str, shared: _Shared
) -> tuple[str, str]:
    """Decoder layer i from its normed input h and the residual stream (both (B, S, H)); returns
    the next layer's normed input (after the last layer: the final norm's output) and residual."""
    spec, p = src.spec, f"layers.{i}"
    o = _attention(g, src, options, i, h, shared)
    if spec.post_norms:  # Gemma's sandwich norms, OLMo 2's post-norms
        o = _rms_norm(g, src, o, f"{p}.post_attn_norm")
    h, residual = _residual_add(g, src, residual, o, f"{p}.mlp_norm")
    m = _mlp(g, src, options, i, h)
    if spec.post_norms:
        m = _rms_norm(g, src, m, f"{p}.post_mlp_norm")
    following = f"layers.{i + 1}.attn_norm" if i + 1 < spec.n_layers else "norm"
    return _residual_add(g, src, residual, m, following)


# ---- embedding and head ---------------------------------------------------------------------


def _gatherable(w: NBits) -> bool:
    """GatherBlockQuantized reads these codes: integer zero points, whole blocks per row (per-block
    offsets are gathered beside them)."""
    return w.zp_kind != "float" and w.K % w.block_size == 0


def _gather_quantized(g: Graph, codes: NBitsWeight) -> str:
    """Rows `input_ids` of the table stored as `codes` (V, H): GatherBlockQuantized over the
    MatMulNBits codes through a Reshape, plus each block's offset when the codes have them."""
    packed = g.node("Reshape", [codes.qweight, g.const([codes.N, -1])])  # (V, H*bits/8)
    x = g.node(
        "GatherBlockQuantized",
        [packed, "input_ids", codes.scales] + ([codes.zero_points] if codes.zero_points else []),
        domain=MS,
        bits=codes.bits,
        block_size=codes.block_size,
        quantize_axis=1,
        gather_axis=0,
    )
    if not codes.offsets:
        return x
    per_block = g.node("Gather", [codes.offsets, "input_ids"], axis=1)  # offsets (n_blocks, V) -> (n_blocks, B, S)
    per_block = g.node("Unsqueeze", [g.node("Transpose", [per_block], perm=[1, 2, 0]), g.const([-1])])
    spread = g.node("Mul", [per_block, g.const(np.ones(codes.block_size), g.dtype.type)])  # (B, S, n_blocks, block)
    return g.node("Add", [x, g.node("Reshape", [spread, g.const([0, 0, -1])])])


def _embedding(g: Graph, src: WeightSource, options: GraphOptions) -> tuple[str, Callable[[], HeadWeight]]:
    """The embedded tokens (B, S, H) and the output head: written now when the embedding shares
    it, else a function that writes it once after the layers (holding nothing meanwhile).
    When quantizing, an untied embedding table is stored quantized too (head_bits, or the
    GGUF's own blocks).

    A tied, quantized embedding is stored once: GatherBlockQuantized reads the head's
    MatMulNBits codes through a Reshape (when _gatherable; otherwise the input side gets a float table)."""
    spec, quant = src.spec, options.quant
    if spec.tied_embeddings:
        table = src.matrix(["embed"]) if quant and quant.share_tied else src.get("embed")
    else:
        table = src.matrix(["embed"]) if quant else src.get("embed")  # the input table alone
    codes = None
    if isinstance(table, NBits) and _gatherable(table):
        codes = _nbits_weights(g, table, "lm_head" if spec.tied_embeddings else "embed")
        x = _gather_quantized(g, codes)
    else:
        dense = g.weight("embed", table.dequantize() if isinstance(table, NBits) else table)
        x = g.node("Gather", [dense, "input_ids"])
    if not spec.tied_embeddings:
        return x, lambda: _write_head(g, src.matrix(["lm_head"]))
    if codes is not None:
        return x, lambda: codes
    return x, lambda: _write_head(g, table) if isinstance(table, NBits) else DenseWeight(dense)


def _head(g: Graph, h: str, w: HeadWeight, bias: str | None, spec: ModelSpec, accuracy_level: int) -> str:
    """Logits (B, S, V) from hidden states (B, S, H), plus the head's bias when it has one."""
    if isinstance(w, NBitsWeight):
        logits = _matmul_nbits(g, h, w, accuracy_level)
    else:
        flat = g.node("Gemm", [g.node("Reshape", [h, g.const([-1, spec.hidden_size])]), w.name], transB=1)
        shape = g.node("Concat", [g.node("Shape", [h], start=0, end=2), g.const([spec.vocab_size])], axis=0)
        logits = g.node("Reshape", [flat, shape])
    if bias:
        logits = g.node("Add", [logits, bias])
    if spec.logit_scale:  # Granite divides its logits
        logits = g.node("Div", [logits, g.const(spec.logit_scale, g.dtype.type)])
    if spec.final_softcap:  # Gemma 2: cap * tanh(logits / cap)
        cap = g.const(spec.final_softcap, g.dtype.type)
        logits = g.node("Mul", [g.node("Tanh", [g.node("Div", [logits, cap])]), cap])
    return logits


def _last_positions(g: Graph, h: str, mask_sum: str, hidden: int) -> str:
    """h (B, S, H) at the last n valid positions of each (right-padded) row: (B, n, H), where n is
    the input `logits_to_keep` ([1]: prefill and decode; n > 1 verifies drafted tokens in one
    pass). Positions before a row's first are clamped to it."""
    g.inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    seq_last = g.node("Sub", [g.node("Gather", [g.node("Shape", ["input_ids"]), g.const(1)]), g.const(1)])
    last = g.node("Min", [g.node("Sub", [mask_sum, g.const(1)]), seq_last])  # (B,)
    n = g.node("Reshape", [LOGITS_TO_KEEP, g.const([])])
    offsets = g.node("Range", [g.node("Sub", [g.const(1), n]), g.const(1), g.const(1)])  # (n,): 1-n .. 0
    idx = g.node("Add", [g.node("Reshape", [last, g.const([-1, 1])]), offsets])  # (B, n)
    idx = g.node("Max", [idx, g.const(0)])
    shape = g.node("Concat", [g.node("Shape", [idx]), g.const([hidden])], axis=0)
    idx = g.node("Expand", [g.node("Unsqueeze", [idx, g.const([2])]), shape])  # (B, n, H)
    return g.node("GatherElements", [h, idx], axis=1)


def _tap_outputs(g: Graph, options: GraphOptions) -> list:
    """With options.taps, one output "tap.{group}" per linear group: the tensor feeding it (for AWQ)."""
    taps = []
    for name, tensor in g.taps.items() if options.taps else ():
        g.nodes.append(helper.make_node("Identity", [tensor], [f"tap.{name}"]))
        taps.append(helper.make_tensor_value_info(f"tap.{name}", NP_TO_ONNX[g.dtype], None))
    return taps


def _model(g: Graph, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, "lmforge", g.inputs, outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)], producer_name="lmforge"
    )
    model.ir_version = 11  # opset 23: RMSNormalization
    return model


def _graphs(
    g: Graph, spec: ModelSpec, options: GraphOptions, h: str, head: tuple[HeadWeight, str | None], mask_sum: str
) -> dict[str, onnx.ModelProto]:
    """The two variants over the shared body whose final hidden states are h (B, S, H): "full"
    (every position's logits) and "last" (each row's last `logits_to_keep` valid positions').
    `head`: the output head's weight and its bias (None without one)."""
    taps = _tap_outputs(g, options)
    common = list(g.nodes), list(g.initializers), list(g.inputs)
    graphs = {}
    for variant in ("full", "last"):
        g.nodes, g.initializers, g.inputs = (list(c) for c in common)
        hv = _last_positions(g, h, mask_sum, spec.hidden_size) if variant == "last" else h
        g.nodes.append(helper.make_node("Identity", [_head(g, hv, *head, spec, options.accuracy_level)], ["logits"]))
        positions = "sequence_length" if variant == "full" else LOGITS_TO_KEEP
        dims = ["batch_size", positions, spec.vocab_size]
        logits = helper.make_tensor_value_info("logits", NP_TO_ONNX[g.dtype], dims)
        graphs[variant] = _model(g, [logits] + g.outputs + taps)
    return graphs


# ---- the whole graph ------------------------------------------------------------------------


def build(
    ckpt: Checkpoint, folder: Path, options: GraphOptions, src: WeightSource | None = None, progress=None
) -> dict[str, onnx.ModelProto]:
    """Write `folder/model.onnx.data`; return {"last": graph with last-position logits,
    "full": graph with every position's logits}, both over the same weights."""
    spec = ckpt.spec
    dtype = np.float16 if options.dtype == "float16" else np.float32
    if spec.rotary_dim % 16:
        raise LmforgeError(
            f"rotary dimension {spec.rotary_dim} is not a multiple of 16, which ONNX Runtime's "
            "GroupQueryAttention requires; this model cannot be exported to ONNX"
        )
    weights = WeightFile(folder / DATA_FILE)
    try:
        return _build(ckpt, options, src or WeightSource(ckpt, options.quant), Graph(weights, dtype), progress)
    finally:
        weights.close()


def _build(
    ckpt: Checkpoint, options: GraphOptions, src: WeightSource, g: Graph, progress
) -> dict[str, onnx.ModelProto]:
    """Inputs, rotary tables, embedding, each layer in turn (one layer's weights at a time), head."""
    spec = ckpt.spec
    _declare_io(g, spec, options)
    lengths = _lengths(g)
    shared = _Shared(lengths, _rotary_caches(g, spec, options, lengths.total_len))
    x, write_head = _embedding(g, src, options)  # (B, S, H)
    if spec.embedding_scale:
        x = g.node("Mul", [x, g.const(spec.embedding_scale, g.dtype.type)])
    h, residual = (_pre_norm(g, src, x, "layers.0.attn_norm") if spec.pre_norms else x), x
    for i in range(spec.n_layers):
        h, residual = _layer(g, src, options, i, h, residual, shared)
        if progress:
            progress(i + 1, spec.n_layers)
    head = write_head()  # write the output head's weights once; both graph variants read them
    bias = src.get("lm_head.bias")
    head_bias = g.weight("lm_head.bias", bias) if bias is not None else None
    return _graphs(g, spec, options, h, (head, head_bias), lengths.mask_sum)
