"""QDQ export: each graph pass alone on handmade graphs, the plan -> node mapping, INT4
packing, the target rule checker, what ONNX Runtime makes of the ort-cpu lowering, timestep
variants sharing one weight file, ORT vs the PyTorch simulation, and `effgen-export --plan`
end to end."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from effgen.exporter import qdq

PLANS = Path(__file__).resolve().parents[1] / "samples" / "plans"
RNG = np.random.default_rng(0)


def sqnr(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(10 * np.log10((ref ** 2).mean() / max(((ref - out) ** 2).mean(), 1e-30)))


def run(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def model_of(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, x_shape)],
                      [oh.make_tensor_value_info("y", TP.FLOAT, y_shape)], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def linear_model(k=64, n=48, t=16, bias=True, name="/blk/lin/MatMul", gemm_trans_b=False):
    """x (2, t, k) -> Linear(k, n) as the TorchScript exporter writes it: MatMul with a [K, N]
    weight + Add, or (2-D input) Gemm with transB."""
    w = RNG.standard_normal((n, k)).astype(np.float32) * 0.1  # torch layout (out, in)
    b = RNG.standard_normal(n).astype(np.float32)
    if gemm_trans_b:
        inits = [nh.from_array(w, "W"), nh.from_array(b, "b")]
        nodes = [oh.make_node("Gemm", ["x", "W", "b"], ["y"], name=name.replace("MatMul", "Gemm"), transB=1)]
        return model_of(nodes, inits, [t, k], [t, n]), w, b
    inits = [nh.from_array(np.ascontiguousarray(w.T), "W")] + ([nh.from_array(b, "b")] if bias else [])
    nodes = [oh.make_node("MatMul", ["x", "W"], ["mm" if bias else "y"], name=name)]
    if bias:
        nodes.append(oh.make_node("Add", ["mm", "b"], ["y"], name=name.replace("MatMul", "Add")))
    return model_of(nodes, inits, [2, t, k], [2, t, n]), w, (b if bias else np.zeros(n, np.float32))


def layer_of(model, module="blk.lin"):
    graph = gs.import_onnx(model)
    return graph, qdq.find_layers(graph, [module])[module]


def export(graph) -> onnx.ModelProto:
    graph.cleanup().toposort()
    m = gs.export_onnx(graph)
    m.ir_version = 10
    return m


# --- mapping -----------------------------------------------------------------------------


def test_node_scope_is_the_module_path_and_unknown_or_ambiguous_layers_fail():
    assert qdq.node_module("/transformer/transformer_blocks.0/attn1/to_out.0/MatMul") == \
        "transformer.transformer_blocks.0.attn1.to_out.0"
    m, _, _ = linear_model()
    graph = gs.import_onnx(m)
    layers = qdq.find_layers(graph, ["blk.lin"])
    assert layers["blk.lin"].op == "MatMul" and layers["blk.lin"].out_axis == 1
    assert (layers["blk.lin"].in_features, layers["blk.lin"].out_features) == (64, 48)
    with pytest.raises(qdq.QdqError, match="blk.lin2 has no MatMul.*closest: blk.lin"):
        qdq.find_layers(graph, ["blk.lin2"])
    # a MatMul of two activations in the same scope is not a layer; two weighted ones are ambiguous
    x2 = gs.Variable("x2", dtype=np.float32)
    graph.nodes.append(gs.Node("MatMul", "/blk/lin/MatMul_1", inputs=[graph.inputs[0], x2], outputs=[gs.Variable("o")]))
    assert len(qdq.all_layers(graph)["blk.lin"]) == 1
    graph.nodes.append(gs.Node("MatMul", "/blk/lin/MatMul_2",
                               inputs=[graph.inputs[0], gs.Constant("w2", np.ones((64, 4), np.float32))],
                               outputs=[gs.Variable("o2")]))
    with pytest.raises(qdq.QdqError, match="matches 2 nodes"):
        qdq.find_layers(graph, ["blk.lin"])


# --- weight passes -----------------------------------------------------------------------


def test_int4_is_packed_two_per_byte_like_onnx_make_tensor():
    q = RNG.integers(-8, 8, size=(33, 7)).astype(np.int8)  # odd count: 231 values
    t = qdq.int4_tensor("w", q)
    assert t.data_type == TP.INT4 and len(t.raw_data) == (q.size + 1) // 2 == 116
    ref = oh.make_tensor("w", TP.INT4, q.shape, q.flatten().tolist())  # packs into int32_data
    assert list(t.raw_data) == list(ref.int32_data) and len(ref.int32_data) == 116
    assert np.array_equal(nh.to_array(t).astype(np.int8), q)
    with pytest.raises(ValueError):
        qdq.pack_int4(np.array([8], np.int8))


def test_int8_per_channel_weight_dq_axis_is_the_stored_output_channel():
    x = RNG.standard_normal((2, 16, 64)).astype(np.float32)
    for trans_b in (False, True):
        m, w, b = linear_model(gemm_trans_b=trans_b)
        graph, layer = layer_of(m)
        scale = np.abs(w).max(1) / 127  # (out,) as the scales file has it
        qdq.quantize_weight(layer, 8, "per_channel", scale)
        out = export(graph)
        dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
        inits = {t.name: t for t in out.graph.initializer}
        assert oh.get_attribute_value(dq.attribute[0]) == (0 if trans_b else 1)
        assert inits[dq.input[0]].data_type == TP.INT8
        assert tuple(inits[dq.input[0]].dims) == ((48, 64) if trans_b else (64, 48))
        wq = np.clip(np.round(w / scale[:, None].astype(np.float32)), -128, 127) * scale[:, None].astype(np.float32)
        feed = x[0] if trans_b else x
        ref = feed @ wq.T + b
        assert np.abs(run(out, {"x": feed}, optimize=False) - ref).max() < 1e-4
        assert qdq.check_model(out, "trt") == []


def test_int4_blockwise_weight_is_packed_and_blocked_along_k():
    m, w, b = linear_model(k=128, n=32)
    graph, layer = layer_of(m)
    blocks = w.reshape(32, 4, 32)
    scale = np.abs(blocks).max(2) / 7  # (out, K // 32)
    qdq.quantize_weight(layer, 4, "block32", scale)
    out = export(graph)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: oh.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    data = next(t for t in out.graph.initializer if t.name == dq.input[0])
    assert data.data_type == TP.INT4 and len(data.raw_data) == 128 * 32 // 2
    wq = (np.clip(np.round(blocks / scale[:, :, None]), -8, 7) * scale[:, :, None]).reshape(32, 128)
    x = RNG.standard_normal((2, 16, 128)).astype(np.float32)
    assert np.abs(run(out, {"x": x}, optimize=False) - (x @ wq.T + b)).max() < 1e-4
    assert qdq.check_model(out, "trt") == [] and qdq.check_model(out, "ort-cpu") == []
    # a per-channel int4 weight becomes blocks that repeat the channel's scale
    graph, layer = layer_of(linear_model(k=128, n=32)[0])
    qdq.quantize_weight(layer, 4, "per_channel", np.abs(w).max(1) / 7)
    dq = next(n for n in graph.nodes if n.op == "DequantizeLinear")
    assert dq.attrs == {"axis": 0, "block_size": 128} and dq.inputs[1].values.shape == (1, 32)


def test_conv_weight_is_per_output_channel_and_never_int4():
    w = RNG.standard_normal((8, 4, 2, 2)).astype(np.float32)
    m = model_of([oh.make_node("Conv", ["x", "W"], ["y"], name="/pe/proj/Conv", strides=[2, 2])],
                 [nh.from_array(w, "W")], [1, 4, 8, 8], [1, 8, 4, 4])
    graph, layer = layer_of(m, "pe.proj")
    assert layer.kind == "conv" and layer.out_axis == 0 and layer.in_features == 4
    with pytest.raises(qdq.QdqError, match="int4 convolution"):
        qdq.quantize_weight(layer, 4, "per_channel", np.ones(8))
    qdq.quantize_weight(layer, 8, "per_channel", np.abs(w).reshape(8, -1).max(1) / 127)
    dq = next(n for n in graph.nodes if n.op == "DequantizeLinear")
    assert dq.attrs == {"axis": 0}


# --- activation passes -------------------------------------------------------------------


def test_smoothing_and_rotation_are_exact_before_quantization():
    from effgen.calib.balance import hadamard as torch_hadamard

    assert np.allclose(qdq.hadamard(64), torch_hadamard(64).numpy())
    x = RNG.standard_normal((2, 16, 64)).astype(np.float32)
    m, w, b = linear_model()
    ref = run(m, {"x": x})
    s = RNG.uniform(0.2, 5, 64).astype(np.float32)
    graph, layer = layer_of(m)
    qdq.smooth_weight(layer, s)
    h = qdq.hadamard(64)
    qdq.rotate_weight(layer, h)
    assert qdq.smooth_activation(graph, layer, s) == "mul"  # the producer is a graph input
    qdq.rotate_activation(graph, layer, gs.Constant("H", h))
    out = export(graph)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Mul", "MatMul", "MatMul", "Add"]
    assert np.abs(run(out, {"x": x}) - ref).max() < 1e-4


def _two_linears(first_quantized: bool):
    """x -> lin1 (MatMul + Add) -> lin2: lin2's smoothing can fold into lin1."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((64, 32)).astype(np.float32) * 0.2
    b1 = rng.standard_normal(64).astype(np.float32)
    w2 = rng.standard_normal((16, 64)).astype(np.float32) * 0.2
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["m1"], name="/a/lin1/MatMul"),
             oh.make_node("Add", ["m1", "b1"], ["h"], name="/a/lin1/Add"),
             oh.make_node("MatMul", ["h", "W2"], ["y"], name="/a/lin2/MatMul")]
    m = model_of(nodes, [nh.from_array(np.ascontiguousarray(w1.T), "W1"), nh.from_array(b1, "b1"),
                         nh.from_array(np.ascontiguousarray(w2.T), "W2")], [2, 8, 32], [2, 8, 16])
    graph = gs.import_onnx(m)
    layers = qdq.find_layers(graph, ["a.lin1", "a.lin2"])
    if first_quantized:
        qdq.quantize_weight(layers["a.lin1"], 8, "per_channel", np.abs(w1).max(1) / 127)
    return m, graph, layers


