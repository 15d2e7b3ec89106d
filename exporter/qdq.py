"""Bake a plan and its scales into an FP ONNX graph as QDQ (DESIGN §3, §4).

Graph passes on the FP graph of `onnx_export.py` (onnx-graphsurgeon, numpy; no torch), each
small and usable alone:

    find_layers        plan module path -> the one MatMul/Gemm/Conv whose name scope is that
                       path and whose weight (input 1) is a constant
    smooth_weight      W diag(s) on the weight as stored (K axis)
    rotate_weight      W H (the stored [K, N] MatMul weight becomes H^T W)
    quantize_weight    int8 per output channel -> DequantizeLinear(axis = output channel of
                       the weight as stored); int4 blockwise along K -> packed INT4 initializer
                       + DequantizeLinear(axis = K, block_size) (opset 21)
    smooth_activation  x * (1/s) before the layer: folded into the producer when it is a
                       MatMul/Gemm with a constant (or DQ'd) weight feeding only this layer,
                       else a Mul
    rotate_activation  x @ H (H a constant orthonormal Hadamard matrix, one per size)
    quantize_activation  QuantizeLinear -> DequantizeLinear per tensor, scale = amax / 127,
                       int8 zero point 0
    split_first_token  (BOS-aware layers, calib/bos.py) token 0 of the input through its own
                       MatMul without activation Q/DQ, tokens 1.. through the layer (and its
                       Q/DQ), Concat along the token axis
    gemm_to_matmul     (int4 on any target; every quantized Gemm on ort-cpu)
                       Gemm -> MatMul([K, N]) + Add: DQ(int4)->MatMul (+ 1-D bias) becomes
                       MatMulNBits; TensorRT blocks INT4 on axis 0 of a [K, N] weight
    bias_to_2d         (int8 Q/DQ graphs: TensorRT's, which ONNX Runtime opens too) the bias
                       Add after a quantized MatMul gets a [1, N] bias:
                       ONNX Runtime 1.32's MatMulAddFusion turns MatMul + Add([N]) on a 3-D
                       input into Reshape/Gemm and breaks the S8 QuantizeLinear it moves
                       (session creation fails); a [1, N] bias is left alone and the QDQ
                       MatMul fuses into MatMulIntegerToFloat. (An int4 MatMul keeps its
                       1-D bias: MatMulNBits takes it; a [1, N] bias on a 2-D input makes
                       MatMulAddFusion build a Gemm that stays unfused.)

    timestep_group_index  (ort-cpu) the call's timestep group, computed from the graph's
                       timestep input
    integer_matmuls    (ort-cpu) Q -> DQ -> MatMul <- DQ(W) [+ bias] becomes Q(scale of the
                       call's group) -> MatMulInteger -> Cast -> Mul(scale x weight scale)
                       [+ 1-D bias]: one graph for every timestep group, which ONNX Runtime
                       fuses into MatMulIntegerToFloat with the bias
    fuse_attention     (ort-cpu; exporter/ort_attention.py) unmasked softmax(q k^T) v becomes
                       one com.microsoft.MultiHeadAttention

`lower(model, plan, scales, target)` runs them for every layer the plan quantizes, with the
effective precision of the target (`calib.targets.effective_precision`), and
`write_variants` writes one graph per timestep group (TensorRT: Q/DQ scales are build-time
constants) or one graph for all groups (ONNX Runtime CPU, `scales_in_graph`: one session,
weights pre-packed once), pointing at one external weight file. `check_model` verifies a
graph against a target's rules and names each violating node.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto

from ..calib.bos import first_token_layers
from ..calib.plan import LayerPrecision, Plan, TARGETS
from ..calib.targets import effective_precision, int4_block_size
from .ort_attention import fuse_attention, import_ms_domain

LAYER_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FIRST_TOKEN_SCOPE = "first_token"  # name scope of the token-0 half of a BOS-aware layer
MIN_OPSET = 21  # INT4 and blocked DequantizeLinear
EPS = 1e-8  # calib.quantizers.EPS: the smallest amax / weight scale


class QdqError(ValueError):
    """A plan or graph that cannot be lowered; one line naming the layer or node."""


def _gs():
    import onnx_graphsurgeon as gs

    return gs


# --- plan module <-> graph node ----------------------------------------------------------


def node_module(node_name: str) -> str:
    """The module path of a TorchScript-exported node: `/transformer/transformer_blocks.0/
    attn1/to_out.0/MatMul` -> `transformer.transformer_blocks.0.attn1.to_out.0` (the name
    scope is the module path, one scope per module, the last part is the op)."""
    parts = node_name.strip("/").split("/")
    return ".".join(parts[:-1])


@dataclasses.dataclass
class Layer:
    """One Linear/Conv of the model in the graph."""

    module: str
    node: Any  # gs.Node (MatMul, Gemm or Conv)
    graph: Any = None  # the gs.Graph the node is in (passes add nodes to it)

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def scope(self) -> str:
        """The node's name scope (`/transformer/transformer_blocks.0/attn1/to_q`): the names
        of the nodes the passes add for this layer start with it."""
        return self.node.name.rsplit("/", 1)[0]

    @property
    def kind(self) -> str:
        return "conv" if self.op == "Conv" else "linear"

    @property
    def trans_b(self) -> bool:
        return self.op == "Gemm" and bool(self.node.attrs.get("transB", 0))

    @property
    def out_axis(self) -> int:
        """Axis of the output channel in the weight as stored: MatMul [K, N] -> 1, Gemm
        [K, N] -> 1 or with transB [N, K] -> 0, Conv [O, I, kh, kw] -> 0."""
        return 0 if self.op == "Conv" or self.trans_b else 1

    @property
    def k_axis(self) -> int:
        """Axis of the input features (the reduction axis) in the weight as stored."""
        return 1 if self.op == "Conv" or self.trans_b else 0

    def weight_constant(self):
        """The constant weight: input 1 itself, or the data of the DequantizeLinear feeding it."""
        gs = _gs()
        w = self.node.inputs[1]
        if isinstance(w, gs.Constant):
            return w
        if len(w.inputs) == 1 and w.inputs[0].op == "DequantizeLinear":
            data = w.inputs[0].inputs[0]
            if isinstance(data, gs.Constant):
                return data
        raise QdqError(f"{self.module}: weight of {self.node.name} is not a constant")

    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight_constant().shape)

    @property
    def in_features(self) -> int:
        return self.weight_shape()[self.k_axis]

    @property
    def out_features(self) -> int:
        return self.weight_shape()[self.out_axis]


def _has_constant_weight(node) -> bool:
    gs = _gs()
    if len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    if isinstance(w, gs.Constant):
        return True
    return (len(w.inputs) == 1 and w.inputs[0].op == "DequantizeLinear"
            and isinstance(w.inputs[0].inputs[0], gs.Constant))


def all_layers(graph) -> dict[str, list[Layer]]:
    """Every MatMul/Gemm/Conv with a constant weight, grouped by module path."""
    out: dict[str, list[Layer]] = {}
    for node in graph.nodes:
        if node.op in LAYER_OPS and node.name and _has_constant_weight(node):
            m = node_module(node.name)
            out.setdefault(m, []).append(Layer(m, node, graph))
    return out


def find_layers(graph, modules: Iterable[str]) -> dict[str, Layer]:
    """The graph layer of each module path; a QdqError naming the first module that has no
    node, or more than one."""
    import difflib

    found = all_layers(graph)
    out = {}
    for m in modules:
        hits = found.get(m, [])
        if not hits:
            close = difflib.get_close_matches(m, list(found), n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise QdqError(f"plan layer {m} has no MatMul/Gemm/Conv node with a constant weight "
                           f"in the graph{hint}")
        if len(hits) > 1:
            raise QdqError(f"plan layer {m} matches {len(hits)} nodes "
                           f"({', '.join(h.node.name for h in hits)})")
        out[m] = hits[0]
    return out


def quantized_layers(model_or_graph) -> dict[str, str]:
    """Module path -> 'W8A8' / 'W4A16' / ... of every MatMul/Gemm/Conv in a graph whose weight
    comes through a DequantizeLinear (what a graph really quantizes)."""
    graph = _as_graph(model_or_graph)
    out = {}
    for node in graph.nodes:  # ort-cpu's integer form (integer_matmuls): always W8A8
        if node.op == "MatMulInteger" and node.name and isinstance(node.inputs[1], _gs().Constant):
            m = node_module(node.name)
            if not m.endswith(f".{FIRST_TOKEN_SCOPE}"):
                out[m] = "W8A8"
    for m, layers in all_layers(graph).items():
        if m.endswith(f".{FIRST_TOKEN_SCOPE}"):  # the token-0 half of a BOS-aware layer
            continue
        for layer in layers:
            w = layer.node.inputs[1]
            if not w.inputs or w.inputs[0].op != "DequantizeLinear":
                continue
            bits = 4 if _dtype_of(w.inputs[0].inputs[0]) in (TensorProto.INT4, TensorProto.UINT4) else 8
            x = layer.node.inputs[0]
            a = 8 if x.inputs and x.inputs[0].op == "DequantizeLinear" else 16
            out[m] = f"W{bits}A{a}"
    return out


def _as_graph(model_or_graph):
    gs = _gs()
    return gs.import_onnx(model_or_graph) if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph


# --- tensors -----------------------------------------------------------------------------


def _dtype_of(const) -> int:
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if isinstance(const._values, LazyValues):
        return int(const._values.tensor.data_type)
    return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(const.values).dtype)


def _values(const) -> np.ndarray:
    return np.asarray(const.values)


def _np(x) -> np.ndarray:
    """A numpy float32 copy of a scales entry (torch tensor or array)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def pack_int4(q: np.ndarray) -> bytes:
    """Signed int4 values (int8 array in [-8, 7]) packed two per byte, low nibble first, as
    ONNX stores INT4 (an odd count is padded with a zero nibble)."""
    flat = np.asarray(q, np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must be in [-8, 7]")
    u = (flat.astype(np.uint8) & 0x0F)
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4
    t.dims.extend(int(d) for d in q.shape)
    t.raw_data = pack_int4(q)
    return t


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of two), float32 — the
    same matrix as `calib.balance.hadamard`."""
    if n < 1 or n & (n - 1):
        raise QdqError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / math.sqrt(n)).astype(np.float32)


def _const(name: str, values: np.ndarray):
    values = np.asarray(values)
    if not values.flags.c_contiguous:
        values = values.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-D)
    return _gs().Constant(name, values)


def _k_shape(layer: Layer, ndim: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[layer.k_axis] = -1
    return tuple(shape)


# --- weight passes -----------------------------------------------------------------------


def _set_weight(layer: Layer, values: np.ndarray, suffix: str) -> None:
    """Give the layer a new constant weight (never edit a constant in place: the exporter
    may share one initializer between nodes)."""
    layer.node.inputs[1] = _const(f"{layer.module}.weight{suffix}", values.astype(np.float32))


def smooth_weight(layer: Layer, s: np.ndarray) -> None:
    """W diag(s): the weight's input column j times s_j (the K axis as stored)."""
    if not isinstance(layer.node.inputs[1], _gs().Constant):
        raise QdqError(f"{layer.module}: smooth the weight before quantizing it")
    w = _values(layer.node.inputs[1]).astype(np.float32)
    s = _np(s)
    if s.shape != (w.shape[layer.k_axis],):
        raise QdqError(f"{layer.module}.smooth has shape {s.shape}, the layer has "
                       f"{w.shape[layer.k_axis]} input features")
    _set_weight(layer, w * s.reshape(_k_shape(layer, w.ndim)), "_smoothed")


