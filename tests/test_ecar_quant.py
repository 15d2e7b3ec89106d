"""Quantized ECAR (issue 7, item 5): the plan machinery on both components with stages as
timesteps: statistics per stage (cached), calibration into stage groups, the PyTorch
simulation following the stage loop, every lowered stage graph against that simulation, the
bundle through the torch-free runtime, and the CLIs."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from effgen.calib.calibrate import calibrate, resolve_for_model
from effgen.calib.plan import read_plan_file
from effgen.calib.scales import load_scales
from effgen.calib.simulate import quantize_, simulated_modules
from effgen.calib.stats import collect_statistics, quantizable_modules
from effgen.exporter import qdq
from effgen.exporter.ecar_export import export_ecar_bundle
from effgen.metrics import psnr
from effgen.models import ecar as E
from effgen.runtime import Bundle, load_pipeline
from effgen.runtime.images import to_uint8

W8A8 = "samples/plans/w8a8.json"
W4A8 = "samples/plans/w4a8.json"


@pytest.fixture(scope="module")
def model():
    """ecar-tiny (3 stages, 10 classes) with every parameter nudged off its adaLN-Zero
    initialisation, so that every quantized layer changes the output."""
    m = E.load_ecar("ecar-tiny")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ecar-cache")


def test_statistics_have_one_step_per_stage_over_both_components_and_are_cached(model, cache):
    logs = []
    stats = collect_statistics(model, n_calib=6, cache=cache, progress=False, log=logs.append)
    S = model.cfg.num_stages
    assert stats.timesteps == list(range(S))
    # ar.* and head.*; the AR's input embedding runs from stage 1 on (stage 0 has no prefix),
    # so it has no statistics (a layer must run at every stage; it stays FP by default)
    assert set(stats.absmax) == set(quantizable_modules(model)) - {"ar.token_in"}
    qkv = stats.absmax["head.blocks.0.attn.qkv"]
    assert qkv.shape == (S, model.cfg.head_width) and torch.all(qkv > 0)
    assert not torch.equal(qkv[0], qkv[-1])  # the stages see different activations
    # the first stage has one token per image: every stage's row sample is cut to its size
    rows = stats.rows["ar.blocks.0.attn.qkv"]
    assert rows.shape[0] == S and rows.shape[1] >= 1
    again = collect_statistics(model, n_calib=6, cache=cache, progress=False, log=logs.append)
    assert "from cache" in logs[-1]
    assert torch.equal(again.absmax["ar.blocks.1.mlp.fc2"], stats.absmax["ar.blocks.1.mlp.fc2"])
    with pytest.raises(ValueError, match="own stage steps"):
        collect_statistics(model, n_calib=6, steps=4, cache=cache, progress=False)


def test_calibration_makes_stage_groups_and_the_simulation_follows_the_stage_loop(model, cache):
    plan, scales = calibrate(model, read_plan_file(W8A8), "trt", n_calib=6, cache=cache,
                             progress=False)
    assert plan.model == "ecar-tiny" and plan.timestep_groups == [(0, 1), (2, 2)]
    eff = plan.provenance["effective"]
    assert eff["ar.blocks.0.attn.qkv"]["w_bits"] == 8 and eff["head.blocks.1.mlp.fc2"]["a_bits"] == 8
    for fp in ("ar.token_in", "ar.blocks.0.ada", "head.blocks.1.ada", "head.t_emb.fc1", "head.out"):
        assert fp not in eff  # ECAR's default FP layers
    assert scales["head.blocks.0.attn.qkv.a_amax"].shape == (2,)
    assert "ar.blocks.1.mlp.fc1.smooth" in scales  # the plan's smoothing regexes cover ECAR too

    sim = copy.deepcopy(model)
    ctx = quantize_(sim, plan, scales)
    assert "ar.blocks.0.attn.qkv" in simulated_modules(sim)
    labels, noise = [1, 4], E.stage_noise(model.cfg, 3, 2)
    with pytest.raises(RuntimeError, match="no current timestep"):
        E.sample(sim, labels, noise)
    seen = []
    q = E.sample(sim, labels, noise, on_stage=lambda s: (ctx.set_timestep(s), seen.append(ctx.group)))
    assert seen == [0, 0, 1]
    fp = E.sample(model, labels, noise)
    db = psnr(to_uint8(q.numpy()), to_uint8(fp.numpy())).min()
    assert 25 < db < float("inf")  # quantized, and close to FP


@pytest.mark.parametrize("target,plan_file", [("trt", W8A8), ("ort-cpu", W8A8), ("ort-cpu", W4A8)])
def test_quantized_bundle_matches_the_simulation_stage_by_stage(model, tmp_path, monkeypatch,
                                                               target, plan_file):
    monkeypatch.setenv("EFFGEN_CACHE", str(tmp_path / "cache"))
    logs = []
    out = export_ecar_bundle("ecar-tiny", tmp_path / "q", ecar=model, log=logs.append,
                             quantize={"plan": plan_file, "target": target, "n_calib": 6})
    bundle = Bundle.load(out)  # every sha256, plan.json and scales.safetensors included
    plan = resolve_for_model(model, read_plan_file(out / "plan.json"))
    assert plan.timestep_groups == [(0, 1), (2, 2)]
    for comp in ("ar", "head"):
        entry = bundle.component(comp)
        quant = entry["quantization"]
        assert quant["target"] == target and quant["timestep_groups"] == [[0, 1], [2, 2]]
        assert set(quant["layers"]) == {m for m in plan.layers if m.startswith(comp + ".")}
        assert quant["plan_file_sha256"] == bundle.manifest["files"]["plan.json"]
        for v in entry["variants"]:
            assert v["sqnr_vs_simulation_db"] == "inf" or v["sqnr_vs_simulation_db"] >= 60
            path = out / v["onnx"]
            assert qdq.check_file(path, target) == []
            layers = qdq.quantized_layers(onnx.load(str(path), load_external_data=False))
            # W4 on ort-cpu is a MatMulNBits DQ weight; its per-token A8 is inside the kernel
            assert layers[f"{comp}.blocks.0.mlp.fc1"] == ("W8A8" if plan_file == W8A8 else "W4A16")
            assert f"{comp}.blocks.0.ada" not in layers
        # the quantized weights are the same bytes in every stage graph: stored once
        sizes = {(out / v["onnx"]).stat().st_size for v in entry["variants"]}
        assert max(sizes) < 100_000 and not list(out.glob(f"{comp}_stage*.weights"))
    assert any("SQNR" in line for line in logs)

    # the runtime's stage loop on the quantized graphs = the simulation's, same noise
    labels = [0, 3, 7]
    got = load_pipeline(out).generate(num_images=3, seed=5, class_label=labels, output="latents")
    scales = load_scales(out / "scales.safetensors", plan)
    sim = copy.deepcopy(model)
    ctx = quantize_(sim, plan, scales, target)
    ref = E.sample(sim, labels, E.stage_noise(model.cfg, 5, 3), on_stage=ctx.set_timestep).numpy()
    assert np.abs(got - ref).max() < 2e-3
    assert psnr(to_uint8(got), to_uint8(ref)).min() >= 45


def test_cli_quantized_ecar_export_check_and_generate(tmp_path, monkeypatch, capsys):
    from effgen import cli
    from effgen.exporter import cli as export_cli

    monkeypatch.setenv("EFFGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ecar-q"
    assert export_cli.main(["ecar-tiny", "--plan", W8A8, "--target", "ort-cpu", "--n-calib", "4",
                            "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["head"]["quantization"]["target"] == "ort-cpu"
    assert cli.main(["check", str(out)]) == 0  # with the ONNX Runtime fusion check
    assert "follow their targets' rules" in capsys.readouterr().out
    assert cli.main(["generate", str(out), "--class-label", "2", "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "000.png").is_file()
    bench = tmp_path / "bench.json"
    assert cli.main(["bench", str(out), "--images", "1", "--repeat", "2", "--threads", "1",
                     "--json", str(bench)]) == 0
    result = json.loads(bench.read_text())
    assert result["step_ms"] > 0 and result["image_ms"] > 0 and result["steps"] == 6
    assert result["weight_bytes"] > (out / "ar.weights").stat().st_size
    assert cli.main(["bench", str(out), "--profile"]) == 2
    assert "ECAR bundle has none" in capsys.readouterr().err
    # effgen calib writes plan + scales; an export from them calibrates nothing
    cal = tmp_path / "cal"
    assert cli.main(["calib", "ecar-tiny", "--plan", W8A8, "--n-calib", "4", "--out", str(cal)]) == 0
    assert "2 timestep group(s) [(0, 1), (2, 2)]" in capsys.readouterr().out
    assert export_cli.main(["ecar-tiny", "--scales", str(cal), "--out", str(tmp_path / "from-scales")]) == 0
    assert "calibrated" not in capsys.readouterr().out
    from safetensors.torch import load_file

    ours, theirs = load_file(cal / "scales.safetensors"), load_file(tmp_path / "from-scales" / "scales.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # a clean one-line error, nothing left on disk
    assert export_cli.main(["ecar-tiny", "--plan", W8A8, "--calib-steps", "3",
                            "--out", str(tmp_path / "bad")]) == 2
    assert "own stage steps" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_mixed_precision_plan_for_ecar_allocates_both_components_and_exports(model, tmp_path,
                                                                            monkeypatch):
    """`effgen plan`'s machinery on ECAR: sensitivities from the stage loop's final images
    (the default metric, every layer), and with MixDQ's split from replaying the captured
    ar/head calls (SQNR) and the final images (SSIM, the FFN `.mlp.` layers); an ILP plan at
    4.5 weight bits over both components, which exports and checks."""
    from effgen.calib.allocate import DEFAULT_TECHNIQUES, plan_model
    from effgen.calib.sensitivity import allocatable_layers, measure_sensitivity

    monkeypatch.setenv("EFFGEN_CACHE", str(tmp_path / "cache"))
    plan, sens, result = plan_model(model, weight_bits=4.5, techniques=dict(DEFAULT_TECHNIQUES),
                                    target="trt", n_prompts=2, n_calib=4, progress=False)
    layers = allocatable_layers(model)
    assert {n.split(".")[0] for n in layers} == {"ar", "head"} and "ar.blocks.0.ada" in layers
    assert set(sens.family.values()) == {"quality"} and sens.meta["quality_metric"] == "final_sqnr"
    assert sens.meta["sampler_timesteps"] == [0, 1, 2]  # the stages
    decoupled = measure_sensitivity(model, dict(DEFAULT_TECHNIQUES), "trt", metric="decoupled",
                                    n_prompts=2, n_calib=4, progress=False)
    assert decoupled.family["head.blocks.0.mlp.fc1"] == "content"
    assert decoupled.family["ar.blocks.1.attn.qkv"] == "quality"
    n = "ar.blocks.1.attn.qkv"  # one-call SQNR there, the final images' here
    assert decoupled.loss[n] != sens.loss[n] and decoupled.loss[n][1] > 0
    w4a16, w8a16 = (next(i for i, c in enumerate(sens.candidates) if (c.w_bits, c.a_bits) == wa)
                    for wa in ((4, 16), (8, 16)))
    for n in layers:  # every layer measured; W4 costs more than W8 at the same activations
        assert 0 <= sens.loss[n][w8a16] <= sens.loss[n][w4a16]
        assert sens.loss[n][w4a16] > 0
    modules = quantizable_modules(model)
    params = np.array([modules[n].weight.numel() for n in layers])
    bits = np.array([plan["layers"][n]["w_bits"] for n in layers])
    assert abs(float((params * bits).sum() / params.sum()) - 4.5) <= 0.05
    assert result.status == "optimal"

    path = tmp_path / "mp.json"
    path.write_text(json.dumps(plan))
    out = export_ecar_bundle("ecar-tiny", tmp_path / "mp", ecar=model, log=lambda _: None,
                             quantize={"plan": path, "n_calib": 4})
    for comp in ("ar", "head"):
        for v in Bundle.load(out).component(comp)["variants"]:
            assert qdq.check_file(out / v["onnx"], "trt") == []
            assert v["sqnr_vs_simulation_db"] == "inf" or v["sqnr_vs_simulation_db"] >= 60