@pytest.mark.parametrize("first_quantized", [False, True])
def test_smoothing_folds_into_a_matmul_producer(first_quantized):
    m, graph, layers = _two_linears(first_quantized)
    x = RNG.standard_normal((2, 8, 32)).astype(np.float32)
    before = run(export(graph.copy()), {"x": x}, optimize=False)
    s = RNG.uniform(0.2, 5, 64).astype(np.float32)
    qdq.smooth_weight(layers["a.lin2"], s)
    assert qdq.smooth_activation(graph, layers["a.lin2"], s) == "folded"
    out = export(graph)
    assert "Mul" not in [n.op_type for n in out.graph.node]
    assert np.abs(run(out, {"x": x}, optimize=False) - before).max() < 1e-4
    # without folding: a Mul, same numbers
    m, graph, layers = _two_linears(first_quantized)
    qdq.smooth_weight(layers["a.lin2"], s)
    assert qdq.smooth_activation(graph, layers["a.lin2"], s, fold=False) == "mul"
    assert np.abs(run(export(graph), {"x": x}, optimize=False) - before).max() < 1e-4


def test_activation_qdq_is_per_tensor_int8_with_the_group_scale():
    m, w, b = linear_model()
    graph, layer = layer_of(m)
    qdq.quantize_weight(layer, 8, "per_channel", np.abs(w).max(1) / 127)
    qdq.quantize_activation(graph, layer, amax=2.5)
    out = export(graph)
    q = next(n for n in out.graph.node if n.op_type == "QuantizeLinear")
    inits = {t.name: nh.to_array(t) for t in out.graph.initializer}
    assert q.input[1] == "blk.lin.input_scale" and inits[q.input[1]].shape == ()
    assert inits[q.input[1]] == np.float32(2.5) / np.float32(127)
    assert inits[q.input[2]].dtype == np.int8 and inits[q.input[2]] == 0
    x = RNG.standard_normal((2, 16, 64)).astype(np.float32) * 1.5
    xs = np.float32(2.5) / np.float32(127)
    xq = np.clip(np.round(x / xs), -128, 127) * xs
    sc = (np.abs(w).max(1) / 127).astype(np.float32)
    wq = np.clip(np.round(w / sc[:, None]), -128, 127) * sc[:, None]
    assert np.abs(run(out, {"x": x}, optimize=False) - (xq @ wq.T + b)).max() < 1e-4
    assert qdq.check_model(out, "trt") == []