def rotate_weight(layer: Layer, h: np.ndarray) -> None:
    """W H for the Linear weight W (out, in): the stored [K, N] weight becomes H^T W_kn
    (Gemm with transB: [N, K] becomes W H)."""
    if layer.kind != "linear":
        raise QdqError(f"{layer.module}: only Linear layers can be rotated")
    w = _values(layer.node.inputs[1]).astype(np.float32)
    rotated = w @ h if layer.trans_b else h.T @ w
    _set_weight(layer, rotated, "_rotated")


def quantize_weight(layer: Layer, bits: int, granularity: str, w_scale, codes=None) -> None:
    """Replace the FP weight by an int8 (per output channel) or int4 (blockwise along K)
    initializer and a DequantizeLinear, with the scales as given (the scales file's
    `L.w_scale`: (out,) or (out, K // block)). An int4 per-channel weight is written as
    blocks along K that repeat the channel's scale (identical numbers; TensorRT and ONNX
    Runtime want INT4 blocked). `bits=7` (ONNX Runtime CPU, see calib.targets): int8 storage
    of the grid [-64, 63]. Weights are signed on every target. `codes`: the scales file's
    `L.w_codes` (out, K), GPTQ's integer weights, stored as they are instead of rounding."""
    gs = _gs()
    if not isinstance(layer.node.inputs[1], gs.Constant):
        raise QdqError(f"{layer.module}: the weight is already quantized")
    w = _values(layer.node.inputs[1]).astype(np.float32)
    scale = _np(w_scale)
    m, out_axis, k_axis = layer.module, layer.out_axis, layer.k_axis
    n_out, k = w.shape[out_axis], int(np.prod(w.shape)) // w.shape[out_axis]
    qmax = 2 ** (bits - 1) - 1
    if bits == 4 and layer.kind == "conv":
        raise QdqError(f"{m}: no int4 convolution (the target table makes it W8)")
    if bits not in (4, 7, 8):
        raise QdqError(f"{m}: weight bits must be 4, 7 or 8, got {bits}")
    if granularity == "per_channel":
        if scale.shape != (n_out,):
            raise QdqError(f"{m}.w_scale has shape {scale.shape}, per-channel needs ({n_out},)")
    else:
        block = int(granularity[5:])
        if layer.kind != "linear" or scale.shape != (n_out, k // block) or k % block:
            raise QdqError(f"{m}.w_scale has shape {scale.shape}, {granularity} needs "
                           f"({n_out}, {k // block if block else '?'})")
    scale = np.maximum(scale, np.float32(EPS / qmax)).astype(np.float32)
    if codes is not None:  # (out, K) as PyTorch holds the weight -> the stored layout
        codes = _np(codes).astype(np.int8)
        if codes.shape != (n_out, k) or codes.min() < -qmax - 1 or codes.max() > qmax:
            raise QdqError(f"{m}.w_codes: shape {codes.shape} or values off the {bits}-bit "
                           f"grid for a weight of {n_out} x {k}")
        codes = codes.reshape(w.shape) if out_axis == 0 else codes.T.reshape(w.shape)
    dq_inputs: list = []
    attrs: dict[str, int] = {}
    if bits in (7, 8):
        bshape = [1] * w.ndim
        bshape[out_axis] = n_out
        if scale.ndim != 1:
            raise QdqError(f"{m}: int8 weights are quantized per output channel, not {granularity}")
        q = codes if codes is not None else np.clip(
            np.round(w / scale.reshape(bshape)), -qmax - 1, qmax).astype(np.int8)
        zp = np.zeros(n_out, np.int8)
        data = _const(f"{m}.weight_quantized", q)
        dq_inputs = [data, _const(f"{m}.weight_scale", scale), _const(f"{m}.weight_zero_point", zp)]
        attrs = {"axis": out_axis}
    else:
        if scale.ndim == 1:  # per channel: one scale repeated over blocks along K
            block = int4_block_size(LayerPrecision(4, 16, "per_channel"), k)
            scale = np.repeat(scale[:, None], k // block, axis=1)
        else:
            block = k // scale.shape[1]
        # scale (out, K // block) -> laid out like the stored weight, blocked along K.
        s_stored = scale.T if out_axis == 1 else scale
        s_full = np.repeat(s_stored, block, axis=k_axis)
        q = codes if codes is not None else np.clip(
            np.round(w / s_full), -qmax - 1, qmax).astype(np.int8)
        from onnx_graphsurgeon.ir.tensor import LazyValues

        data = gs.Constant(f"{m}.weight_quantized", LazyValues(int4_tensor(f"{m}.weight_quantized", q)))
        dq_inputs = [data, _const(f"{m}.weight_scale", np.ascontiguousarray(s_stored))]
        attrs = {"axis": k_axis, "block_size": int(block)}
    out = gs.Variable(f"{m}.weight_dequantized", dtype=np.float32, shape=list(w.shape))
    dq = gs.Node("DequantizeLinear", f"{layer.scope}/weight/DequantizeLinear", attrs=attrs,
                 inputs=dq_inputs, outputs=[out])
    layer.node.inputs[1] = out
    layer.graph.nodes.append(dq)


# --- activation passes -------------------------------------------------------------------


def _insert_before(graph, layer: Layer, op: str, name: str, inputs_after_x: list, attrs=None,
                   out_name: str | None = None):
    """x -> op(x, *inputs_after_x) -> layer: only this layer sees the new tensor."""
    gs = _gs()
    x = layer.node.inputs[0]
    y = gs.Variable(out_name or f"{name}_output", dtype=np.float32, shape=x.shape)
    node = gs.Node(op, name, attrs=attrs or {}, inputs=[x, *inputs_after_x], outputs=[y])
    graph.nodes.append(node)
    layer.node.inputs[0] = y
    return node


def _foldable_producer(layer: Layer):
    """(producer layer node, bias Add node or None) when the layer's input is produced by a
    MatMul/Gemm with a constant or DQ'd weight (plus an optional constant-bias Add) whose
    output feeds nothing else."""
    gs = _gs()
    x = layer.node.inputs[0]
    if len(x.outputs) != 1 or len(x.inputs) != 1:
        return None
    prod = x.inputs[0]
    add = None
    if prod.op == "Add":
        a, b = prod.inputs
        var, const = (a, b) if isinstance(b, gs.Constant) else (b, a)
        if not isinstance(const, gs.Constant) or len(var.inputs) != 1 or len(var.outputs) != 1:
            return None
        add, prod = prod, var.inputs[0]
    if prod.op not in ("MatMul", "Gemm") or not _has_constant_weight(prod):
        return None
    if prod.op == "Gemm" and (prod.attrs.get("alpha", 1.0) != 1.0 or prod.attrs.get("beta", 1.0) != 1.0):
        return None
    return prod, add


def smooth_activation(graph, layer: Layer, s: np.ndarray, fold: bool = True) -> str:
    """Multiply the layer's input by 1/s: folded into the producer's output channels when
    the producer is a MatMul/Gemm with a constant weight (FP: the weight columns; quantized:
    its per-channel / per-block DequantizeLinear scale) and bias feeding only this layer;
    else a Mul. Returns "folded" or "mul"."""
    gs = _gs()
    inv = (np.float32(1.0) / _np(s)).astype(np.float32)
    found = _foldable_producer(layer) if fold else None
    if found is not None:
        prod, add = found
        p = Layer(node_module(prod.name), prod)
        n_out = p.out_features
        if n_out == inv.shape[0]:
            w = prod.inputs[1]
            if isinstance(w, gs.Constant):
                vals = _values(w).astype(np.float32)
                shape = [1] * vals.ndim
                shape[p.out_axis] = -1
                prod.inputs[1] = _const(f"{p.module}.weight_folded_{layer.module}", vals * inv.reshape(shape))
            else:
                dq = w.inputs[0]
                sc = _values(dq.inputs[1]).astype(np.float32)
                if sc.ndim == 0 or sc.size == 1:
                    return _smooth_mul(graph, layer, inv)  # a per-tensor weight scale cannot fold
                # per channel (N,) on the out axis, or blocked: (K/B, N) or (N, K/B)
                if sc.ndim == 1:
                    new = sc * inv
                else:
                    shape = [1, 1]
                    shape[p.out_axis] = -1
                    new = sc * inv.reshape(shape)
                dq.inputs[1] = _const(f"{p.module}.weight_scale_folded_{layer.module}", new)
            if prod.op == "Gemm" and len(prod.inputs) > 2:
                c = prod.inputs[2]
                prod.inputs[2] = _const(f"{p.module}.bias_folded_{layer.module}",
                                        _values(c).astype(np.float32) * inv)
            if add is not None:
                ci = 1 if isinstance(add.inputs[1], gs.Constant) else 0
                add.inputs[ci] = _const(f"{p.module}.bias_folded_{layer.module}",
                                        _values(add.inputs[ci]).astype(np.float32) * inv)
            return "folded"
    return _smooth_mul(graph, layer, inv)


def _smooth_mul(graph, layer: Layer, inv: np.ndarray) -> str:
    shape = (1, -1, 1, 1) if layer.kind == "conv" else (-1,)
    _insert_before(graph, layer, "Mul", f"{layer.scope}/smooth/Mul",
                   [_const(f"{layer.module}.inv_smooth", inv.reshape(shape))])
    return "mul"


def rotate_activation(graph, layer: Layer, h_const) -> None:
    """x @ H before the layer (H: a shared constant orthonormal matrix)."""
    if layer.kind != "linear":
        raise QdqError(f"{layer.module}: only Linear layers can be rotated")
    _insert_before(graph, layer, "MatMul", f"{layer.scope}/rotate/MatMul", [h_const])


def activation_scale_name(module: str) -> str:
    return f"{module}.input_scale"


def quantize_activation(graph, layer: Layer, amax: float, int8_format: str = "s8s8",
                        shift_steps: int = 0) -> None:
    """QuantizeLinear -> DequantizeLinear on the layer's input, per tensor, int8, zero point
    0, scale amax / 127 (the scale is a scalar initializer named `<module>.input_scale`, the
    one thing that differs between timestep variants). `int8_format="u8s8"`: uint8 with zero
    point 128, the same grid shifted (what ONNX Runtime's U8S8 kernels take); there an
    activation shift of k grid steps (techniques.act_shift) is the zero point 128 - k:
    DQ(Q(x)) = s round(x / s) clamped to [(k - 128) s, (k + 127) s], which is the simulation's
    shift exactly, with no extra node."""
    gs = _gs()
    scale = _act_scale(amax)
    sc = _const(activation_scale_name(layer.module), np.array(scale, np.float32))
    if shift_steps and int8_format != "u8s8":
        raise QdqError(f"{layer.module}: a zero-point shift needs uint8 activations (u8s8)")
    zp = _const(activation_zero_point_name(layer.module),
                np.array(128 - shift_steps, np.uint8) if int8_format == "u8s8" else np.array(0, np.int8))
    base = f"{layer.scope}/input"
    x = layer.node.inputs[0]
    xq = gs.Variable(f"{layer.module}.input_quantized", dtype=zp.values.dtype, shape=x.shape)
    xd = gs.Variable(f"{layer.module}.input_dequantized", dtype=np.float32, shape=x.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}/QuantizeLinear", inputs=[x, sc, zp], outputs=[xq]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}/DequantizeLinear", inputs=[xq, sc, zp], outputs=[xd]))
    layer.node.inputs[0] = xd


