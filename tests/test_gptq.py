"""GPTQ weight rounding (calib/gptq.py): lower layer output error than nearest rounding, the
codes through the scales file, the simulation and the lowered graph unchanged, the Hessians
cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from effgen.calib.gptq import collect_hessians, dequantize_codes, gptq_codes
from effgen.calib.quantizers import quantize_weight, weight_scale

PLANS = Path(__file__).resolve().parent.parent / "samples" / "plans"


def _inputs(rows: int, seed: int, k: int = 128) -> torch.Tensor:
    """Correlated inputs with a few outlier channels (as a transformer's): rows of one fixed
    distribution, drawn with `seed`."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(123)) * 0.3 + torch.eye(k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) @ mix
    x[:, :4] *= 8
    return x


def _layer(seed: int = 0, k: int = 128, n: int = 48, rows: int = 4096):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    return _inputs(rows, seed, k), w


@pytest.mark.parametrize("granularity", ["per_channel", "block32"])
def test_gptq_lowers_the_layer_output_error_on_the_same_grid(granularity):
    x, w = _layer()
    h = x.T.double() @ x.double() / len(x)
    scale = weight_scale(w, 4, granularity, "mse", x.abs().amax(0) ** 2)
    codes = gptq_codes(w, h, 4, scale)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    ref = x @ w.T
    err_nearest = ((x @ quantize_weight(w, 4, granularity, scale).T - ref) ** 2).mean()
    err_gptq = ((x @ dequantize_codes(codes, scale, w.shape).T - ref) ** 2).mean()
    assert 10 * torch.log10(err_nearest / err_gptq) > 2.0  # dB less output error
    # held-out rows of the same distribution: the gain is not an overfit to the calibration rows
    x2 = _inputs(4096, seed=7)
    held_nearest = ((x2 @ quantize_weight(w, 4, granularity, scale).T - x2 @ w.T) ** 2).mean()
    held_gptq = ((x2 @ dequantize_codes(codes, scale, w.shape).T - x2 @ w.T) ** 2).mean()
    assert held_gptq < held_nearest


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding():
    """With H = I no column's error can be compensated by another: GPTQ = round(w / s)."""
    _, w = _layer(k=64)
    scale = weight_scale(w, 4, "block32")
    codes = gptq_codes(w, torch.eye(64), 4, scale)
    expect = torch.round(quantize_weight(w, 4, "block32", scale) / dequantize_codes(
        torch.ones_like(codes), scale, w.shape))
    assert torch.equal(codes.float(), expect)


def test_gptq_codes_go_through_scales_file_simulation_and_graph(tmp_path):
    from effgen.calib.calibrate import calibrate
    from effgen.calib.scales import load_scales, write_calibration
    from effgen.calib.simulate import quantize_, simulated_modules
    from effgen.exporter import qdq
    from effgen.exporter.onnx_export import export_module
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import build_denoiser

    d = build_denoiser(get_spec("dit-tiny"))
    raw = json.loads((PLANS / "w4a8.json").read_text())
    assert raw["techniques"]["weight_rounding"]["method"] == "gptq"
    logs = []
    plan, scales = calibrate(d, raw, "trt", n_calib=4, cache=tmp_path / "cache", progress=False,
                             log=logs.append)
    assert plan.provenance["calibration"]["weight_rounding"] == "gptq"
    name = "transformer.transformer_blocks.0.ff.net.2"
    codes = scales[f"{name}.w_codes"]
    assert codes.dtype == torch.int8 and codes.shape == d.get_submodule(name).weight.shape
    # GPTQ moved some weights off their nearest grid point
    nearest = torch.round(quantize_weight(d.get_submodule(name).weight, 4, "block32",
                                          scales[f"{name}.w_scale"])
                          / dequantize_codes(torch.ones_like(codes), scales[f"{name}.w_scale"], codes.shape))
    assert 0 < int((nearest != codes.float()).sum()) < codes.numel() // 2
    assert any("Hessians cached" in m for m in logs)
    calibrate(d, raw, "trt", n_calib=4, cache=tmp_path / "cache", progress=False, log=logs.append)
    assert any("Hessians from cache" in m for m in logs)

    write_calibration(tmp_path / "cal", plan, scales)
    loaded = load_scales(tmp_path / "cal" / "scales.safetensors", plan)
    assert loaded[f"{name}.w_codes"].dtype == torch.int8 and torch.equal(loaded[f"{name}.w_codes"], codes)

    sim = build_denoiser(get_spec("dit-tiny"))
    quantize_(sim, plan, loaded)
    simulated = simulated_modules(sim)[name].weight
    assert torch.equal(simulated, dequantize_codes(codes, scales[f"{name}.w_scale"], codes.shape))

    g = export_module(d, d.example_inputs(2), d.input_names, ["model_output"], tmp_path, "dit")
    lowered, _ = qdq.lower(onnx.load(str(tmp_path / g.onnx)), plan, loaded, "trt")
    stored = {t.name: t for t in lowered.graph.initializer}[f"{name}.weight_quantized"]
    q = onnx.numpy_helper.to_array(stored)  # INT4, [K, N] as the MatMul stores it
    np.testing.assert_array_equal(q.T, codes.numpy())


def test_hessians_are_only_for_linear_layers():
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import build_denoiser

    d = build_denoiser(get_spec("dit-tiny"))
    with pytest.raises(ValueError, match="not a Linear"):
        collect_hessians(d, ["transformer.pos_embed.proj"], n_calib=2, use_cache=False, progress=False)
