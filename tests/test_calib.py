"""Calibration (ViDiT-Q in PyTorch): quantizer numerics, channel balancing, timestep groups,
the scales file, the statistics cache, the target table, simulated quantization of dit-tiny
and the `effgen calib` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effgen.calib import balance, quantizers as Q
from effgen.calib.plan import FORMAT, FP, LayerPrecision, PlanError, check_timestep_groups, resolve_plan
from effgen.calib.scales import ScalesError, load_scales, plan_hash, save_scales
from effgen.calib.targets import effective_precision
from effgen.calib.timesteps import (group_by_tolerance, group_fixed, group_index,
                                    groups_to_ranges)

PLANS = __import__("pathlib").Path(__file__).resolve().parents[1] / "samples" / "plans"


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


# --- quantizers --------------------------------------------------------------------------


def test_int8_per_channel_weights_round_to_half_a_step():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[3] *= 20  # one large row must not hurt the others: per output channel
    scale = Q.weight_scale(w, 8)
    assert torch.allclose(scale, w.abs().amax(1) / 127)
    wq = Q.quantize_weight(w, 8)
    err = (wq - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert torch.allclose(wq.abs().amax(1), w.abs().amax(1))  # the row absmax is on the grid
    assert torch.allclose(torch.round(wq / scale[:, None]), wq / scale[:, None], atol=1e-4)
    assert sqnr_db(w[0], wq[0]) > 38  # int8 on a Gaussian row


@pytest.mark.parametrize("block", [32, 64, 128])
def test_int4_blockwise_uses_each_blocks_absmax_over_7(block):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    scale = Q.weight_scale(w, 4, f"block{block}")
    assert scale.shape == (8, 256 // block)
    blocks = w.reshape(8, 256 // block, block)
    assert torch.equal(scale, blocks.abs().amax(2) / 7)
    wq = Q.quantize_weight(w, 4, f"block{block}").reshape(8, -1, block)
    q = wq / scale[:, :, None]
    assert torch.allclose(q, torch.round(q), atol=1e-4)
    assert q.min() >= -8 - 1e-4 and q.max() <= 7 + 1e-4
    assert ((wq - blocks).abs() <= scale[:, :, None] / 2 + 1e-6).all()
    # Smaller blocks follow the data more closely than one scale per channel.
    per_channel = Q.quantize_weight(w, 4, "per_channel")
    assert (wq.reshape(8, 256) - w).pow(2).mean() < (per_channel - w).pow(2).mean()
    with pytest.raises(PlanError, match="multiple of"):
        Q.weight_scale(torch.randn(4, 48), 4, "block32")


@pytest.mark.parametrize("granularity", ["per_channel", "block32"])
def test_mse_weight_scales_clip_outliers_to_lower_the_activation_weighted_error(granularity):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=g)
    w[torch.arange(32), torch.randint(0, 128, (32,), generator=g)] *= 6  # one outlier per row
    importance = torch.rand(128, generator=g) ** 4 * 10  # a few channels meet large inputs

    def weighted_error(scale):
        return (((Q.quantize_weight(w, 4, granularity, scale) - w) ** 2) * importance).sum()

    minmax = Q.weight_scale(w, 4, granularity)
    mse = Q.weight_scale(w, 4, granularity, "mse", importance)
    assert mse.shape == minmax.shape and (mse <= minmax + 1e-7).all()
    assert (mse >= minmax * Q.CLIP_RATIOS.min() - 1e-7).all()
    assert weighted_error(mse) < 0.8 * weighted_error(minmax)
    # every row/block is at least as good as its min-max scale
    rows_mse = Q.quantize_weight(w, 4, granularity, mse)
    rows_minmax = Q.quantize_weight(w, 4, granularity, minmax)
    block = 128 if granularity == "per_channel" else 32
    err = lambda wq: (((wq - w) ** 2) * importance).reshape(32, -1, block).sum(2)  # noqa: E731
    assert (err(rows_mse) <= err(rows_minmax) + 1e-6).all()
    with pytest.raises(PlanError, match="weight_scale.method"):
        Q.weight_scale(w, 4, granularity, "gptq")


def test_per_token_dynamic_beats_per_tensor_on_tokens_of_different_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 32, generator=g) * torch.logspace(-2, 1, 64).reshape(1, 64, 1)
    tok = Q.fake_quant_per_token(x, 8)
    ten = Q.fake_quant_per_tensor(x, x.abs().max(), 8)
    # Every token keeps its own absmax exactly and its own step absmax/127.
    assert torch.allclose(tok.abs().amax(-1), x.abs().amax(-1))
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((tok - x).abs() <= step / 2 + 1e-7).all()
    assert (tok - x).pow(2).mean() < 0.1 * (ten - x).pow(2).mean()
    small = slice(0, 8)  # the per-tensor step is larger than these tokens: they vanish
    assert (ten[:, small] == 0).float().mean() > 0.9 and (tok[:, small] == 0).float().mean() < 0.1


def test_percentile_and_mse_search_clip_heavy_tails_better_than_minmax():
    g = torch.Generator().manual_seed(3)
    # Student-t with 4 degrees of freedom: a long sparse tail over a dense bulk. (With far
    # fewer values or heavier tails clipping at a percentile costs more than it saves at
    # int8; the MSE search never does worse than min-max.)
    n, df = 200_000, 4
    chi = torch.randn(n, df, generator=g).pow(2).sum(1)
    x = torch.randn(n, generator=g) / torch.sqrt(chi / df)
    mm = Q.search_amax(x, 8, "minmax")
    pct = Q.search_amax(x, 8, "percentile", percentile=99.999)
    mse = Q.search_amax(x, 8, "mse")
    assert mm == pytest.approx(float(x.abs().max()))
    assert pct < mm and mse < mm
    e_mm, e_pct, e_mse = (float(Q.quant_mse(x, a, 8)) for a in (mm, pct, mse))
    assert e_pct < 0.9 * e_mm and e_mse < 0.8 * e_mm, (e_mm, e_pct, e_mse)
    assert e_mse <= e_pct  # MSE search is the best of the three at what it optimises
    # On uniform data without outliers, min-max is already right: MSE keeps (nearly) it.
    u = torch.rand(4096, generator=g) * 2 - 1
    assert Q.search_amax(u, 8, "mse") > 0.9 * float(u.abs().max())
    with pytest.raises(PlanError, match="act_scale.method"):
        Q.search_amax(x, 8, "entropy")


# --- smoothing and rotation --------------------------------------------------------------


def _outlier_layer(seed=4):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        lin.bias.zero_()
    x = torch.randn(256, 64, generator=g)
    x[:, 5] *= 60  # one outlier channel, as in the transformer's activations
    return lin, x


def _w8a8(lin, x, s=None, h=None):
    """W8A8 per-channel/per-tensor output of `lin` on x, after optional smoothing/rotation."""
    w = lin.weight.detach()
    if s is not None:
        w, x = balance.smooth_weight(w, s), x / s
    if h is not None:
        w, x = balance.rotate_weight(w, h), x @ h
    xq = Q.fake_quant_per_tensor(x, x.abs().max(), 8)
    return torch.nn.functional.linear(xq, Q.quantize_weight(w, 8), lin.bias)


def test_smoothing_is_exact_before_quantization_and_helps_w8a8_with_an_outlier_channel():
    lin, x = _outlier_layer()
    with torch.no_grad():
        ref = lin(x)
        s = balance.smoothing_vector(x.abs().amax(0), lin.weight, alpha=0.5)
        assert s.shape == (64,) and (s > 0).all()
        w_s = balance.smooth_weight(lin.weight, s)
        assert torch.allclose(w_s, lin.weight @ torch.diag(s), atol=1e-6)
        fp = torch.nn.functional.linear(x / s, w_s, lin.bias)
        assert torch.allclose(fp, ref, rtol=1e-5, atol=1e-5)
        # s_j = max|X_j|^a / max|W_j|^(1-a)
        j = 5
        expect = x[:, j].abs().max() ** 0.5 / lin.weight[:, j].abs().max() ** 0.5
        assert s[j] == pytest.approx(float(expect), rel=1e-5)
        plain, smoothed = sqnr_db(ref, _w8a8(lin, x)), sqnr_db(ref, _w8a8(lin, x, s=s))
    assert smoothed > plain + 6, (plain, smoothed)


def test_hadamard_is_orthonormal_and_preserves_the_fp_output():
    for n in (1, 2, 32, 128):
        h = balance.hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)
        assert torch.allclose(h.abs() * n ** 0.5, torch.ones(n, n))
    lin, x = _outlier_layer(5)
    h = balance.hadamard(64)
    with torch.no_grad():
        ref = lin(x)
        rotated = torch.nn.functional.linear(x @ h, balance.rotate_weight(lin.weight, h), lin.bias)
        assert torch.allclose(rotated, ref, atol=1e-4)
        # The rotation spreads the outlier channel: W8A8 error drops too.
        assert sqnr_db(ref, _w8a8(lin, x, h=h)) > sqnr_db(ref, _w8a8(lin, x)) + 6
    with pytest.raises(PlanError, match="power of two"):
        balance.rotated_layers({"rotation": {"layers": ["ff"]}}, {"blocks.0.ff": ("linear", 96)})
    with pytest.raises(PlanError, match="convolution"):
        balance.rotated_layers({"rotation": {"layers": ["proj"]}}, {"pos_embed.proj": ("conv", 4)})


# --- timestep groups ---------------------------------------------------------------------


def test_grouping_splits_drifting_ranges_and_keeps_constant_ones_together():
    steps = 20
    timesteps = list(np.linspace(999, 0, steps).round().astype(int))
    layers = np.array([1.0, 3.0, 0.5, 8.0])
    constant = np.tile(layers, (steps, 1)) * (1 + 0.01 * np.sin(np.arange(steps)))[:, None]
    drifting = layers[None] * (1.15 ** np.arange(steps))[:, None]
    assert group_by_tolerance(constant, 0.1) == [list(range(steps))]
    groups = group_by_tolerance(drifting, 0.3)
    assert 3 <= len(groups) < steps
    assert [i for g in groups for i in g] == list(range(steps))  # contiguous, in order
    ranges = groups_to_ranges(timesteps, groups)
    assert check_timestep_groups([list(r) for r in ranges]) == ranges  # covers 0..999
    for g, idx in enumerate(sorted(groups, key=lambda g: min(timesteps[i] for i in g))):
        assert all(group_index(ranges, timesteps[i]) == g for i in idx)
    fixed = group_fixed(steps, 4)
    assert [len(g) for g in fixed] == [5, 5, 5, 5]
    r4 = groups_to_ranges(timesteps, fixed)
    assert len(r4) == 4 and r4[0][0] == 0 and r4[-1][1] == 999
    with pytest.raises(PlanError, match="k"):
        group_fixed(steps, 0)


# --- target table ------------------------------------------------------------------------


def test_effective_precision_table_for_trt_and_ort_cpu():
    w4a8 = LayerPrecision(4, 8, "block32", "per_tensor")
    w8a8_tok = LayerPrecision(8, 8, "per_channel", "per_token")
    for trt in ("trt", "trt-orin"):
        assert effective_precision(w4a8, "linear", trt) == LayerPrecision(4, 16, "block32", "per_tensor")
        assert effective_precision(w8a8_tok, "linear", trt) == LayerPrecision(8, 8, "per_channel", "per_tensor")
        assert effective_precision(w4a8, "conv", trt) == LayerPrecision(8, 8, "per_channel", "per_tensor")
    assert effective_precision(w4a8, "linear", "ort-cpu") == LayerPrecision(4, 8, "block32", "per_token")
    assert effective_precision(w8a8_tok, "linear", "ort-cpu") == LayerPrecision(7, 8)  # U8S8, 7-bit weights
    # weight-only int8 has no fused kernel on ONNX Runtime CPU: it runs FP there
    assert effective_precision(LayerPrecision(8, 16), "linear", "ort-cpu") == FP
    assert effective_precision(LayerPrecision(8, 16), "linear", "trt") == LayerPrecision(8, 16)
    assert effective_precision(LayerPrecision(8, 8), "linear", "trt") == LayerPrecision(8, 8)
    assert effective_precision(LayerPrecision(4, 16, "block64"), "linear", "trt") == LayerPrecision(4, 16, "block64")
    assert effective_precision(FP, "conv", "ort-cpu") == FP
    with pytest.raises(PlanError, match="target"):
        effective_precision(w4a8, "linear", "jetson")


# --- dit-tiny: statistics, calibration, simulation ---------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("effgen-cache")


@pytest.fixture(scope="module")
def dit_tiny():
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import build_denoiser

    return build_denoiser(get_spec("dit-tiny"))


@pytest.fixture(scope="module")
def stats(dit_tiny, cache_dir):
    from effgen.calib.stats import collect_statistics

    return collect_statistics(dit_tiny, n_calib=4, cache=cache_dir, progress=False)


def test_statistics_are_cached_and_the_second_run_does_not_call_the_model(dit_tiny, stats, cache_dir):
    from effgen.calib.stats import collect_statistics, quantizable_modules

    calls = []
    handle = dit_tiny.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        again = collect_statistics(dit_tiny, n_calib=4, cache=cache_dir, progress=False)
        assert calls == []  # from the cache
        assert again.timesteps == stats.timesteps and len(stats.timesteps) == dit_tiny.spec.steps
        for name in stats.absmax:
            assert torch.equal(again.absmax[name], stats.absmax[name])
            assert torch.equal(again.rows[name], stats.rows[name])
        # Another sampler configuration is another cache entry: the model runs.
        other = collect_statistics(dit_tiny, n_calib=4, steps=2, cache=cache_dir, progress=False)
        assert len(calls) == 2 * 1 and len(other.timesteps) == 2  # 2 steps x 1 chunk of 4
    finally:
        handle.remove()
    assert set(stats.absmax) == set(quantizable_modules(dit_tiny))
    name = "transformer.transformer_blocks.0.attn1.to_q"
    T, C = stats.absmax[name].shape
    assert (T, C) == (4, 64)
    rows = stats.rows[name]
    assert rows.shape == (4, 2048 // 64, 64)  # the budget: <= 2048 values per layer per step
    assert (rows.abs() <= stats.absmax[name][:, None, :] + 1e-6).all()
    # The largest-norm rows (for the max after a rotation) dominate every sampled row.
    top = stats.top[name]
    assert top.shape == (4, 8, 64)
    assert (top.norm(dim=2).max(dim=1).values >= rows.norm(dim=2).max(dim=1).values - 1e-5).all()
    assert (top.abs() <= stats.absmax[name][:, None, :] + 1e-6).all()
    # Any sampled row at least as long as the shortest kept top row is one of the top rows.
    for t in range(4):
        shortest = top[t].norm(dim=1).min()
        for r in rows[t][rows[t].norm(dim=1) > shortest + 1e-5]:
            assert (top[t] - r).abs().amax(dim=1).min() < 1e-6


def _plan(**kw):
    return {"format": FORMAT, "model": "dit-tiny", **kw}


def _simulated_sqnr(dit_tiny, plan, scales, target=None, t=500.0):
    import copy

    from effgen.calib.simulate import quantize_

    x = dit_tiny.example_inputs(4, seed=7)
    x = (x[0], torch.full((4,), t), x[2])
    q = copy.deepcopy(dit_tiny)
    ctx = quantize_(q, plan, scales, target)
    ctx.set_timestep(t)
    with torch.no_grad():
        return sqnr_db(dit_tiny(*x), q(*x)), q


def test_quantize_dit_tiny_w8a8_is_close_to_fp_and_w4a8_is_worse(dit_tiny, stats):
    from effgen.calib.calibrate import calibrate
    from effgen.calib.simulate import SimLinear, simulated_modules

    w8 = _plan(default={"w_bits": 8, "a_bits": 8})
    plan8, scales8 = calibrate(dit_tiny, w8, "trt", stats=stats)
    s8, q8 = _simulated_sqnr(dit_tiny, plan8, scales8)
    assert s8 > 25, s8
    sims = simulated_modules(q8)
    assert len(sims) == 12 and all(isinstance(m, SimLinear) for m in sims.values())
    assert not any(".norm1." in n or "proj_out" in n for n in sims)  # the family's FP default

    w4 = _plan(default={"w_bits": 4, "a_bits": 8, "w_granularity": "per_channel"})
    plan4, scales4 = calibrate(dit_tiny, w4, "ort-cpu", stats=stats)
    s4, _ = _simulated_sqnr(dit_tiny, plan4, scales4)
    assert s4 < s8 - 6, (s4, s8)
    # The resolved plan records what each layer runs at, and stays loadable.
    eff = plan4.provenance["effective"]["transformer.transformer_blocks.0.ff.net.2"]
    assert eff == {"w_bits": 4, "a_bits": 8, "w_granularity": "per_channel", "a_granularity": "per_token"}
    again = resolve_plan(json.loads(json.dumps(plan4.to_json())), list(plan4.layers))
    assert again.layers == plan4.layers
    # On TensorRT the same plan is weight-only int4: activations not quantized, no amax, and
    # no smoothing (it would only move activation outliers into the int4 weights).
    w4s = {**w4, "techniques": {"smoothing": {"alpha": 0.8, "layers": ["ff"]}}}
    plan4t, scales4t = calibrate(dit_tiny, w4s, "trt", stats=stats)
    assert plan4t.provenance["effective"]["transformer.transformer_blocks.0.ff.net.2"]["a_bits"] == 16
    assert not any(k.endswith(".a_amax") or k.endswith(".smooth") for k in scales4t)
    assert plan4t.provenance["smoothing"] == {}
    _, scales4o = calibrate(dit_tiny, w4s, "ort-cpu", stats=stats)
    assert sum(k.endswith(".smooth") for k in scales4o) == 4  # ff.net.0.proj, ff.net.2 x 2 blocks


def test_vidit_w8a8_plan_with_groups_smoothing_and_rotation(dit_tiny, stats):
    from effgen.calib.calibrate import calibrate
    from effgen.calib.simulate import sim_context

    raw = json.loads((PLANS / "w8a8.json").read_text())
    raw["techniques"]["rotation"] = {"layers": [r"\.ff\.net\.2$"]}
    del raw["techniques"]["act_shift"]  # a rotated layer is not shifted
    plan, scales = calibrate(dit_tiny, raw, stats=stats)
    assert plan.model == "dit-tiny" and plan.target == "trt"
    assert len(plan.timestep_groups) == 2
    check_timestep_groups([list(g) for g in plan.timestep_groups])
    name = "transformer.transformer_blocks.1.ff.net.2"
    assert scales[f"{name}.a_amax"].shape == (2,)
    assert scales[f"{name}.smooth"].shape == (256,)  # ff.net.2 reads 4 x 64 features
    assert plan.provenance["rotation"] == ["transformer.transformer_blocks.0.ff.net.2", name]
    sqnr, q = _simulated_sqnr(dit_tiny, plan, scales, t=900.0)
    assert sqnr > 25, sqnr
    # Two groups, two scale sets: the group follows the timestep.
    ctx = sim_context(q)
    ctx.set_timestep(900)
    assert ctx.current() == 1
    ctx.set_timestep(10)
    assert ctx.current() == 0
    ctx.group = None
    with pytest.raises(RuntimeError, match="on_step"):
        q(*dit_tiny.example_inputs(2))
    with pytest.raises(PlanError, match=r"layers\..*ff\.net\.0\.proj\.w_granularity: block128"):
        calibrate(dit_tiny, _plan(rules=[{"match": r"ff\.net\.0", "w_bits": 4,
                                          "w_granularity": "block128"}]), stats=stats)


def test_activation_shift_centres_a_one_sided_range_on_whole_grid_steps():
    from effgen.calib.calibrate import activation_shift
    from effgen.calib.stats import Statistics

    # Two steps; a GELU-like input (>= -0.17) in channel 0, a symmetric one in channel 1.
    hi = torch.tensor([[3.0, 0.5], [2.0, 0.5]])
    lo = torch.tensor([[-0.17, -0.5], [-0.1, -0.5]])
    stats = Statistics([900, 100], {"L": torch.maximum(hi, -lo)}, {}, {}, maximum={"L": hi},
                       minimum={"L": lo})
    amax, shift = activation_shift(stats, "L", [(0, 499), (500, 999)], 8, None)
    for g, (h, l) in enumerate([(2.0, -0.5), (3.0, -0.5)]):
        step, k = amax[g] / 127, shift[g] / (amax[g] / 127)
        assert abs(k - round(float(k))) < 1e-4 and abs(k) < 127  # whole steps: a uint8 zero point
        assert shift[g] - 128 * step <= l + 1e-6 and h <= shift[g] + 127 * step + 1e-6  # covers [lo, hi]
        assert amax[g] < 0.51 * (h + 0.5 + h)  # the grid spans the range, not twice the absmax
    # A smoothing vector divides the channels first; a symmetric range gets no shift.
    amax_s, shift_s = activation_shift(stats, "L", [(0, 999)], 8, torch.tensor([6.0, 0.5]))
    assert abs(float(shift_s[0])) < 0.02 * float(amax_s[0])  # channel 1 (+-1) sets the range
    with pytest.raises(ValueError, match="collect them again"):
        activation_shift(Statistics([1], {"L": hi}, {}, {}), "L", [(0, 999)], 8, None)


def test_act_shift_lowers_the_simulated_error_and_refuses_what_it_cannot_combine_with(dit_tiny, stats):
    from effgen.calib.calibrate import calibrate

    raw = json.loads((PLANS / "w8a8.json").read_text())
    raw["techniques"]["timestep_grouping"] = {"k": 1}
    shifted = json.loads(json.dumps(raw))
    shifted["techniques"]["act_shift"] = {"layers": [r"\.ff\.net\.2$"]}
    del raw["techniques"]["act_shift"]  # the sample plan shifts them: compare with and without
    plan, scales = calibrate(dit_tiny, raw, stats=stats)
    plan_s, scales_s = calibrate(dit_tiny, shifted, stats=stats)
    name = "transformer.transformer_blocks.0.ff.net.2"
    assert plan_s.provenance["act_shift"] == [name, "transformer.transformer_blocks.1.ff.net.2"]
    assert f"{name}.a_shift" in scales_s and f"{name}.a_shift" not in scales
    # GELU outputs are one-sided: the shifted grid is finer than the absmax grid.
    assert (scales_s[f"{name}.a_amax"] < 0.85 * scales[f"{name}.a_amax"]).all()
    # The smoothing and weights are the same; only the activation grid moved.
    assert torch.equal(scales_s[f"{name}.smooth"], scales[f"{name}.smooth"])
    sqnr, _ = _simulated_sqnr(dit_tiny, plan, scales, t=900.0)
    sqnr_s, _ = _simulated_sqnr(dit_tiny, plan_s, scales_s, t=900.0)
    assert sqnr_s > sqnr, (sqnr_s, sqnr)
    bad = json.loads(json.dumps(shifted))
    bad["techniques"]["act_scale"] = {"method": "percentile"}
    with pytest.raises(PlanError, match="min-max"):
        calibrate(dit_tiny, bad, stats=stats)
    bad = json.loads(json.dumps(shifted))
    bad["techniques"]["rotation"] = {"layers": [r"\.ff\.net\.2$"]}
    with pytest.raises(PlanError, match="rotated or BOS-aware"):
        calibrate(dit_tiny, bad, stats=stats)
    bad["techniques"] = {"act_shift": {"layers": ["no_such_layer"]}}
    with pytest.raises(PlanError, match="act_shift"):
        calibrate(dit_tiny, bad, stats=stats)


def test_scales_file_refuses_another_plans_hash(dit_tiny, stats, tmp_path):
    from effgen.calib.calibrate import calibrate, resolve_for_model

    plan, scales = calibrate(dit_tiny, _plan(default={"w_bits": 8, "a_bits": 8}), stats=stats)
    path = save_scales(tmp_path / "scales.safetensors", scales, plan)
    loaded = load_scales(path, plan)
    assert set(loaded) == set(scales) and all(torch.equal(loaded[k], scales[k]) for k in scales)
    assert load_scales(path, json.loads(json.dumps(plan.to_json()))).keys() == scales.keys()
    other = resolve_for_model(dit_tiny, _plan(default={"w_bits": 4, "a_bits": 8}))
    with pytest.raises(ScalesError) as e:
        load_scales(path, other)
    msg = str(e.value)
    assert "belongs to another plan" in msg and plan_hash(plan)[:12] in msg and "\n" not in msg


def test_cli_calib_writes_plan_and_scales_and_bad_plans_exit_2(tmp_path, stats, cache_dir, monkeypatch, capsys):
    from effgen.calib.calibrate import resolve_for_model
    from effgen.cli import main
    from effgen.models.denoiser import load_denoiser

    monkeypatch.setenv("EFFGEN_CACHE", str(cache_dir))  # the statistics of the `stats` fixture
    out = tmp_path / "calib"
    rc = main(["calib", "dit-tiny", "--plan", str(PLANS / "w8a8.json"), "--out", str(out),
               "--n-calib", "4", "--target", "ort-cpu"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "scales.safetensors"]
    raw = json.loads((out / "plan.json").read_text())
    assert raw["target"] == "ort-cpu" and raw["model"] == "dit-tiny"
    assert "statistics from cache" in capsys.readouterr().err
    plan = resolve_for_model(load_denoiser("dit-tiny"), raw)
    assert len(load_scales(out / "scales.safetensors", plan)) > 0

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_plan(layers={"transformer.transformer_blocks.0.attn1.to_qq": {}})))
    assert main(["calib", "dit-tiny", "--plan", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers: 'transformer.transformer_blocks.0.attn1.to_qq'" in err
    assert "closest: transformer.transformer_blocks.0.attn1.to_q" in err
    assert not (tmp_path / "x").exists()
    bad.write_text(json.dumps(_plan(techniques={"weight_scale": {"method": "gptq"}})))
    assert main(["calib", "dit-tiny", "--plan", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "techniques.weight_scale.method: 'gptq' is not one of minmax, mse" in err


def test_simulated_sampling_follows_the_timestep_groups_and_the_runtime_seeding():
    """sample-sim's path on a pixel-space variant of dit-tiny: images from the runtime's
    noise seeds, the sampler's on_step selecting each group's scales."""
    import copy
    import dataclasses

    from effgen.calib.calibrate import calibrate, generate_images, sample_items
    from effgen.calib.simulate import quantize_, simulated_modules
    from effgen.metrics import psnr
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import build_denoiser

    tiny = get_spec("dit-tiny")
    spec = dataclasses.replace(tiny, name="dit-tiny-pixels", latent_space=False,
                               transformer={**tiny.transformer, "in_channels": 3, "out_channels": 6})
    fp = build_denoiser(spec)
    items, attrs = sample_items(spec, 3)
    assert items == [a.class_id % 10 for a in attrs]
    raw = {"format": FORMAT, "default": {"w_bits": 8, "a_bits": 8},
           "techniques": {"timestep_grouping": {"k": 4}}}
    plan, scales = calibrate(fp, raw, "trt", n_calib=4, use_cache=False, progress=False)
    assert len(plan.timestep_groups) == 4
    q = copy.deepcopy(fp)
    ctx = quantize_(q, plan, scales)
    seen = []
    for m in simulated_modules(q).values():  # record which group each call used
        m.register_forward_pre_hook(lambda mod, a: seen.append(mod.ctx.current()))
    a = generate_images(fp, items, seed=5, progress=False)
    b = generate_images(q, items, seed=5, progress=False)
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8
    assert sorted(set(seen)) == [0, 1, 2, 3]  # every group's scales were used
    assert ctx.timestep is not None
    assert float(np.mean(psnr(a, b))) > 25
    # Image i comes from initial_noise(seed + i): the first image of seed 5 is the second of 4.
    c = generate_images(fp, [items[0]] + items[:2], seed=4, progress=False)
    assert np.array_equal(c[1:], a[:2])