def activation_shift_name(module: str) -> str:
    return f"{module}.input_shift"


def activation_zero_point_name(module: str) -> str:
    return f"{module}.input_zero_point"


def shift_in_steps(amax: float, shift: float) -> int:
    """The activation shift in grid steps of scale amax / 127 (calibration makes it whole)."""
    return int(round(float(shift) / float(_act_scale(amax))))


def shift_activation(graph, layer: Layer, shift: float) -> str:
    """(techniques.act_shift on s8s8 targets: TensorRT, whose zero points are 0; before
    quantize_activation, after quantize_weight) x - z into
    the layer's activation quantization and z * colsum(W) added to its output (after its
    bias): y = W (x - z) + b + W z. colsum(W) is of the weight as the graph dequantizes it,
    so z * colsum(W) is a product of constants for TensorRT's build to fold; z is a scalar initializer
    `<module>.input_shift`, which differs between timestep variants as the activation scale
    does. Returns the initializer's name."""
    gs = _gs()
    name = activation_shift_name(layer.module)
    z = _const(name, np.array(shift, np.float32))
    _insert_before(graph, layer, "Sub", f"{layer.scope}/shift/Sub", [z])
    colsum = _dequantized_weight(layer).sum(axis=layer.k_axis).astype(np.float32)
    y = layer.node.outputs[0]
    if len(y.outputs) == 1 and y.outputs[0].op == "Add" and y not in graph.outputs and any(
            isinstance(t, gs.Constant) for t in y.outputs[0].inputs):
        y = y.outputs[0].outputs[0]  # after the bias Add (bias_to_2d made it a constant)
    correction = gs.Variable(f"{layer.module}.shift_correction", dtype=np.float32)
    shifted_back = gs.Variable(f"{layer.module}.shifted_back", dtype=np.float32, shape=y.shape)
    for consumer in list(y.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is y:
                consumer.inputs[i] = shifted_back
    for i, t in enumerate(graph.outputs):
        if t is y:
            graph.outputs[i] = shifted_back
    graph.nodes.append(gs.Node("Mul", f"{layer.scope}/shift/Mul",
                               inputs=[_const(f"{layer.module}.weight_colsum", colsum), z],
                               outputs=[correction]))
    graph.nodes.append(gs.Node("Add", f"{layer.scope}/shift/Add", inputs=[y, correction],
                               outputs=[shifted_back]))
    return name


def per_group_constants(graph, tables: Mapping[str, np.ndarray], group_index) -> None:
    """(scales_in_graph targets) Each scalar constant named in `tables` becomes
    Gather(its (K,) values per timestep group, `group_index`) wherever it is used (a uint8
    table for zero points)."""
    gs = _gs()
    picked: dict[str, Any] = {}  # one Gather per constant, however many nodes read it
    for node in list(graph.nodes):
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.name in tables:
                if t.name not in picked:
                    table = np.asarray(tables[t.name])
                    picked[t.name] = gs.Variable(f"{t.name}_of_group", dtype=table.dtype, shape=[])
                    graph.nodes.append(gs.Node(
                        "Gather", f"{t.name}/Gather", attrs={"axis": 0},
                        inputs=[_const(f"{t.name}_by_group", table), group_index],
                        outputs=[picked[t.name]]))
                node.inputs[i] = picked[t.name]


def _int64(graph, name: str, values) -> Any:
    """An int64 Constant node's output: shape inference reads Slice's starts/ends/axes, and
    an initializer would go to the external weight file, where it cannot."""
    gs = _gs()
    out = gs.Variable(name, dtype=np.int64, shape=[len(values)])
    graph.nodes.append(gs.Node("Constant", f"{name}/Constant",
                               attrs={"value": _const(f"{name}_value", np.array(values, np.int64))},
                               outputs=[out]))
    return out


def split_first_token(graph, layer: Layer, first_weight, first_token=None):
    """MixDQ's BOS-aware layer (calib/bos.py): the layer's MatMul runs on tokens 1.. of its
    input, a second MatMul with `first_weight` runs on token 0, and their results are
    concatenated along the token axis into the layer's output (what follows, the bias Add, is
    unchanged). Run before `quantize_activation`, which then quantizes tokens 1.. only:

        x -> Slice[0:1] -----------------> MatMul(first_weight) --+
        x -> Slice[1:]  -> (Q -> DQ) ----> MatMul(W) -------------+-- Concat(tokens) -> y

    Token 0 has no Q/DQ: TensorRT runs that MatMul with a float activation (weight-only when
    `first_weight` is the layer's DQ'd weight). `first_weight`: the layer's (dequantized)
    weight tensor, or a float constant of the same values where the target cannot run a
    weight DQ in front of a float activation (ONNX Runtime CPU). `first_token`: token 0 of the
    input, already sliced by a layer that shares this layer's input path (the caller then
    gives the layer the shared quantized tokens 1..). Returns the token-0 tensor."""
    from ..calib.bos import TOKEN_AXIS

    gs = _gs()
    node, scope, m = layer.node, f"{layer.scope}/{FIRST_TOKEN_SCOPE}", layer.module
    x = node.inputs[0]
    if layer.op != "MatMul" or (x.shape is not None and len(x.shape) != 3):
        raise QdqError(f"{m}: a BOS-aware layer must be a MatMul on (batch, tokens, features), "
                       f"got {layer.op} on shape {x.shape}")
    if first_token is None:
        first_token = gs.Variable(f"{m}.input_first_token", dtype=np.float32)
        rest = gs.Variable(f"{m}.input_after_first_token", dtype=np.float32)
        axes, one = _int64(graph, f"{m}.token_axis", [TOKEN_AXIS]), _int64(graph, f"{m}.token_1", [1])
        graph.nodes.append(gs.Node("Slice", f"{scope}/Slice", inputs=[
            x, _int64(graph, f"{m}.token_0", [0]), one, axes], outputs=[first_token]))
        graph.nodes.append(gs.Node("Slice", f"{layer.scope}/after_{FIRST_TOKEN_SCOPE}/Slice", inputs=[
            x, one, _int64(graph, f"{m}.token_end", [np.iinfo(np.int64).max]), axes], outputs=[rest]))
        node.inputs[0] = rest
    y = node.outputs[0]
    y_first = gs.Variable(f"{m}.output_first_token", dtype=np.float32)
    y_rest = gs.Variable(f"{m}.output_after_first_token", dtype=np.float32)
    graph.nodes.append(gs.Node("MatMul", f"{scope}/MatMul", inputs=[first_token, first_weight],
                               outputs=[y_first]))
    node.outputs[0] = y_rest
    graph.nodes.append(gs.Node("Concat", f"{scope}/Concat", attrs={"axis": TOKEN_AXIS},
                               inputs=[y_first, y_rest], outputs=[y]))
    return first_token


def _dequantized_weight(layer: Layer) -> np.ndarray:
    """The float values of the layer's weight: the constant itself, or its int8 per-channel
    DequantizeLinear computed here (what the DQ would produce)."""
    gs = _gs()
    w = layer.node.inputs[1]
    if isinstance(w, gs.Constant):
        return _values(w).astype(np.float32)
    dq = w.inputs[0]
    if len(dq.inputs) < 3 or _dtype_of(dq.inputs[0]) not in (TensorProto.INT8, TensorProto.UINT8):
        raise QdqError(f"{layer.module}: the float copy of a BOS-aware weight needs an int8 "
                       "per-channel weight with a zero point")
    q, scale, zp = (_values(t) for t in dq.inputs[:3])
    shape = [1] * q.ndim
    shape[int(dq.attrs.get("axis", 1))] = -1
    return ((q.astype(np.float32) - zp.astype(np.float32).reshape(shape))
            * scale.astype(np.float32).reshape(shape)).astype(np.float32)


def _act_scale(amax: float) -> np.float32:
    """calib.quantizers.fake_quant_per_tensor: max(amax, EPS) / 127 in float32."""
    return np.float32(max(np.float32(amax), np.float32(EPS))) / np.float32(127)


# --- ONNX Runtime CPU shaping ------------------------------------------------------------


def _check_plain_gemm(node) -> None:
    a = node.attrs
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        raise QdqError(f"{node.name}: Gemm with alpha/beta/transA is not supported")


def gemm_to_matmul(graph, layer: Layer) -> None:
    """Gemm(A, B, C) -> MatMul(A, B as [K, N]) + Add(C) (FP weight; run before
    quantize_weight): ONNX Runtime fuses DQ(int4)->MatMul (+ a 1-D bias Add) into
    MatMulNBits, and TensorRT blocks INT4 along axis 0 of a [K, N] weight."""
    gs = _gs()
    node = layer.node
    if node.op != "Gemm":
        return
    _check_plain_gemm(node)
    w = _values(node.inputs[1]).astype(np.float32)
    if layer.trans_b:
        w = w.T
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    mm_out = gs.Variable(f"{layer.module}.matmul_output", dtype=np.float32) if bias is not None else y
    node.op = "MatMul"
    node.name = f"{layer.scope}/MatMul"
    node.attrs = {}
    x = node.inputs[0]
    node.inputs.clear()
    node.inputs.extend([x, _const(f"{layer.module}.weight_kn", np.ascontiguousarray(w))])
    if bias is not None:
        node.outputs.clear()
        node.outputs.append(mm_out)
        graph.nodes.append(gs.Node("Add", f"{layer.scope}/Add",
                                   inputs=[mm_out, bias], outputs=[y]))


def bias_to_2d(layer: Layer) -> bool:
    """MatMul -> Add(constant [N]) becomes Add(constant [1, N]) (see the module doc)."""
    gs = _gs()
    if layer.op != "MatMul":
        return False
    y = layer.node.outputs[0]
    if len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return False
    add = y.outputs[0]
    for i, t in enumerate(add.inputs):
        # The TorchScript exporter writes a duplicate initializer (the zero biases of an
        # untrained model) as an Identity of the first one.
        if len(t.inputs) == 1 and t.inputs[0].op == "Identity":
            t = t.inputs[0].inputs[0]
        if isinstance(t, gs.Constant) and len(t.shape) == 1:
            add.inputs[i] = _const(f"{layer.module}.bias_1xn", _values(t).reshape(1, -1))
            return True
    return False


def timestep_group_index(graph, groups: list[tuple[int, int]], timestep: str = "timestep"):
    """The int64 scalar index of the timestep group a call is in, computed in the graph from
    its `timestep` input (every sample of one denoiser call has the same timestep): the
    number of group starts (groups 1..K-1) that timestep[0] has reached."""
    gs = _gs()
    inputs = {t.name: t for t in graph.inputs}
    if timestep not in inputs:
        raise QdqError(f"the graph has no '{timestep}' input to choose a timestep group by")
    t = inputs[timestep]
    dtypes = {"t0": t.dtype, "t0_float": np.float32, "reached": np.bool_, "reached_int": np.int64,
              "index": np.int64}  # t0 keeps the input's type (float or int64 timesteps)
    v = {n: gs.Variable(f"timestep_group/{n}", dtype=d) for n, d in dtypes.items()}
    starts = np.array([lo for lo, _ in groups[1:]], np.float32)
    add = graph.nodes.append
    add(gs.Node("Gather", "timestep_group/Gather", attrs={"axis": 0},
                inputs=[t, _const("timestep_group.first", np.array(0, np.int64))], outputs=[v["t0"]]))
    add(gs.Node("Cast", "timestep_group/Cast", attrs={"to": TensorProto.FLOAT},
                inputs=[v["t0"]], outputs=[v["t0_float"]]))
    add(gs.Node("GreaterOrEqual", "timestep_group/GreaterOrEqual",
                inputs=[v["t0_float"], _const("timestep_group.starts", starts)], outputs=[v["reached"]]))
    add(gs.Node("Cast", "timestep_group/Cast_1", attrs={"to": TensorProto.INT64},
                inputs=[v["reached"]], outputs=[v["reached_int"]]))
    add(gs.Node("ReduceSum", "timestep_group/ReduceSum", attrs={"keepdims": 0},
                inputs=[v["reached_int"]], outputs=[v["index"]]))
    return v["index"]


def integer_matmuls(graph, scale_tables: Mapping[str, np.ndarray], group_index) -> int:
    """(ort-cpu) Every timestep group in one graph. Each int8 layer

        x -> QuantizeLinear(s) -> DequantizeLinear -> MatMul <- DequantizeLinear(W, ws)  [-> Add(b)]

    becomes

        x -> QuantizeLinear(s_g) -> MatMulInteger(W) -> Cast -> Mul(s_g * ws)  [-> Add(b)]

    with s_g = Gather(the layer's activation scale per group, `group_index`): numerically the
    QDQ graph of group g (the same integer product, scaled once). `scale_tables`: the name of
    each activation-scale initializer -> its (K,) scales. Standard ONNX that ONNX Runtime
    fuses, bias included, into one MatMulIntegerToFloat (its MatMulIntegerToFloatFusion; it
    needs the scale product as a Mul node, which a run-time s_g keeps from being folded), and
    one session serves every group with pre-packed weights. Returns how many layers."""
    gs = _gs()
    selected: dict[int, Any] = {}  # id(QuantizeLinear) -> its scale for this call
    n = 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        dq_x = x.inputs[0] if len(x.inputs) == 1 else None
        dq_w = w.inputs[0] if len(w.inputs) == 1 else None
        if dq_x is None or dq_w is None or dq_x.op != "DequantizeLinear" or dq_w.op != "DequantizeLinear":
            continue
        if not isinstance(dq_w.inputs[0], gs.Constant) or _dtype_of(dq_w.inputs[0]) != TensorProto.INT8:
            continue
        xq = dq_x.inputs[0]
        q = xq.inputs[0] if len(xq.inputs) == 1 else None
        if q is None or q.op != "QuantizeLinear":
            continue
        if id(q) not in selected:
            name = q.inputs[1].name
            if name not in scale_tables:
                raise QdqError(f"{node.name}: no per-group scales for its activation scale {name}")
            s_g = gs.Variable(f"{name}_of_group", dtype=np.float32, shape=[])
            graph.nodes.append(gs.Node("Gather", f"{q.name.rsplit('/', 1)[0]}/Gather", attrs={"axis": 0},
                                       inputs=[_const(f"{name}_by_group", np.asarray(scale_tables[name], np.float32)),
                                               group_index], outputs=[s_g]))
            q.inputs[1] = s_g
            selected[id(q)] = s_g
        s_g = selected[id(q)]
        wq, w_scale, w_zp = dq_w.inputs[:3]
        if int(dq_w.attrs.get("axis", 1)) != 1 or len(w_scale.shape) != 1:
            raise QdqError(f"{node.name}: an int8 MatMul weight must be per output channel (axis 1)")
        scope, m = node.name.rsplit("/", 1)[0], node_module(node.name)
        acc = gs.Variable(f"{m}.accumulator", dtype=np.int32)
        acc_f = gs.Variable(f"{m}.accumulator_float", dtype=np.float32)
        scale = gs.Variable(f"{m}.output_scale", dtype=np.float32)
        y = node.outputs[0]
        add, bias = None, None
        if len(y.outputs) == 1 and y.outputs[0].op == "Add" and y not in graph.outputs:
            add = y.outputs[0]
            consts = [t for t in add.inputs if isinstance(t, gs.Constant)]
            if len(consts) == 1 and _values(consts[0]).size == int(w_scale.shape[0]) \
                    and all(d == 1 for d in consts[0].shape[:-1]):
                bias = _const(f"{m}.bias_1d", _values(consts[0]).reshape(-1).astype(np.float32))
            else:
                add = None
        out = add.outputs[0] if add is not None else y
        scaled = gs.Variable(f"{m}.scaled_output", dtype=np.float32) if add is not None else out
        node.outputs.clear()
        if add is not None:
            add.outputs.clear()
        nodes = [gs.Node("MatMulInteger", f"{scope}/MatMulInteger", inputs=[xq, wq, q.inputs[2], w_zp],
                         outputs=[acc]),
                 gs.Node("Cast", f"{scope}/Cast", attrs={"to": TensorProto.FLOAT}, inputs=[acc], outputs=[acc_f]),
                 gs.Node("Mul", f"{scope}/scale/Mul", inputs=[s_g, w_scale], outputs=[scale]),
                 gs.Node("Mul", f"{scope}/Mul", inputs=[acc_f, scale], outputs=[scaled])]
        if add is not None:  # the bias second and 1-D: what the fusion takes as the bias
            nodes.append(gs.Node("Add", f"{scope}/Add", inputs=[scaled, bias], outputs=[out]))
        graph.nodes.extend(nodes)
        n += 1
    return n


# --- the whole lowering ------------------------------------------------------------------


@dataclasses.dataclass
class LayerLowering:
    module: str
    op: str
    planned: LayerPrecision
    effective: LayerPrecision
    smooth: str | None = None  # "mul" | "folded" | None
    rotate: bool = False
    first_token_fp: bool = False  # BOS-aware: token 0 bypasses the activation Q/DQ
    input_scale: str | None = None  # the activation-scale initializer (differs per variant)
    input_shift: str | None = None  # the activation-shift initializer (differs per variant)
    shift_zero_point: str | None = None  # u8s8: the zero point that carries the shift
    shares_input_with: str | None = None  # a layer whose Mul/Q/DQ path this one reuses

    def to_json(self) -> dict[str, Any]:
        out = {"op": self.op, "planned": self.planned.to_json(), "effective": self.effective.to_json(),
               "precision": _describe(self.effective), "smooth": self.smooth, "rotate": self.rotate}
        if self.first_token_fp:
            out["first_token_fp"] = True
        if self.shares_input_with:
            out["shares_input_with"] = self.shares_input_with
        if self.input_shift or self.shift_zero_point:
            out["shift"] = "zero point" if self.shift_zero_point else "sub"
        return out


def _describe(p: LayerPrecision) -> str:
    if p.is_fp:
        return "FP"
    extra = [g for g, on in ((p.w_granularity, p.w_bits < 16 and p.w_granularity != "per_channel"),
                             (p.a_granularity, p.a_bits < 16 and p.a_granularity != "per_tensor")) if on]
    return f"W{p.w_bits}A{p.a_bits}" + (f" ({', '.join(extra)})" if extra else "")


def _scale(scales: Mapping[str, Any], layer: str, what: str):
    return scales.get(f"{layer}.{what}")


def plan_layers(graph, plan: Plan, target: str) -> dict[str, tuple[Layer, LayerPrecision]]:
    """Every layer the plan quantizes, found in the graph, with its effective precision on
    `target` (layers that are FP on the target are left out)."""
    if target not in TARGETS:
        raise QdqError(f"target: {target!r} is not one of {', '.join(TARGETS)}")
    layers = find_layers(graph, sorted(plan.quantized()))
    out = {}
    for m, layer in layers.items():
        eff = effective_precision(plan.layers[m], layer.kind, target)
        if not eff.is_fp:
            out[m] = (layer, eff)
    return out


def rotated_modules(plan: Plan, layers: Mapping[str, Layer]) -> list[str]:
    """The layers the plan rotates: `plan.provenance["rotation"]` when the calibrator wrote
    it, else `calib.balance.rotated_layers` over the plan's techniques (as the simulation)."""
    if "rotation" in plan.provenance:
        return [m for m in plan.provenance["rotation"] if m in layers]
    from ..calib.balance import rotated_layers

    return rotated_layers(plan.techniques, {m: (l.kind, l.in_features) for m, l in layers.items()})


def default_int8_format(target: str) -> str:
    """TensorRT: S8S8 (INT8, zero point 0). ONNX Runtime CPU: U8S8, activations as uint8 with
    zero point 128 (the same symmetric grid, shifted) and int8 weights on the 7-bit grid of
    calib.targets, the pattern MLAS runs on its fastest int8 kernel, exactly on any x86 or
    ARM CPU. (The exact alternative for full-range int8 weights on AVX2, U8U8, measured 1.6x
    slower per GEMM.)"""
    return "u8s8" if target == "ort-cpu" else "s8s8"


def scales_in_graph(target: str) -> bool:
    """Whether a target's graph carries the activation scales of every timestep group and
    picks them by its timestep input (ONNX Runtime CPU: one session for all groups, weights
    pre-packed once), rather than one graph per group with constant scales (TensorRT, whose
    Q/DQ scales must be build-time constants)."""
    return target == "ort-cpu"


def lower(model: onnx.ModelProto, plan: Plan, scales: Mapping[str, Any], target: str,
          group: int = 0, fold_smoothing: bool = True, by_timestep: bool | None = None
          ) -> tuple[onnx.ModelProto, dict[str, LayerLowering]]:
    """The FP graph with the plan's quantization for `target`, activation scales of timestep
    group `group` (on a target with `scales_in_graph`: of every group, chosen by the graph's
    timestep input; `group` is not used). Layers the plan keeps FP (or that are FP on the
    target) are untouched. `by_timestep=False` keeps group `group`'s scales as constants on
    every target (a graph that only ever runs one group, as an ECAR stage graph; on ort-cpu it
    is the Q/DQ form, which ONNX Runtime fuses with constant scales)."""
    gs = _gs()
    by_timestep = scales_in_graph(target) if by_timestep is None else by_timestep
    int8_format = default_int8_format(target)
    if not 0 <= group < len(plan.timestep_groups):
        raise QdqError(f"timestep group {group} does not exist ({len(plan.timestep_groups)} groups)")
    graph = gs.import_onnx(model)
    todo = plan_layers(graph, plan, target)
    rotated = set(rotated_modules(plan, {m: l for m, (l, _) in todo.items()}))
    first_token = set(first_token_layers(plan.techniques, {m: eff for m, (_, eff) in todo.items()}))
    report: dict[str, LayerLowering] = {}
    hadamards: dict[int, Any] = {}
    # Weights first (smooth, rotate, quantize), then the activation paths, so that a
    # smoothing folded into a quantized producer scales its final DequantizeLinear.
    for m, (layer, eff) in sorted(todo.items()):
        rep = report[m] = LayerLowering(m, layer.op, plan.layers[m], eff)
        if layer.op == "Gemm" and (eff.w_bits == 4 or target == "ort-cpu"):
            gemm_to_matmul(graph, layer)
        s = _scale(scales, m, "smooth")
        if s is not None:
            smooth_weight(layer, s)
        if m in rotated:
            n = layer.in_features
            if n not in hadamards:
                hadamards[n] = _const(f"hadamard_{n}", hadamard(n))
            rotate_weight(layer, _values(hadamards[n]))
            rep.rotate = True
        if eff.w_bits < 16:
            w_scale = _scale(scales, m, "w_scale")
            if w_scale is None:
                raise QdqError(f"scales: no {m}.w_scale for a {eff.w_bits}-bit weight")
            quantize_weight(layer, eff.w_bits, eff.w_granularity, w_scale, _scale(scales, m, "w_codes"))
        # ORT must open every target's Q/DQ graphs (trt bundles run on ORT too); the integer
        # form of integer_matmuls takes a 1-D bias itself.
        if eff.w_bits in (7, 8) and not by_timestep:
            bias_to_2d(layer)
    # Layers that read the same tensor through the same path (smoothing vector, rotation,
    # activation amax of every group: q/k/v without smoothing) share one Mul/MatMul/Q/DQ
    # (BOS-aware k/v: and the token-0 Slice).
    paths: dict[tuple, tuple[str, Any, Any]] = {}
    for m, (layer, eff) in sorted(todo.items()):
        rep = report[m]
        s = _scale(scales, m, "smooth")
        quant_act = eff.a_bits < 16 and eff.a_granularity == "per_tensor"
        amax = _scale(scales, m, "a_amax") if quant_act else None
        if quant_act and (amax is None or _np(amax).shape != (len(plan.timestep_groups),)):
            raise QdqError(f"scales: {m}.a_amax must have one value per timestep group "
                           f"({len(plan.timestep_groups)})")
        shift = _scale(scales, m, "a_shift") if quant_act else None
        if shift is not None and (rep.rotate or m in first_token):
            raise QdqError(f"{m}: an activation shift on a rotated or BOS-aware layer")
        rep.first_token_fp = m in first_token
        # ORT CPU fuses a weight DQ only with a quantized activation: token 0 gets a float
        # copy of the dequantized weight there; TensorRT reads the one DQ'd weight twice.
        first_weight = None
        if rep.first_token_fp:
            first_weight = (_const(f"{m}.weight_dequantized_{FIRST_TOKEN_SCOPE}", _dequantized_weight(layer))
                            if target == "ort-cpu" else layer.node.inputs[1])
        key = (layer.node.inputs[0].name, None if s is None else _np(s).tobytes(), rep.rotate,
               None if amax is None else _np(amax).tobytes(), rep.first_token_fp,
               None if shift is None else _np(shift).tobytes())
        if key in paths and (s is not None or rep.rotate or quant_act) and shift is None:
            first, tensor, token0 = paths[key]
            if rep.first_token_fp:
                split_first_token(graph, layer, first_weight, token0)
            layer.node.inputs[0] = tensor
            rep.smooth, rep.input_scale, rep.shares_input_with = (
                report[first].smooth, report[first].input_scale, first)
            continue
        if s is not None:
            rep.smooth = smooth_activation(graph, layer, s, fold=fold_smoothing)
        if rep.rotate:
            rotate_activation(graph, layer, hadamards[layer.in_features])
        token0 = split_first_token(graph, layer, first_weight) if rep.first_token_fp else None
        steps = 0
        if shift is not None and int8_format == "u8s8":
            steps = shift_in_steps(float(_np(amax)[group]), float(_np(shift)[group]))
            rep.shift_zero_point = activation_zero_point_name(m)
        elif shift is not None:
            rep.input_shift = shift_activation(graph, layer, float(_np(shift)[group]))
        if quant_act:
            quantize_activation(graph, layer, float(_np(amax)[group]), int8_format, steps)
            rep.input_scale = activation_scale_name(m)
        # per-token A8 exists only as ort-cpu W4 (MatMulNBits quantizes its input itself).
        paths[key] = (m, layer.node.inputs[0], token0)
    if by_timestep:
        tables = {rep.input_scale: np.array([_act_scale(float(a)) for a in _np(scales[f"{m}.a_amax"])],
                                            np.float32)
                  for m, rep in report.items() if rep.input_scale is not None and not rep.shares_input_with}
        shifts = {rep.input_shift: _np(scales[f"{m}.a_shift"]).astype(np.float32)
                  for m, rep in report.items() if rep.input_shift is not None}
        shifts.update({rep.shift_zero_point: np.array(
            [128 - shift_in_steps(a, z) for a, z in zip(_np(scales[f"{m}.a_amax"]), _np(scales[f"{m}.a_shift"]))],
            np.uint8) for m, rep in report.items() if rep.shift_zero_point is not None})
        if tables or shifts:
            index = timestep_group_index(graph, plan.timestep_groups)
            integer_matmuls(graph, tables, index)
            per_group_constants(graph, shifts, index)
        left = [n.name for n in graph.nodes if n.op == "QuantizeLinear" and isinstance(n.inputs[1], gs.Constant)]
        if left:
            raise QdqError(f"{left[0]}: a quantized activation that is not an int8 MatMul input "
                           f"cannot take per-group scales on {target}")
    if target == "ort-cpu":
        fuse_attention(graph)
    constants_to_initializers(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = max(model.ir_version, 10)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    import_ms_domain(out)
    for op in out.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < MIN_OPSET:
            op.version = MIN_OPSET
    return out, report


def constants_to_initializers(graph, min_bytes: int = 1024) -> int:
    """Constant nodes of at least `min_bytes` (the TorchScript exporter writes e.g. PixArt's
    positional embedding, 4.7 MB at 512 px, as one) become initializers, so that they go to
    the shared weight file instead of into every variant graph. Returns how many."""
    gs = _gs()
    n = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or "value" not in node.attrs or len(node.outputs) != 1:
            continue
        value = node.attrs["value"]
        if not isinstance(value, gs.Constant) or value.values.nbytes < min_bytes:
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name + "_initializer", value.values)
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        for i, t in enumerate(graph.outputs):
            if t is out:  # a graph output cannot be an initializer: leave this one
                break
        else:
            node.outputs.clear()
            n += 1
    return n


def group_activation_scales(plan: Plan, scales: Mapping[str, Any], report: Mapping[str, LayerLowering],
                            group: int) -> dict[str, np.float32]:
    """Initializer name -> activation scale (and activation shift) of timestep group `group`:
    the scalars in which the variants of a graph differ."""
    out = {}
    for m, rep in report.items():
        if rep.input_scale is not None:
            out[rep.input_scale] = _act_scale(float(_np(scales[f"{m}.a_amax"])[group]))
        if rep.input_shift is not None:
            out[rep.input_shift] = np.float32(_np(scales[f"{m}.a_shift"])[group])
    return out


def graph_of_group(files: list[str], group: int) -> str:
    """The graph file of `write_variants` that runs timestep group `group` (the only one where
    the graph carries every group's scales)."""
    return files[group] if len(files) > 1 else files[0]


def variant_file(name: str, group: int, n_groups: int) -> str:
    return f"{name}.onnx" if n_groups == 1 else f"{name}.g{group}.onnx"


def write_variants(model: onnx.ModelProto, plan: Plan, scales: Mapping[str, Any], target: str,
                   out_dir: Path, name: str, fold_smoothing: bool = True
                   ) -> tuple[list[str], str, dict[str, LayerLowering]]:
    """One lowered graph per timestep group in `out_dir` (one graph for all groups on a
    target with `scales_in_graph`), all pointing at ONE external weight file
    `<name>.weights`, written once with group 0; the other groups' graphs are group 0's with
    other activation-scale initializers (inline scalars, the only inline initializers) and
    the same external references (location, offset, length). Returns (graph files, weight
    file, report)."""
    out_dir = Path(out_dir)
    weights = f"{name}.weights"
    k = 1 if scales_in_graph(target) else len(plan.timestep_groups)
    lowered, report = lower(model, plan, scales, target, 0, fold_smoothing)
    files = [variant_file(name, g, k) for g in range(k)]
    # Every initializer but the activation scales goes to the shared file (even small
    # biases: inline they would be copied into every variant graph).
    act = set(group_activation_scales(plan, scales, report, 0)) if k > 1 else set()
    keep = [t for t in lowered.graph.initializer if t.name in act]
    rest = [t for t in lowered.graph.initializer if t.name not in act]
    del lowered.graph.initializer[:]
    lowered.graph.initializer.extend(rest)
    (out_dir / weights).unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(lowered, str(out_dir / files[0]), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=weights, size_threshold=0)
    del lowered, rest
    os.chmod(out_dir / weights, 0o644)  # onnx creates it private; a bundle is meant to be copied
    base = onnx.load(str(out_dir / files[0]), load_external_data=False)
    base.graph.initializer.extend(keep)
    onnx.save_model(base, str(out_dir / files[0]))
    inits = {t.name: t for t in base.graph.initializer}
    for g in range(1, k):
        for init_name, value in group_activation_scales(plan, scales, report, g).items():
            t = inits[init_name]
            if t.data_location == TensorProto.EXTERNAL:
                raise QdqError(f"{init_name}: an activation scale went to the external file")
            t.CopyFrom(onnx.numpy_helper.from_array(np.array(value, np.float32), init_name))
        onnx.save_model(base, str(out_dir / files[g]))
    return files, weights, report


def external_initializers(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """{name, data_type, dims, location, offset, length} of every initializer stored in an
    external file (what the runtime maps once and hands to every variant session)."""
    out = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        out.append({"name": t.name, "data_type": onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
                    if t.data_type not in (TensorProto.INT4, TensorProto.UINT4) else
                    onnx.helper.tensor_dtype_to_string(t.data_type),
                    "dims": [int(d) for d in t.dims], "location": info["location"],
                    "offset": int(info.get("offset", 0)), "length": int(info["length"])})
    return out


# --- target rules ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str
    op: str
    rule: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.op}): {self.rule}"