def with_timestep(graph):
    """The graph with a `timestep` input (what the denoiser graphs have)."""
    graph.inputs.append(gs.Variable("timestep", dtype=np.float32, shape=[2]))
    return graph


def test_gemm_and_bias_shaping_fuse_on_ort_cpu(tmp_path):
    """Gemm -> MatMul + Add; int8: Q -> MatMulInteger -> Cast -> Mul (+ 1-D bias), the per-group
    activation scale picked by the timestep input (MatMulIntegerToFloat with the bias); int4:
    DQ(int4) -> MatMul + 1-D bias (MatMulNBits)."""
    starts = [0, 500]  # two timestep groups, activation amax 3.0 and 1.5
    amax = np.array([3.0, 1.5], np.float32)
    for op, bits, fused in [("gemm", 8, "MatMulIntegerToFloat"), ("matmul", 8, "MatMulIntegerToFloat"),
                            ("gemm", 4, "MatMulNBits"), ("matmul", 4, "MatMulNBits")]:
        m, w, b = linear_model(gemm_trans_b=True) if op == "gemm" else linear_model()
        graph, layer = layer_of(m)
        qdq.gemm_to_matmul(graph, layer)
        assert layer.op == "MatMul" and layer.weight_shape() == (64, 48)
        if bits == 8:
            sc = (np.abs(w).max(1) / 63).astype(np.float32)
            qdq.quantize_weight(layer, 7, "per_channel", sc)
            assert qdq.bias_to_2d(layer)
            qdq.quantize_activation(graph, layer, float(amax[0]), "u8s8")
            tables = {"blk.lin.input_scale": amax / np.float32(127)}
            index = qdq.timestep_group_index(with_timestep(graph), [(0, 499), (500, 999)])
            assert qdq.integer_matmuls(graph, tables, index) == 1
        else:
            qdq.quantize_weight(layer, 4, "block32", np.abs(w.reshape(48, 2, 32)).max(2) / 7)
        out = export(graph)
        onnx.save(out, tmp_path / "m.onnx")
        ops = [o for o, _ in qdq.ort_optimized_nodes(tmp_path / "m.onnx")]
        assert fused in ops and not {"MatMul", "MatMulInteger", "Gemm", "DequantizeLinear", "Add"} & set(ops), \
            (op, bits, ops)
        assert qdq.check_model(out, "ort-cpu") == [] and qdq.ort_unfused(tmp_path / "m.onnx") == []
        x = RNG.standard_normal(graph.inputs[0].shape).astype(np.float32)
        if bits == 4:
            assert sqnr(x @ w.T + b, run(out, {"x": x})) > 15
            continue
        assert qdq.quantized_layers(out) == {"blk.lin": "W8A8"}
        assert [v.op for v in qdq.check_model(out, "trt")].count("MatMulInteger") == 1
        signed = copy.deepcopy(out)  # a signed A zero point is named (MLAS's U8S8 takes uint8)
        next(t for t in signed.graph.initializer if t.name == "blk.lin.input_zero_point").CopyFrom(
            nh.from_array(np.array(0, np.int8), "blk.lin.input_zero_point"))
        assert any(v.op == "MatMulInteger" and "UINT8" in v.rule for v in qdq.check_model(signed, "ort-cpu"))
        wq = np.clip(np.round(w / sc[:, None]), -64, 63) * sc[:, None]
        for t, a in zip(starts, amax):  # each group's scale, exactly the QDQ arithmetic
            xs = np.float32(a) / np.float32(127)
            xq = np.clip(np.round(x / xs), -128, 127) * xs
            feeds = {"x": x, "timestep": np.full(2, t + 7, np.float32)}
            for optimize in (True, False):  # fused kernel and the graph as written
                assert np.abs(run(out, feeds, optimize) - (xq @ wq.T + b)).max() < 1e-4


