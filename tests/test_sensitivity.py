"""Layer sensitivity (calib/sensitivity.py) and `effgen plan`: one layer quantized at a time,
cached measurements, a plan that loads and meets its budget, the report, clean errors."""

import json
import re

import numpy as np
import pytest
import torch

from effgen.calib.plan import FORMAT, LayerPrecision

# Tiny settings: one prompt, two sampler steps, two calibration prompts.
FAST = ["--n-prompts", "1", "--steps", "2", "--n-calib", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("effgen-cache")


@pytest.fixture(scope="module")
def pixart_tiny():
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import build_denoiser

    return build_denoiser(get_spec("pixart-tiny"), seed=0).eval()


def test_layer_families_follow_the_rules_and_reject_bad_regexes():
    from effgen.calib.sensitivity import SensitivityError, layer_families

    names = ["t.transformer_blocks.0.attn1.to_q", "t.transformer_blocks.0.attn2.to_k",
             "t.transformer_blocks.0.ff.net.2"]
    assert layer_families(names) == {names[0]: "quality", names[1]: "content", names[2]: "content"}
    assert layer_families(names, [r"attn1"])[names[0]] == "content"
    with pytest.raises(SensitivityError, match="not a regular expression"):
        layer_families(names, ["("])


def test_quantized_alone_swaps_one_layer_and_restores_the_fp_model(pixart_tiny, cache_dir):
    from effgen.calib.calibrate import calibrate
    from effgen.calib.simulate import simulated_modules
    from effgen.calib.stats import collect_statistics

    from effgen.calib.sensitivity import _GroupGate, quantized_alone

    d = pixart_tiny
    stats = collect_statistics(d, n_calib=2, cache=cache_dir, progress=False)
    plan, scales = calibrate(d, {"format": FORMAT, "default": {"w_bits": 4, "a_bits": 8}},
                             "trt", stats=stats, progress=False)
    x = d.example_inputs(2)
    with torch.no_grad():
        fp_out = d(*x)
        layer = "transformer.transformer_blocks.1.attn1.to_v"
        with quantized_alone(d, plan, scales, layer) as ctx:
            ctx.set_timestep(500)
            assert list(simulated_modules(d)) == [layer]
            q_out = d(*x)
        with quantized_alone(d, plan, scales, layer, group=0) as ctx:
            assert isinstance(d.get_submodule(layer), _GroupGate)
        assert not simulated_modules(d) and not hasattr(d, "_effgen_sim_context")
        assert torch.equal(d(*x), fp_out)
    assert not torch.equal(q_out, fp_out)


def test_measure_sensitivity_on_pixart_tiny_is_cached_and_per_group(pixart_tiny, cache_dir, monkeypatch):
    from effgen.calib.sensitivity import allocatable_layers, measure_sensitivity
    from effgen.calib.stats import quantizable_modules

    d = pixart_tiny
    logs = []
    kw = dict(metric="decoupled", per_timestep=True, n_prompts=2, steps=4, n_calib=2,
              cache=cache_dir, progress=False)
    tech = {"timestep_grouping": {"k": 2}}
    sens = measure_sensitivity(d, tech, "trt", log=logs.append, **kw)
    # every quantizable Linear: the block linears and the conditioning layers uniform plans
    # keep FP; not the patch-embedding Conv (no INT4 convolution on TensorRT)
    assert sens.layers == allocatable_layers(d)
    assert set(quantizable_modules(d)) - set(sens.layers) == {"transformer.pos_embed.proj"}
    assert len([n for n in sens.layers if ".transformer_blocks." in n]) == 20
    assert all(any(re.search(p, n) for n in sens.layers)
               for p in (r"adaln_single\.linear$", r"proj_out", r"caption_projection"))
    assert sens.meta["content_metric"] == "final_sqnr"  # latent samples: no SSIM
    assert sens.meta["quality_metric"] == "sqnr"
    assert {sens.family[n] for n in sens.layers} == {"content", "quality"}
    labels = [(p.w_bits, p.a_bits) for p in sens.candidates]
    assert labels == [(4, 8), (4, 16), (8, 8), (8, 16)]
    for n in sens.layers:
        # On TensorRT W4A8 runs as W4A16: one measurement for both.
        assert sens.effective[n][0] == sens.effective[n][1] == LayerPrecision(4, 16, "block32")
        assert sens.loss[n][0] == sens.loss[n][1]
        assert all(v > 0 for v in sens.loss[n])
        assert np.array(sens.group_loss[n]).shape == (2, 4)
    quality = [n for n in sens.layers if sens.family[n] == "quality"]
    # 8-bit weights add far less noise than 4-bit ones.
    assert sum(sens.loss[n][3] for n in quality) < 0.1 * sum(sens.loss[n][1] for n in quality)
    # SQNR per group: the overall noise ratio lies between the groups' ones.
    n = quality[0]
    assert min(sens.group_loss[n][0][1], sens.group_loss[n][1][1]) <= sens.loss[n][1] <= \
        max(sens.group_loss[n][0][1], sens.group_loss[n][1][1])
    assert sens.act_elems["transformer.transformer_blocks.0.attn2.to_k"] == 8 * 64  # text tokens
    assert any("sensitivity cached" in m for m in logs)
    again = measure_sensitivity(d, tech, "trt", log=logs.append, **kw)
    assert any("sensitivity from cache" in m for m in logs) and again.loss == sens.loss
    other = measure_sensitivity(d, {"timestep_grouping": {"k": 1}}, "trt",
                                **{**kw, "per_timestep": False})
    assert other.meta["key"] != sens.meta["key"] and other.group_loss is None
    # another set of allocatable layers is another measurement, not a stale cache entry
    import effgen.calib.sensitivity as S

    fewer = sens.layers[:-1]
    monkeypatch.setattr(S, "allocatable_layers", lambda _d: fewer)
    subset = measure_sensitivity(d, tech, "trt", **kw)
    assert subset.layers == fewer and subset.meta["key"] != sens.meta["key"]


@pytest.mark.parametrize("model", ["pixart-tiny", "pixart-ref"])
def test_final_metric_is_the_noise_ratio_of_the_final_samples_with_the_layer_alone_quantized(
        model, pixart_tiny, cache_dir):
    """The default metric: every layer's loss is the noise/signal power of the final samples
    of the whole sampler run with that layer alone at the candidate, against FP's; for a
    pixel-space model (pixart-ref) of the images clipped to [-1, 1] as the runtime writes
    them, for a latent one (pixart-tiny) of the latents as they are."""
    from effgen.calib.calibrate import calibrate
    from effgen.calib.sensitivity import SensitivityError, measure_sensitivity, quantized_alone
    from effgen.calib.stats import CALIB_SEED, calibration_items, model_conditions
    from effgen.models.denoiser import load_denoiser
    from effgen.models.sampling import sample
    from effgen.runtime.pipeline import initial_noise

    d = pixart_tiny if model == "pixart-tiny" else load_denoiser(model)
    assert d.spec.latent_space == (model == "pixart-tiny")
    tech = {"timestep_grouping": {"k": 1}}
    kw = dict(n_prompts=2, steps=3, n_calib=2, cache=cache_dir, progress=False)
    sens = measure_sensitivity(d, tech, "trt", **kw)
    assert (sens.meta["metric"], sens.meta["quality_metric"]) == ("final", "final_sqnr")
    assert set(sens.family.values()) == {"quality"}
    decoupled = measure_sensitivity(d, tech, "trt", metric="decoupled", **kw)
    assert decoupled.meta["key"] != sens.meta["key"]

    layer = "transformer.transformer_blocks.1.attn1.to_q"  # one-call SQNR there, final here
    assert decoupled.family[layer] == "quality" and decoupled.loss[layer][1] != sens.loss[layer][1]
    spec = d.spec
    items = calibration_items(spec, 2)
    noise = initial_noise((spec.in_channels, spec.sample_size, spec.sample_size), CALIB_SEED, 2)
    cond, uncond, cmask, umask = model_conditions(d, items)

    def final(ctx=None):
        x = sample(d, noise, cond, uncond, spec.scheduler, 3, spec.guidance, cmask, umask,
                   on_step=None if ctx is None else ctx.on_step,
                   guidance_interval=spec.guidance_interval)
        return x if spec.latent_space else x.clamp(-1, 1)

    with torch.no_grad():
        ref = final()
        for c in (1, 3):  # W4A16 and W8A16, each calibrated as the measurement calibrates it
            plan, scales = calibrate(d, {"format": FORMAT, "target": "trt", "techniques": tech,
                                         "layers": {n: sens.candidates[c].to_json() for n in sens.layers}},
                                     "trt", n_calib=2, cache=cache_dir, progress=False)
            with quantized_alone(d, plan, scales, layer) as ctx:
                q = final(ctx)
            ratio = float(((q - ref) ** 2).sum() / (ref ** 2).sum())
            assert sens.loss[layer][c] == pytest.approx(ratio, rel=1e-4), sens.candidates[c]
            assert sens.metric[layer][c] == pytest.approx(-10 * np.log10(ratio), abs=1e-3)
    assert sens.loss[layer][3] < sens.loss[layer][1]
    with pytest.raises(SensitivityError, match="metric 'psnr' is not one of final, decoupled"):
        measure_sensitivity(d, tech, "trt", metric="psnr", **kw)


def _average_weight_bits(denoiser, plan):
    from effgen.calib.sensitivity import allocatable_layers
    from effgen.calib.stats import quantizable_modules

    modules = quantizable_modules(denoiser)
    layers = allocatable_layers(denoiser)
    params = np.array([modules[n].weight.numel() for n in layers])
    bits = np.array([plan.layers[n].w_bits for n in layers])
    return float((params * bits).sum() / params.sum())


def test_effgen_plan_writes_a_plan_that_loads_and_meets_the_budget_and_a_report(
        tmp_path, cache_dir, monkeypatch, capsys):
    from effgen.calib.calibrate import calibrate, resolve_for_model
    from effgen.calib.plan import read_plan_file
    from effgen.cli import main
    from effgen.models.denoiser import load_denoiser

    monkeypatch.setenv("EFFGEN_CACHE", str(cache_dir))
    out, report = tmp_path / "mp.json", tmp_path / "report"
    argv = ["plan", "pixart-ref", "--weight-bits", "4.5", "--out", str(out), "--report", str(report), *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "weight bits" in printed
    raw = read_plan_file(out)
    assert raw["format"] == FORMAT and raw["target"] == "trt"
    assert raw["techniques"]["bos_aware"] is True and raw["techniques"]["act_scale"] == {"method": "minmax"}
    prov = raw["provenance"]
    assert prov["command"] == "effgen " + " ".join(argv)
    assert prov["allocator"] == "ilp" and prov["solver_status"] == "optimal"
    # the default metric: every layer by the final images' SQNR (one family)
    assert (prov["sensitivity"]["metric"], prov["sensitivity"]["quality_metric"]) == ("final", "final_sqnr")
    assert {s["family"] for s in prov["scores"].values()} == {"quality"}
    # default activation budget: what uniform W4A8 runs at on TensorRT (weight-only INT4: 16)
    assert raw["budget"] == {"weight_bits": 4.5, "act_bits": 16.0}

    d = load_denoiser("pixart-ref")
    plan = resolve_for_model(d, raw)
    assert set(plan.layers) == set(raw["layers"])  # every module explicit
    assert abs(_average_weight_bits(d, plan) - 4.5) <= 0.05
    assert prov["achieved"]["weight_bits"] == pytest.approx(_average_weight_bits(d, plan), abs=1e-3)
    # W8 layers may be weight-only (W8A16), at no more activation bits as run than W4A8's
    assert prov["achieved"]["act_bits_effective"] <= 16.0
    assert {(p.w_bits, p.a_bits) for p in plan.quantized().values()} <= {(4, 8), (8, 8), (8, 16)}
    assert {p.w_bits for p in plan.quantized().values()} == {4, 8}
    calibrated, scales = calibrate(d, raw, stats=None, n_calib=2, progress=False)
    assert len(scales) > 0 and calibrated.techniques["bos_aware"] is True

    assert (report / "index.html").is_file()
    for png in ("sensitivity.png", "bits.png", "bytes_per_block.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in (report / "index.html").read_text()

    greedy = tmp_path / "greedy.json"
    assert main(["plan", "pixart-ref", "--weight-bits", "4.5", "--allocator", "greedy",
                 "--out", str(greedy), *FAST]) == 0
    g = json.loads(greedy.read_text())["provenance"]
    assert g["allocator"] == "greedy"
    assert g["objective"] >= prov["objective"] - 1e-9  # the ILP is optimal
    assert g["achieved"]["weight_bits"] <= 4.5 + 1e-9

    # MixDQ's metric decoupling: cross-attention and FFN by final-image SSIM, the rest by the
    # denoiser output's SQNR
    decoupled = tmp_path / "decoupled.json"
    assert main(["plan", "pixart-ref", "--weight-bits", "4.5", "--metric", "decoupled",
                 "--out", str(decoupled), *FAST]) == 0
    dp = json.loads(decoupled.read_text())["provenance"]
    assert (dp["sensitivity"]["metric"], dp["sensitivity"]["content_metric"],
            dp["sensitivity"]["quality_metric"]) == ("decoupled", "ssim", "sqnr")
    families = {n: s["family"] for n, s in dp["scores"].items()}
    assert families["transformer.transformer_blocks.0.attn2.to_k"] == "content"
    assert families["transformer.transformer_blocks.0.ff.net.2"] == "content"
    assert families["transformer.transformer_blocks.0.attn1.to_q"] == "quality"


def test_effgen_plan_infeasible_budget_is_one_line_and_writes_nothing(tmp_path, cache_dir,
                                                                      monkeypatch, capsys):
    from effgen.cli import main

    monkeypatch.setenv("EFFGEN_CACHE", str(cache_dir))
    out, report = tmp_path / "mp.json", tmp_path / "report"
    rc = main(["plan", "pixart-ref", "--weight-bits", "3", "--out", str(out), "--report", str(report), *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.endswith(": error: budget weight bits 3 is infeasible: the cheapest allowed candidates need 4\n")
    assert err.count("\n") == 1  # refused before measuring anything
    # A byte budget below the model's all-W4 size is found infeasible by the solver.
    rc = main(["plan", "pixart-ref", "--weight-mb", "0.5", "--out", str(out), "--report", str(report), *FAST])
    last = capsys.readouterr().err.splitlines()[-1]
    assert rc == 2 and re.search(r": error: budget weight MB 0.5 is infeasible: the cheapest allowed "
                                 r"candidates need 1\.\d+$", last)
    assert not out.exists() and not report.exists()
    assert not list(tmp_path.iterdir())