def _init_array(t: onnx.TensorProto, base_dir: Path | None) -> np.ndarray | None:
    if t.data_location == TensorProto.EXTERNAL:
        if base_dir is None:
            return None
        t = onnx.TensorProto.FromString(t.SerializeToString())
        from onnx.external_data_helper import load_external_data_for_tensor

        load_external_data_for_tensor(t, str(base_dir))
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return None
    return onnx.numpy_helper.to_array(t)


def _k_axis_of(consumer: onnx.NodeProto) -> int:
    if consumer.op_type == "Gemm":
        tb = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 1 if tb else 0
    return 0


def _out_axis_of(consumer: onnx.NodeProto, rank: int) -> int:
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "Gemm":
        tb = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if tb else 1
    return rank - 1


def check_model(model: onnx.ModelProto, target: str, base_dir: Path | None = None) -> list[Violation]:
    """The nodes of `model` that break `target`'s rules (DESIGN §3):

    all targets: Q/DQ scales constant, finite, > 0; zero points constant, all 0, signed (S8 /
    S4: symmetric; ONNX Runtime CPU's recommended S8S8); activations per tensor; a Q feeds
    only DQs; INT4 only as packed data of a weight DQ with one blocked axis (K) feeding a
    MatMul/Gemm (no INT4 Conv), opset >= 21; per-channel weight scales on the output-channel
    axis; a DQ output feeds only MatMul/Gemm/Conv (outputs stay in high precision).
    ort-cpu also: an int8 weight DQ needs a quantized activation on the same MatMul/Gemm
    (else it does not fuse and runs slower than FP32) and values within +-64 (the 7-bit grid
    that MLAS's U8S8 kernel sums without overflow; checked where the data is readable); no
    QDQ Conv (CPU Conv runs fp32; a DQ
    Conv only fuses with a quantized output); QDQ Gemm without a float bias; INT4 DQ on axis 0
    with a power-of-two block >= 16 feeding a MatMul (MatMulNBits); the integer form of
    `integer_matmuls`: a QuantizeLinear may take its scale from a Gather of a constant
    per-group table and feed a MatMulInteger, whose weight is constant INT8 on the 7-bit grid,
    A zero point UINT8 (constant, or Gather'ed from a per-group table: 128 is the symmetric
    int8 grid shifted, 128 - k an activation shift of k steps) and weight zero point 0 (a
    MatMulInteger is a violation on trt).
    """
    if target not in TARGETS:
        raise QdqError(f"target: {target!r} is not one of {', '.join(TARGETS)}")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {o: n for n in g.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    out: list[Violation] = []

    def bad(node, rule):
        out.append(Violation(node.name or f"<{node.op_type} -> {node.output[0]}>", node.op_type, rule))

    def const_array(name):
        if name in inits:
            return _init_array(inits[name], base_dir)
        if name in consts:
            return onnx.numpy_helper.to_array(next(a.t for a in consts[name].attribute if a.name == "value"))
        return None

    def is_const(name):
        return name in inits or name in consts

    def dtype(name):
        if name in inits:
            return inits[name].data_type
        if name in consts:
            return next(a.t for a in consts[name].attribute if a.name == "value").data_type
        return None

    def uint8_table(name):
        """The constant table of a per-group uint8 zero point (ort-cpu), else None."""
        p = producers.get(name)
        if (target == "ort-cpu" and p is not None and p.op_type == "Gather" and is_const(p.input[0])
                and dtype(p.input[0]) == TensorProto.UINT8):
            return p.input[0]
        return None

    signed = (TensorProto.INT8, TensorProto.INT4)
    for n in g.node:
        if n.op_type not in QDQ_OPS:
            continue
        attrs = {a.name: a for a in n.attribute}
        scale_name = n.input[1] if len(n.input) > 1 else ""
        zp_name = n.input[2] if len(n.input) > 2 else ""
        by_group = producers.get(scale_name)
        per_group = (target == "ort-cpu" and n.op_type == "QuantizeLinear" and by_group is not None
                     and by_group.op_type == "Gather" and is_const(by_group.input[0]))
        if not is_const(scale_name) and not per_group:
            bad(n, "scale is not a constant initializer" + (
                "" if target != "ort-cpu" else " (or one of a constant per-group table, Gather'ed)"))
            continue
        s = const_array(by_group.input[0] if per_group else scale_name)
        if s is not None and not (np.all(np.isfinite(s)) and np.all(s > 0)):
            bad(n, "scale must be finite and > 0")
        data_name = n.input[0]
        weight = n.op_type == "DequantizeLinear" and is_const(data_name)
        data_type = dtype(data_name) if weight else None
        if zp_name:
            zp_table = uint8_table(zp_name)
            if not is_const(zp_name) and zp_table is None:
                bad(n, "zero point is not a constant" + (
                    "" if target != "ort-cpu" else " (or one of a constant per-group UINT8 table)"))
            elif zp_table is None:
                zt = dtype(zp_name)
                z = const_array(zp_name)
                if zt == TensorProto.UINT8 and target == "ort-cpu":
                    pass  # the int8 grid shifted: 128, or 128 - k for an activation shift
                elif zt not in signed:
                    bad(n, f"zero point type {onnx.helper.tensor_dtype_to_string(zt)} is not signed "
                        "(symmetric S8/S4 quantization needs INT8/INT4, zero point 0)")
                elif z is not None and np.any(z != 0):
                    bad(n, "nonzero zero point (quantization must be symmetric)")
        elif n.op_type == "QuantizeLinear":
            od = attrs.get("output_dtype")
            if od is None or od.i not in signed:
                bad(n, "QuantizeLinear without a zero point produces UINT8: give an INT8 zero point 0")
        elif weight and data_type not in signed:
            bad(n, "weight data without a zero point must be INT8 or INT4")
        block = attrs["block_size"].i if "block_size" in attrs else 0
        axis = attrs["axis"].i if "axis" in attrs else 1
        nscale = 1 if s is None or per_group else int(np.size(s))
        if n.op_type == "QuantizeLinear":
            if nscale != 1 and not is_const(data_name):
                bad(n, f"activation quantized with {nscale} scales: activations must be per tensor")
            readers = ("DequantizeLinear", "MatMulInteger") if target == "ort-cpu" else ("DequantizeLinear",)
            for c in consumers.get(n.output[0], []):
                if c.op_type not in readers:
                    bad(n, f"QuantizeLinear output feeds {c.op_type} {c.name}, not a "
                        + " or ".join(readers))
            continue
        # DequantizeLinear
        users = consumers.get(n.output[0], [])
        for c in users:
            if c.op_type not in LAYER_OPS:
                bad(n, f"dequantized tensor feeds {c.op_type} {c.name}: quantize only the inputs "
                    "of MatMul/Gemm/Conv (outputs and other ops stay in high precision)")
        if not weight:
            if nscale != 1:
                bad(n, f"activation dequantized with {nscale} scales: activations must be per tensor")
            if block:
                bad(n, "blocked DequantizeLinear on an activation")
            if target == "ort-cpu":
                for c in users:
                    if c.op_type == "Conv":
                        bad(c, "QDQ Conv: ONNX Runtime CPU runs Conv in fp32 (a DQ->Conv without a "
                            "quantized output does not fuse and is slower than FP32)")
            continue
        # a weight DequantizeLinear
        wt = inits.get(data_name)
        rank = len(wt.dims) if wt is not None else 0
        is4 = data_type in (TensorProto.INT4, TensorProto.UINT4)
        if wt is not None and is4 and wt.HasField("raw_data") and wt.data_location != TensorProto.EXTERNAL:
            numel = int(np.prod(wt.dims)) if len(wt.dims) else 1
            if len(wt.raw_data) != (numel + 1) // 2:
                bad(n, f"INT4 data of {numel} values takes {len(wt.raw_data)} bytes, packed is "
                    f"{(numel + 1) // 2}")
        if (is4 or block) and opset < MIN_OPSET:
            bad(n, f"INT4 / blocked DequantizeLinear needs opset {MIN_OPSET}, the graph has {opset}")
        for c in users:
            if list(c.input).index(n.output[0]) != 1 and c.op_type in LAYER_OPS:
                bad(n, f"constant DequantizeLinear feeds input 0 of {c.op_type} {c.name} (weights are input 1)")
            if is4 and c.op_type == "Conv":
                bad(n, f"INT4 weight on Conv {c.name}: 4-bit convolution is not supported (use W8)")
        gemms = [c for c in users if c.op_type in ("MatMul", "Gemm")]
        if is4 or block:
            if not is4:
                bad(n, "block quantization is only for INT4 weights")
            if not block:
                bad(n, "INT4 weight without block_size: INT4 must be blockwise with one blocked axis")
            if rank != 2:
                bad(n, f"blocked weight must be 2-D, got rank {rank}")
            if s is not None and np.ndim(s) != rank:
                bad(n, f"blocked scale must have the weight's rank ({rank}), got {np.ndim(s)}")
            for c in gemms:
                ka = _k_axis_of(c)
                if block and axis % max(rank, 1) != ka:
                    bad(n, f"blocked axis {axis} is not the K axis ({ka}) of {c.op_type} {c.name}")
            if target == "ort-cpu" and is4:
                if axis != 0 or block < 16 or block & (block - 1):
                    bad(n, f"MatMulNBits needs axis 0 and a power-of-two block >= 16 (axis {axis}, "
                        f"block {block})")
                for c in users:
                    if c.op_type != "MatMul":
                        bad(n, f"INT4 weight feeds {c.op_type} {c.name}: ONNX Runtime fuses only "
                            "DQ(int4)->MatMul into MatMulNBits")
        else:
            if nscale != 1:
                for c in users:
                    if c.op_type not in LAYER_OPS:
                        continue
                    oa = _out_axis_of(c, rank)
                    if axis % max(rank, 1) != oa:
                        bad(n, f"per-channel weight scale on axis {axis}; the output channel of "
                            f"{c.op_type} {c.name} is axis {oa}")
                    elif wt is not None and nscale != wt.dims[oa]:
                        bad(n, f"{nscale} weight scales for {wt.dims[oa]} output channels")
            if target == "ort-cpu" and gemms and data_type == TensorProto.INT8:
                q = const_array(data_name)
                if q is not None and q.size and int(np.abs(q.astype(np.int16)).max()) > 64:
                    bad(n, BEYOND_7_BITS)
            if target == "ort-cpu":
                for c in gemms:
                    x = c.input[0]
                    px = producers.get(x)
                    if px is None or px.op_type != "DequantizeLinear" or is_const(px.input[0]):
                        bad(c, "int8 weight with a float activation: ONNX Runtime CPU does not fuse "
                            "it (weight-only int8 runs slower than FP32)")
                    if c.op_type == "Gemm" and len(c.input) > 2 and c.input[2]:
                        pb = producers.get(c.input[2])
                        if pb is None or pb.op_type != "DequantizeLinear":
                            bad(c, "QDQ Gemm with a float bias does not fuse into QGemm: "
                                "no bias (Add after it) or an int32 DQ bias")
    for n in g.node:
        if n.op_type != "MatMulInteger":
            continue
        if target != "ort-cpu":
            bad(n, "MatMulInteger is the ONNX Runtime CPU form: TensorRT takes Q/DQ around a MatMul")
            continue
        a, b = n.input[0], n.input[1]
        pa = producers.get(a)
        if pa is None or pa.op_type != "QuantizeLinear":
            bad(n, "input A is not a QuantizeLinear output")
        if not is_const(b) or dtype(b) != TensorProto.INT8:
            bad(n, "input B must be a constant INT8 weight")
        else:
            q = const_array(b)
            if q is not None and q.size and int(np.abs(q.astype(np.int16)).max()) > 64:
                bad(n, BEYOND_7_BITS)
        za = n.input[2] if len(n.input) > 2 else ""
        if not za or (uint8_table(za) is None and (not is_const(za) or dtype(za) != TensorProto.UINT8)):
            bad(n, "A zero point must be UINT8, a constant or one of a constant per-group table "
                "(128: the symmetric int8 grid shifted; 128 - k: an activation shift)")
        zb = n.input[3] if len(n.input) > 3 else ""
        z = const_array(zb) if zb and is_const(zb) else None
        if zb and (not is_const(zb) or (z is not None and np.any(z != 0))):
            bad(n, "nonzero weight zero point (quantization must be symmetric)")
    return out


BEYOND_7_BITS = ("int8 weight beyond +-64: ONNX Runtime's U8S8 kernel overflows its int16 pair "
                 "sums on AVX2 CPUs without VNNI (ort-cpu weights are 7-bit)")


def check_file(path: Path, target: str) -> list[Violation]:
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model, target, base_dir=path.parent)


