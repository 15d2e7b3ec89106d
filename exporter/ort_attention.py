"""ONNX Runtime CPU lowering of attention: softmax(q k^T * scale) v, as the TorchScript exporter
writes diffusers' scaled_dot_product_attention, becomes one com.microsoft.MultiHeadAttention.

Why: the exporter writes attention as 14 operators per layer (head Reshape/Transpose of
q, k and v, the scale split as sqrt on q and k, MatMul, Softmax, MatMul, Transpose/Reshape
back), plus 8 that compute the scale from q's shape, and ONNX Runtime's CPU provider runs
the two products as separate batched GEMMs with a [batch, heads, tokens, tokens] probability
tensor between them; its fused kernel does not write that tensor out. Measured on pixart-alpha-512's W8A8 call (`effgen bench --profile`,
2 threads, AVX-512 VNNI): its 28 self-attentions take 878 ms fused against about 1,080 ms
unfused, and attention is a third of the call once the Linear layers run in int8.

Only attention without an additive mask is fused (self-attention; PixArt's cross-attention
adds the text mask before the softmax and is left as it is). The pass is numerically the
same computation in FP32 (a test compares ONNX Runtime's outputs of both graphs). It is an
ONNX Runtime contrib operator, so it is for `--target ort-cpu` only: TensorRT's parser does
not read com.microsoft operators and fuses attention itself.
"""

from __future__ import annotations

import math

import numpy as np

MS_DOMAIN = "com.microsoft"


def _gs():
    import onnx_graphsurgeon as gs

    return gs


def _constant(tensor) -> np.ndarray | None:
    """The values of an initializer or of a Constant node's output, else None."""
    gs = _gs()
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return None if value is None else np.asarray(value.values)
    return None


def _only_producer(tensor, op: str, also_read_by: tuple[str, ...] = ()):
    """The node of type `op` that produces `tensor` when nothing else reads the tensor but
    nodes of the types `also_read_by` (which the fusion leaves without a use)."""
    readers = [n for n in tensor.outputs if n.op not in also_read_by]
    if len(tensor.inputs) != 1 or len(readers) != 1:
        return None
    node = tensor.inputs[0]
    return node if node.op == op else None


def _perm(node) -> list[int] | None:
    return list(node.attrs.get("perm", [])) if node is not None else None


def _heads(reshape) -> tuple[int, int] | None:
    """(heads, head_dim) from a head-splitting Reshape to [batch, -1, heads, head_dim]."""
    values = _constant(reshape.inputs[1])
    if values is None:
        return None
    values = values.ravel()
    if values.size != 4 or values[2] <= 0 or values[3] <= 0:
        return None
    return int(values[2]), int(values[3])


def _split_heads(tensor, perm: list[int]):
    """tensor = Transpose(perm)(Reshape(x, [b, -1, h, d])) -> (x, (h, d)), else None. The
    exporter also reads q's shape there, for the default scale."""
    transpose = _only_producer(tensor, "Transpose", also_read_by=("Shape",))
    if transpose is None or _perm(transpose) != perm:
        return None
    reshape = _only_producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    heads = _heads(reshape)
    return None if heads is None else (reshape.inputs[0], heads)


def _scale_factor(mul, head_dim: int) -> float | None:
    """The factor a q- or k-side Mul applies: a scalar constant, or the sqrt of
    scaled_dot_product_attention's default scale 1/sqrt(head_dim) as the exporter computes
    it from q's shape (Shape -> Slice -> Cast -> Sqrt -> Div(1, .) -> Cast -> Sqrt)."""
    factor = mul.inputs[1]
    values = _constant(factor)
    if values is not None:
        return float(values.ravel()[0]) if values.size == 1 else None
    sqrt = factor.inputs[0] if len(factor.inputs) == 1 else None
    chain = []
    node = sqrt
    for op in ("Sqrt", "Cast", "Div"):
        if node is None or node.op != op:
            return None
        chain.append(node)
        node = node.inputs[-1].inputs[0] if node.inputs[-1].inputs else None
    one = _constant(chain[-1].inputs[0])
    if one is None or one.size != 1 or float(one.ravel()[0]) != 1.0:
        return None
    for op in ("Sqrt", "Cast", "Slice", "Shape"):
        if node is None or node.op != op:
            return None
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    return math.sqrt(1.0 / math.sqrt(head_dim))


def _side(tensor, perm: list[int]):
    """q or k side: Mul(split_heads(x), factor) -> (x, (h, d), factor), else None."""
    mul = _only_producer(tensor, "Mul")
    if mul is None:
        return None
    found = _split_heads(mul.inputs[0], perm)
    if found is None:
        return None
    x, heads = found
    factor = _scale_factor(mul, heads[1])
    return None if factor is None else (x, heads, factor)


def fuse_attention(graph) -> int:
    """Replace every unmasked softmax(q k^T) v of the exporter's form by
    com.microsoft.MultiHeadAttention(q, k, v) on the [batch, tokens, heads * head_dim]
    projections; returns how many were fused. Call `graph.cleanup()` afterwards."""
    gs = _gs()
    fused = 0
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        if softmax.attrs.get("axis", -1) not in (-1, 3):
            continue
        scores = _only_producer(softmax.inputs[0], "MatMul")  # a mask Add in between: not fused
        probs = softmax.outputs[0]
        if scores is None or len(probs.outputs) != 1 or probs.outputs[0].op != "MatMul":
            continue
        context = probs.outputs[0]
        if context.inputs[0] is not probs:
            continue
        q = _side(scores.inputs[0], [0, 2, 1, 3])
        k = _side(scores.inputs[1], [0, 2, 3, 1])
        v = _split_heads(context.inputs[1], [0, 2, 1, 3])
        if q is None or k is None or v is None or not (q[1] == k[1] == v[1]):
            continue
        out_t = context.outputs[0]
        if len(out_t.outputs) != 1 or out_t.outputs[0].op != "Transpose" or _perm(out_t.outputs[0]) != [0, 2, 1, 3]:
            continue
        merge_t = out_t.outputs[0].outputs[0]
        if len(merge_t.outputs) != 1 or merge_t.outputs[0].op != "Reshape":
            continue
        merge = merge_t.outputs[0]
        heads, head_dim = q[1]
        merged = _constant(merge.inputs[1])
        if merged is None or merged.size != 3 or merged.ravel()[2] != heads * head_dim:
            continue  # the output must be [batch, tokens, heads * head_dim], as the fused op's
        out = merge.outputs[0]
        merge.outputs = []  # the fused node writes the merged heads' tensor itself
        graph.nodes.append(gs.Node(
            "MultiHeadAttention", softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention",
            attrs={"num_heads": heads, "scale": float(q[2] * k[2])},
            inputs=[q[0], k[0], v[0]], outputs=[out], domain=MS_DOMAIN))
        fused += 1
    return fused


def import_ms_domain(model) -> None:
    """Declare com.microsoft in `model`'s opset imports where a node uses it."""
    import onnx

    used = any(n.domain == MS_DOMAIN for n in model.graph.node)
    if used and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def with_fused_attention(model):
    """`model` (onnx.ModelProto) with `fuse_attention` applied; and how many were fused."""
    gs = _gs()
    graph = gs.import_onnx(model)
    fused = fuse_attention(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    import_ms_domain(out)
    return out, fused