def test_ort_cpu_int8_weights_must_stay_on_the_7_bit_grid():
    """MLAS's U8S8 kernel (AVX2 without VNNI) sums u8 x s8 pairs in int16: weights beyond
    +-64 overflow it, so the checker names them on ort-cpu and the lowering never makes them."""
    m, w, _ = linear_model()
    graph, layer = layer_of(m)
    qdq.quantize_weight(layer, 8, "per_channel", np.abs(w).max(1) / 127)
    qdq.quantize_activation(graph, layer, 3.0, "u8s8")
    rules = [v.rule for v in qdq.check_model(export(graph), "ort-cpu")]
    assert len(rules) == 1 and "beyond +-64" in rules[0]
    assert qdq.check_model(export(graph), "trt") != []  # u8 activations: not for TensorRT either
    m, w, _ = linear_model()
    graph, layer = layer_of(m)
    qdq.quantize_weight(layer, 7, "per_channel", np.abs(w).max(1) / 63)
    qdq.quantize_activation(graph, layer, 3.0, "u8s8")
    assert qdq.check_model(export(graph), "ort-cpu") == []

# --- target rules ------------------------------------------------------------------------


def _bad_graph():
    """Three TensorRT violations: a per-channel activation scale, a nonzero weight zero
    point, an INT4 Conv weight."""
    k, n = 16, 8
    inits = [nh.from_array(np.full(k, 0.1, np.float32), "xs"), nh.from_array(np.zeros(k, np.int8), "xz"),
             nh.from_array(RNG.integers(-100, 100, (k, n)).astype(np.int8), "wq"),
             nh.from_array(np.full(n, 0.01, np.float32), "ws"), nh.from_array(np.full(n, 3, np.int8), "wz"),
             qdq.int4_tensor("cq", RNG.integers(-8, 8, (4, 4, 1, 1)).astype(np.int8)),
             nh.from_array(np.full(4, 0.1, np.float32), "cs")]
    nodes = [oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="act_q", axis=2),
             oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="act_dq", axis=2),
             oh.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="w_dq", axis=1),
             oh.make_node("MatMul", ["xd", "wd"], ["h"], name="/l/MatMul"),
             oh.make_node("Reshape", ["h", "shape"], ["h4"], name="reshape"),
             oh.make_node("DequantizeLinear", ["cq", "cs"], ["cd"], name="conv_w_dq", axis=0),
             oh.make_node("Conv", ["h4", "cd"], ["y"], name="/c/Conv")]
    inits.append(nh.from_array(np.array([1, 4, 4, 4], np.int64), "shape"))
    return model_of(nodes, inits, [4, 4, k], [1, 4, 4, 4])


def test_trt_rule_checker_names_each_violating_node():
    found = qdq.check_model(_bad_graph(), "trt")
    text = [str(v) for v in found]
    assert any(v.node == "act_q" and "per tensor" in v.rule for v in found), text
    assert any(v.node == "act_dq" and "per tensor" in v.rule for v in found), text
    assert any(v.node == "w_dq" and "nonzero zero point" in v.rule for v in found), text
    assert any(v.node == "conv_w_dq" and "INT4 weight on Conv /c/Conv" in v.rule for v in found), text
    assert {v.node for v in found} == {"act_q", "act_dq", "w_dq", "conv_w_dq"}, text
    assert all(str(v).startswith(f"node {v.node} (") for v in found)


