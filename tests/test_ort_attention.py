"""ONNX Runtime CPU attention lowering (exporter/ort_attention.py): the exporter's
softmax(q k^T) v becomes com.microsoft.MultiHeadAttention on ort-cpu, with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from effgen.exporter import qdq
from effgen.exporter.ort_attention import MS_DOMAIN, fuse_attention, with_fused_attention

PLANS = Path(__file__).resolve().parents[1] / "samples" / "plans"


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def fp_graphs(tmp_path_factory):
    """The FP graphs of dit-tiny and pixart-tiny as effgen-export writes them, with feeds."""
    import torch

    from effgen.exporter.onnx_export import export_module
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import build_denoiser

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("attention")
    out = {}
    for name in ("dit-tiny", "pixart-tiny"):
        d = build_denoiser(get_spec(name))
        inputs = d.example_inputs(2)
        g = export_module(d, inputs, d.input_names, ["model_output"], base, name)
        feeds = {k: v.numpy() for k, v in zip(d.input_names, inputs)}
        out[name] = (d, onnx.load(str(base / g.onnx)), feeds)
    return out


def _attention_ops(model: onnx.ModelProto) -> dict[str, int]:
    ops = [n.op_type for n in model.graph.node]
    return {op: ops.count(op) for op in ("MultiHeadAttention", "Softmax")}


@pytest.mark.parametrize("name", ["dit-tiny", "pixart-tiny"])
def test_self_attention_fuses_and_gives_the_same_outputs(fp_graphs, name):
    d, model, feeds = fp_graphs[name]
    layers = d.spec.transformer["num_layers"]
    fused, n = with_fused_attention(model)
    # every block's self-attention; PixArt's cross-attention adds the text mask before its
    # softmax and stays as it was
    assert n == layers
    assert _attention_ops(fused) == {"MultiHeadAttention": layers,
                                     "Softmax": layers if name == "pixart-tiny" else 0}
    heads = d.spec.transformer["num_attention_heads"]
    head_dim = d.spec.transformer["attention_head_dim"]
    for node in fused.graph.node:
        if node.op_type == "MultiHeadAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert node.domain == MS_DOMAIN and attrs["num_heads"] == heads
            assert attrs["scale"] == pytest.approx(head_dim ** -0.5, rel=1e-6)
            assert "/attn1/" in node.name
    assert any(op.domain == MS_DOMAIN for op in fused.opset_import)
    onnx.checker.check_model(fused)
    ref, out = run(model, feeds), run(fused, feeds)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_attention_of_another_form_is_left_alone(fp_graphs):
    """A q-side scale that is not a scalar (or any other deviation from the exporter's form)
    is not fused: the pass only rewrites what it can prove is plain attention."""
    _, model, _ = fp_graphs["dit-tiny"]
    graph = gs.import_onnx(model)
    softmax = [n for n in graph.nodes if n.op == "Softmax"][0]
    q_mul = softmax.inputs[0].inputs[0].inputs[0].inputs[0]
    assert q_mul.op == "Mul"
    q_mul.inputs[1] = gs.Constant("not_a_scalar", np.full((2,), 0.5, np.float32))
    assert fuse_attention(graph) == 1  # the other block's


@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_lowering_fuses_attention_on_ort_cpu_only(fp_graphs, target):
    import torch

    from effgen.calib.calibrate import calibrate
    from effgen.calib.stats import collect_statistics

    torch.set_num_threads(1)
    d, model, feeds = fp_graphs["dit-tiny"]
    stats = collect_statistics(d, n_calib=2, use_cache=False, progress=False)
    plan, scales = calibrate(d, json.loads((PLANS / "w8a8.json").read_text()), target, stats=stats)
    lowered, _ = qdq.lower(model, plan, scales, target)
    fused = _attention_ops(lowered)["MultiHeadAttention"]
    assert fused == (d.spec.transformer["num_layers"] if target == "ort-cpu" else 0)
    assert qdq.check_model(lowered, target) == []
    assert np.isfinite(run(lowered, feeds)).all()