# --- what ONNX Runtime makes of a graph --------------------------------------------------


def ort_optimized_nodes(path: Path, threads: int = 1,
                        session_config: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(op_type, name) of every node of the graph as ONNX Runtime's CPU provider runs it
    (`SessionOptions.optimized_model_filepath`, all optimizations)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(opt)
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "optimized.weights")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    "1024")
        for k, v in (session_config or {}).items():
            so.add_session_config_entry(k, v)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(str(opt), load_external_data=False)
        return [(n.op_type, n.name) for n in m.graph.node]


def ort_unfused(path: Path, threads: int = 1) -> list[Violation]:
    """Weight DequantizeLinear nodes that ONNX Runtime's CPU provider left unfused (each
    is a float dequantization per call in front of a float kernel)."""
    original = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in original.graph.initializer}
    weight_dq = {n.name for n in original.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    try:
        nodes = ort_optimized_nodes(path, threads)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        return [Violation(str(path.name), "session", f"ONNX Runtime could not create a session: "
                          f"{str(e).splitlines()[0][:300]}")]
    left = {name for op, name in nodes if op == "DequantizeLinear"}
    return ([Violation(name, "DequantizeLinear", "ONNX Runtime did not fuse this weight "
                       "DequantizeLinear into an integer kernel") for name in sorted(weight_dq & left)]
            + [Violation(name, "MatMulInteger", "ONNX Runtime did not fuse this MatMulInteger and "
                         "its scaling into MatMulIntegerToFloat") for op, name in nodes if op == "MatMulInteger"])


def describe_target_rules(target: str) -> str:
    return {"trt": "TensorRT explicit quantization", "trt-orin": "TensorRT explicit quantization (Orin)",
            "ort-cpu": "ONNX Runtime CPU integer kernels"}[target]