# --- models: plan -> graph, ORT ops, variants, numerics ----------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """dit-tiny, pixart-tiny and the shipped pixart-ref (the model of the per-layer sample
    plan): the model, its FP graph, calibration statistics."""
    import torch

    from effgen.calib.stats import collect_statistics
    from effgen.exporter.onnx_export import export_module
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import build_denoiser, load_denoiser

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("qdq-models")
    out = {}
    for name in ("dit-tiny", "pixart-tiny", "pixart-ref"):
        d = load_denoiser(name) if name == "pixart-ref" else build_denoiser(get_spec(name))
        g = export_module(d, d.example_inputs(2), d.input_names, ["model_output"], base, name)
        stats = collect_statistics(d, n_calib=4, cache=base / "cache", progress=False)
        out[name] = (d, onnx.load(str(base / g.onnx)), stats)
    return out


def _calibrated(tiny, name, plan_file, target):
    from effgen.calib.calibrate import calibrate

    d, model, stats = tiny[name]
    raw = json.loads((PLANS / plan_file).read_text())
    plan, scales = calibrate(d, raw, target, stats=stats)
    return d, model, plan, scales


def _expected(plan, target, graph_kinds):
    from effgen.calib.targets import effective_precision

    out = {}
    for m, p in plan.quantized().items():
        e = effective_precision(p, graph_kinds[m], target)
        if not e.is_fp:  # as stored: ort-cpu's 7-bit weights are int8
            out[m] = f"W{4 if e.w_bits == 4 else 8}A{8 if e.a_bits < 16 and e.a_granularity == 'per_tensor' else 16}"
    return out


@pytest.mark.parametrize("plan_file", ["w8a8.json", "mp_w4a8_rules.json"])
@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_exactly_the_planned_layers_are_quantized(tiny, plan_file, target):
    d, model, plan, scales = _calibrated(tiny, "pixart-tiny", plan_file, target)
    lowered, report = qdq.lower(model, plan, scales, target)
    kinds = {m: ls[0].kind for m, ls in qdq.all_layers(gs.import_onnx(model)).items()}
    expected = _expected(plan, target, kinds)
    assert expected and qdq.quantized_layers(lowered) == expected
    assert set(report) == set(expected)
    assert qdq.check_model(lowered, target) == []
    # a plan layer the graph does not have is an error naming it
    broken = copy.deepcopy(plan)
    broken.layers["transformer.transformer_blocks.0.attn1.to_qq"] = broken.layers[next(iter(expected))]
    with pytest.raises(qdq.QdqError, match="to_qq has no MatMul"):
        qdq.lower(model, broken, scales, target)


def test_ort_cpu_lowering_runs_on_integer_kernels(tiny, tmp_path):
    d, model, plan, scales = _calibrated(tiny, "pixart-tiny", "mp_w4a8_rules.json", "ort-cpu")
    lowered, report = qdq.lower(model, plan, scales, "ort-cpu")
    path = tmp_path / "m.onnx"
    onnx.save(lowered, path)
    nodes = qdq.ort_optimized_nodes(path)
    w8 = [m for m, r in report.items() if r.effective.w_bits == 7]  # W8A8 runs W7A8 here
    w4 = [m for m, r in report.items() if r.effective.w_bits == 4]
    assert w8 and w4 and len(w8) + len(w4) == len(report)
    # int8: one MatMulInteger per layer in the graph, each fused (bias and scales included)
    integer = [qdq.node_module(n.name) for n in lowered.graph.node if n.op_type == "MatMulInteger"]
    assert sorted(integer) == sorted(w8)
    ops = [op for op, _ in nodes]
    assert ops.count("MatMulIntegerToFloat") == len(w8) and "MatMulInteger" not in ops
    # int4: MatMulNBits in the layer's scope, no float MatMul left there
    for m, layer in qdq.find_layers(gs.import_onnx(lowered), w4).items():
        found = {op for op, name in nodes if name.startswith(layer.scope + "/")
                 and not name.startswith((layer.scope + "/smooth/", layer.scope + "/rotate/"))}
        assert "MatMulNBits" in found and not found & {"MatMul", "Gemm"}, (m, found)
    assert "DequantizeLinear" not in ops
    assert qdq.quantized_layers(lowered).keys() == report.keys()
    assert qdq.ort_unfused(path) == []


def test_ort_cpu_has_one_graph_for_every_timestep_group(tiny, tmp_path):
    """ort-cpu: one graph whose int8 layers take their activation scale from a (K,) table by
    the timestep input's group: one ONNX Runtime session, its weights pre-packed once."""
    d, model, plan, scales = _calibrated(tiny, "dit-tiny", "w8a8.json", "ort-cpu")
    assert len(plan.timestep_groups) == 2
    files, weights, report = qdq.write_variants(model, plan, scales, "ort-cpu", tmp_path, "denoiser")
    assert files == ["denoiser.onnx"] and qdq.graph_of_group(files, 1) == "denoiser.onnx"
    g = onnx.load(str(tmp_path / files[0]))
    inits = {t.name: nh.to_array(t) for t in g.graph.initializer}
    producers = {o: n for n in g.graph.node for o in n.output}
    quantizers = [n for n in g.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    for q in quantizers:
        gather = producers[q.input[1]]
        assert gather.op_type == "Gather" and gather.input[1] == "timestep_group/index"
        table = inits[gather.input[0]]
        m = next(m for m, r in report.items() if r.input_scale == gather.input[0][:-len("_by_group")])
        expected = [np.float32(max(a, 1e-8)) / np.float32(127) for a in scales[f"{m}.a_amax"].tolist()]
        assert table.shape == (2,) and np.allclose(table, expected, rtol=1e-6)
    assert qdq.check_model(g, "ort-cpu") == [] and qdq.check_model(g, "trt") != []


def test_variants_share_one_weight_file(tiny, tmp_path):
    d, model, plan, scales = _calibrated(tiny, "dit-tiny", "w8a8.json", "trt")
    assert len(plan.timestep_groups) == 2
    files, weights, report = qdq.write_variants(model, plan, scales, "trt", tmp_path, "denoiser")
    assert files == ["denoiser.g0.onnx", "denoiser.g1.onnx"] and weights == "denoiser.weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files + [weights])
    graphs = [onnx.load(str(tmp_path / f), load_external_data=False) for f in files]
    refs = [qdq.external_initializers(g) for g in graphs]
    assert refs[0] and refs[0] == refs[1] and {r["location"] for r in refs[0]} == {weights}
    end = max(r["offset"] + r["length"] for r in refs[0])
    assert (tmp_path / weights).stat().st_size == end  # written once
    a = {t.name: nh.to_array(t) for t in graphs[0].graph.initializer if t.data_location != TP.EXTERNAL}
    b = {t.name: nh.to_array(t) for t in graphs[1].graph.initializer if t.data_location != TP.EXTERNAL}
    differ = {k for k in a if not np.array_equal(a[k], b[k])}
    # only the per-variant scalars: activation scales and the FFN outputs' activation shifts
    assert differ and differ <= ({qdq.activation_scale_name(m) for m in report}
                                 | {qdq.activation_shift_name(m) for m in report})
    assert any(k.endswith(".input_shift") for k in differ)
    assert [n for n in graphs[0].graph.node] == [n for n in graphs[1].graph.node]
    def big_constants(g):  # (e.g. the positional embedding)
        return [n.name for n in g.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value" and nh.to_array(a.t).nbytes >= 1024]

    assert big_constants(model) and not big_constants(graphs[0])


def test_ort_matches_the_simulation_for_every_sample_plan(tiny, tmp_path):
    """SQNR >= 35 dB per denoiser call, every variant (timestep group), every sample plan
    on ort-cpu (integer kernels) and trt (Q/DQ reference semantics): plans by rules on both
    tiny models, a per-layer plan (`effgen plan` output) on the model it was made for."""
    from effgen.exporter.quantized import Quantization, simulation_sqnr

    plans = sorted(p.name for p in PLANS.glob("*.json"))
    assert len(plans) >= 4
    results = {}
    for plan_file in plans:
        raw = json.loads((PLANS / plan_file).read_text())
        models = [raw["model"]] if raw.get("layers") else ["dit-tiny", "pixart-tiny"]
        for name in models:
            for target in ("ort-cpu", "trt"):
                d, model, plan, scales = _calibrated(tiny, name, plan_file, target)
                out = tmp_path / f"{name}-{plan_file}-{target}"
                out.mkdir()
                files, _, _ = qdq.write_variants(model, plan, scales, target, out, "denoiser")
                q = Quantization(plan, scales, target, "test")
                inputs = d.example_inputs(2, seed=11)
                for g in range(len(plan.timestep_groups)):
                    results[(name, plan_file, target, g)] = simulation_sqnr(
                        d, q, out / qdq.graph_of_group(files, g), inputs, g, d.input_names, threads=1)
    low = {k: round(v, 1) for k, v in results.items() if not v >= 35}
    assert not low, low



@pytest.mark.parametrize("name", ["dit-tiny", "pixart-tiny"])
def test_ort_matches_the_simulation_with_the_conditioning_layers_quantized(tiny, tmp_path, name):
    """A plan may quantize what the family keeps FP by default: the timestep/caption
    embedders and adaLN linears at W4 here, the block linears W8A8, on both targets."""
    from effgen.calib.calibrate import DEFAULT_FP, calibrate
    from effgen.calib.stats import quantizable_modules
    from effgen.exporter.quantized import Quantization, simulation_sqnr

    d, model, stats = tiny[name]
    fp_rules = DEFAULT_FP[d.spec.family]
    conditioning = [n for n in quantizable_modules(d) if any(re.fullmatch(p, n) for p in fp_rules)
                    and not re.search(r"pos_embed|proj_out", n)]
    assert conditioning
    layers = {n: {"w_bits": 4, "a_bits": 8, "w_granularity": "block32"} for n in conditioning}
    layers.update({n: {"w_bits": 8, "a_bits": 8} for n in quantizable_modules(d)
                   if ".transformer_blocks." in n and n not in conditioning})
    raw = {"format": "effgen.plan/1", "model": name, "layers": layers,
           "techniques": {"timestep_grouping": {"k": 2}, "act_scale": {"method": "minmax"}}}
    for target in ("trt", "ort-cpu"):
        plan, scales = calibrate(d, raw, target, stats=stats)
        out = tmp_path / target
        out.mkdir()
        files, _, report = qdq.write_variants(model, plan, scales, target, out, "denoiser")
        assert set(conditioning) <= set(report)
        q = Quantization(plan, scales, target, "test")
        for g in range(len(plan.timestep_groups)):
            got = simulation_sqnr(d, q, out / qdq.graph_of_group(files, g), d.example_inputs(2, seed=11),
                                  g, d.input_names, threads=1)
            assert got >= 35, (target, g, got)
        if target == "trt":
            assert qdq.check_model(onnx.load(str(out / files[0])), target) == []

def test_export_cli_ort_cpu_bundle_is_one_graph_that_generates_and_checks(
        tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """--target ort-cpu: one denoiser graph for both timestep groups, each group checked
    against the simulation, `effgen check` (rules + what ONNX Runtime fuses) clean, and the
    bundle generates."""
    from effgen.cli import main as effgen
    from effgen.exporter.cli import main as export
    from effgen.runtime.bundle import Bundle

    monkeypatch.setenv("EFFGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bundle"
    assert export(["dit-tiny", "--checkpoint", str(tiny_checkpoints["dit-tiny"]), "--plan",
                   str(PLANS / "w8a8.json"), "--target", "ort-cpu", "--out", str(out),
                   "--n-calib", "4", "--calib-steps", "4"]) == 0
    den = Bundle.load(out).component("denoiser")
    (variant,) = den["variants"]
    assert variant["onnx"] == "denoiser.onnx" and variant["timesteps"] == [0, 999]
    by_group = variant["sqnr_vs_simulation_db_by_group"]
    assert len(by_group) == len(den["quantization"]["timestep_groups"]) == 2
    assert all(v == "inf" or v >= 35 for v in by_group)
    capsys.readouterr()
    assert effgen(["check", str(out)]) == 0 and "ok: 1 graph(s)" in capsys.readouterr().out
    assert effgen(["generate", str(out), "--class-label", "3", "--steps", "3",
                   "--out", str(tmp_path / "img")]) == 0
    assert (tmp_path / "img" / "000.png").is_file()


def test_export_cli_with_plan_makes_a_bundle_that_generates_checks_and_compares(
        tiny_checkpoints, tmp_path, monkeypatch, capsys):
    from effgen.cli import main as effgen
    from effgen.exporter.cli import main as export
    from effgen.runtime.bundle import Bundle, sha256_file

    monkeypatch.setenv("EFFGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bundle"
    rc = export(["dit-tiny", "--checkpoint", str(tiny_checkpoints["dit-tiny"]), "--plan",
                 str(PLANS / "w8a8.json"), "--out", str(out), "--n-calib", "4", "--calib-steps", "4"])
    assert rc == 0
    bundle = Bundle.load(out)
    den = bundle.component("denoiser")
    q = den["quantization"]
    assert q["target"] == "trt" and len(den["variants"]) == 2
    assert [v["timesteps"] for v in den["variants"]] == q["timestep_groups"]
    assert all(v["sqnr_vs_simulation_db"] == "inf" or v["sqnr_vs_simulation_db"] >= 35 for v in den["variants"])
    assert q["scales_sha256"] == sha256_file(out / "scales.safetensors")
    layer = q["layers"]["transformer.transformer_blocks.0.ff.net.2"]
    assert layer["precision"] == "W8A8" and layer["smooth"] == "mul"
    assert q["layers"]["transformer.proj_out_2"]["precision"] == "FP"
    assert sorted(p.name for p in out.glob("*.weights")) == ["denoiser.weights", "vae_decoder.weights"]
    capsys.readouterr()
    assert effgen(["generate", str(out), "--class-label", "1", "--steps", "3", "--out", str(tmp_path / "img")]) == 0
    assert (tmp_path / "img" / "000.png").is_file()
    assert effgen(["check", str(out)]) == 0 and "ok: 2 graph(s)" in capsys.readouterr().out
    import shutil

    bad = tmp_path / "bad-bundle"
    shutil.copytree(out, bad)
    onnx.save(_bad_graph(), bad / "denoiser.g1.onnx")
    assert effgen(["check", str(bad), "--target", "trt"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "denoiser/denoiser.g1.onnx: node act_q (QuantizeLinear): activation quantized with 16 " \
        "scales: activations must be per tensor" in lines
    assert not any("denoiser.g0.onnx" in ln for ln in lines)
    # compare: ONNX Runtime's optimised graph against the Q/DQ graph run as written, on the
    # recorded calls of one image: every variant and the VAE decoder are covered.
    report = tmp_path / "compare.json"
    assert effgen(["compare", str(out), "--candidate", "ort", "--steps", "3", "--threads", "1",
                   "--min-sqnr", "40", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert {(r["component"], r["variant"]) for r in rows} == {("denoiser", 0), ("denoiser", 1),
                                                              ("vae_decoder", 0)}
    assert sum(r["calls"] for r in rows if r["component"] == "denoiser") == 3
    capsys.readouterr()
    assert effgen(["compare", str(out), "--candidate", "trt"]) == 2  # no TensorRT here
    assert "the trt backend needs TensorRT" in capsys.readouterr().err
    # The runtime maps the shared weight file once for both variant sessions.
    from effgen.runtime.backends import OrtComponent

    shared = OrtComponent(bundle, "denoiser", threads=1, share_weights=True)
    alone = OrtComponent(bundle, "denoiser", threads=1, share_weights=False)
    numeric = [t for t in den["shared_initializers"] if t["data_type"] != "INT4"]
    assert numeric and set(shared.shared) == {t["name"] for t in numeric} and not alone.shared
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "class_labels": np.array([1, 10]), "timestep": np.full(2, 900.0, np.float32)}
    for t in (900.0, 100.0):
        assert np.array_equal(shared.run(feeds, t)["model_output"], alone.run(feeds, t)["model_output"])


def test_layers_reading_one_tensor_the_same_way_share_one_qdq(tiny, tmp_path):
    """Without smoothing, q/k/v quantize the same tensor with the same amax: one Q/DQ."""
    from effgen.calib.calibrate import calibrate
    from effgen.exporter.quantized import Quantization, simulation_sqnr

    d, model, stats = tiny["dit-tiny"]
    raw = {"format": "effgen.plan/1", "default": {"w_bits": 8, "a_bits": 8},
           "techniques": {"timestep_grouping": {"k": 2}}}
    plan, scales = calibrate(d, raw, "ort-cpu", stats=stats)
    files, _, report = qdq.write_variants(model, plan, scales, "ort-cpu", tmp_path, "denoiser")
    shared = {m: r.shares_input_with for m, r in report.items() if r.shares_input_with}
    blk = "transformer.transformer_blocks.{}.attn1.to_{}"
    assert shared == {blk.format(b, x): blk.format(b, "k") for b in (0, 1) for x in "qv"}
    g = onnx.load(str(tmp_path / files[0]), load_external_data=False)
    n_q = sum(n.op_type == "QuantizeLinear" for n in g.graph.node)
    assert n_q == len(report) - len(shared) == len(report) - 4  # q/k/v of 2 blocks: 2 Q instead of 6
    q = Quantization(plan, scales, "ort-cpu", "test")
    for i, f in enumerate(files):
        assert simulation_sqnr(d, q, tmp_path / f, d.example_inputs(2, seed=3), i, d.input_names, 1) >= 35


@pytest.mark.parametrize("name", ["dit-tiny", "pixart-tiny"])
def test_activation_shift_lowers_per_target_and_matches_the_simulation(tiny, tmp_path, name):
    """techniques.act_shift. TensorRT (zero points 0): x - z into the Q/DQ, z an inline scalar
    of each timestep variant, and z * colsum(W) after the layer's bias. ONNX Runtime CPU
    (uint8 activations): no extra node, the zero point 128 - k picked by the timestep, still
    one fused MatMulIntegerToFloat."""
    from effgen.calib.calibrate import calibrate
    from effgen.exporter.quantized import Quantization, simulation_sqnr

    d, model, stats = tiny[name]
    raw = json.loads((PLANS / "w8a8.json").read_text())
    assert raw["techniques"]["act_shift"]
    layer = "transformer.transformer_blocks.1.ff.net.2"
    scope = "/transformer/transformer_blocks.1/ff/net.2"
    for target in ("trt", "ort-cpu"):
        plan, scales = calibrate(d, raw, target, stats=stats)
        assert len(plan.timestep_groups) == 2
        out = tmp_path / target
        out.mkdir()
        files, _, report = qdq.write_variants(model, plan, scales, target, out, "denoiser")
        graphs = [onnx.load(str(out / f), load_external_data=False) for f in files]
        nodes = {n.name: n for n in graphs[0].graph.node}
        if target == "trt":
            assert report[layer].to_json()["shift"] == "sub"
            sub = nodes[f"{scope}/shift/Sub"]
            assert [n.op_type for n in graphs[0].graph.node if sub.output[0] in n.input] == ["QuantizeLinear"]
            assert nodes[f"{scope}/shift/Add"].op_type == "Add"
            z = [onnx.numpy_helper.to_array(next(t for t in g.graph.initializer
                                                 if t.name == f"{layer}.input_shift")) for g in graphs]
            assert [float(v) for v in z] == pytest.approx(scales[f"{layer}.a_shift"].tolist())
        else:
            assert report[layer].to_json()["shift"] == "zero point" and len(files) == 1
            assert not any("/shift/" in n for n in nodes)
            full = onnx.load(str(out / files[0]))
            zp = next(t for t in full.graph.initializer if t.name == f"{layer}.input_zero_point_by_group")
            steps = scales[f"{layer}.a_shift"] / (scales[f"{layer}.a_amax"] / 127)
            assert onnx.numpy_helper.to_array(zp).tolist() == (128 - steps.round()).int().tolist()
            assert (steps.round() != 0).all()
            ops = [op for op, n in qdq.ort_optimized_nodes(out / files[0]) if n.startswith(scope)]
            assert "MatMulIntegerToFloat" in ops and "MatMulInteger" not in ops
        assert qdq.check_model(onnx.load(str(out / files[0])), target) == []
        q = Quantization(plan, scales, target, "test")
        for g in range(len(plan.timestep_groups)):
            got = simulation_sqnr(d, q, out / qdq.graph_of_group(files, g), d.example_inputs(2, seed=11),
                                  g, d.input_names, threads=1)
            assert got >= 35, (target, g, got)
