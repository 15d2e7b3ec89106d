"""Export -> ONNX Runtime generation reproduces PyTorch sampling of the same model with the
same noise and scheduler."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from effgen import runtime
from effgen.metrics import psnr
from effgen.models.denoiser import load_denoiser
from effgen.models.sampling import sample, to_uint8
from effgen.runtime.pipeline import initial_noise


def torch_images(checkpoint, name, manifest, cond, uncond, steps, guidance, seed, n,
                 cond_mask=None, uncond_mask=None, guidance_interval=None):
    from diffusers import AutoencoderKL

    denoiser = load_denoiser(name, checkpoint)
    m = manifest["model"]
    noise = initial_noise((m["in_channels"], m["sample_size"], m["sample_size"]), seed, n)
    x = sample(denoiser, noise, cond, uncond, manifest["scheduler"], steps, guidance,
               cond_mask, uncond_mask, guidance_interval=guidance_interval)
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae").eval()
    with torch.no_grad():
        img = vae.decode(x / vae.config.scaling_factor).sample
    return x.numpy(), to_uint8(img)


def test_dit_bundle_matches_pytorch(tiny_bundles, tiny_checkpoints):
    bundle = tiny_bundles["dit-tiny"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["scheduler"]["name"] == "ddim"  # taken from the checkpoint's scheduler/
    assert manifest["model"]["learned_sigma"]
    labels = [3, 7]
    pipe = runtime.load_pipeline(bundle)
    latents = pipe.generate(num_images=2, seed=5, steps=6, guidance=4.0, class_label=labels,
                            output="latents")
    images = pipe.generate(num_images=2, seed=5, steps=6, guidance=4.0, class_label=labels)
    ref_latents, ref_images = torch_images(
        tiny_checkpoints["dit-tiny"], "dit-tiny", manifest, torch.tensor(labels),
        torch.tensor([10, 10]), steps=6, guidance=4.0, seed=5, n=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert images.std() > 5  # a picture, not a constant
    assert np.abs(latents - ref_latents).max() < 1e-3 * max(1.0, np.abs(ref_latents).max())
    assert min(psnr(images, ref_images)) >= 50


def test_pixart_bundle_matches_pytorch(tiny_bundles, tiny_checkpoints):
    bundle = tiny_bundles["pixart-tiny"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["scheduler"]["name"] == "dpm++2m"
    text = manifest["model"]["text"]
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((text["max_length"], text["dim"]), dtype=np.float32)
    mask = np.ones(text["max_length"], np.float32)
    mask[5:] = 0
    images = runtime.generate(bundle, prompt_embeds={"prompt_embeds": embeds,
                                                     "prompt_attention_mask": mask},
                              seed=11, steps=5, guidance=4.5)
    # Without a negative, the runtime's unconditional branch is zero states behind one token.
    umask = torch.zeros(1, text["max_length"])
    umask[:, 0] = 1
    _, ref = torch_images(tiny_checkpoints["pixart-tiny"], "pixart-tiny", manifest,
                          torch.from_numpy(embeds)[None], torch.zeros(1, *embeds.shape),
                          steps=5, guidance=4.5, seed=11, n=1,
                          cond_mask=torch.from_numpy(mask)[None], uncond_mask=umask)
    assert images.std() > 5
    assert psnr(images, ref)[0] >= 50


def test_guidance_interval_guides_only_its_steps_as_pytorch_does(tiny_bundles, tiny_checkpoints,
                                                                 tmp_path):
    """Guidance on the steps whose timestep lies in the interval, the conditional prediction
    alone on the others: ONNX Runtime agrees with the PyTorch sampler; an interval holding
    every step is plain guidance, one holding none is guidance 1; a bundle's own interval is
    its default, and a bad one is a BundleError."""
    from effgen.runtime.bundle import BundleError
    from effgen.runtime.schedulers import make_scheduler

    bundle = tiny_bundles["dit-tiny"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sampling"]["guidance_interval"] is None  # the spec guides every step
    sched = make_scheduler(manifest["scheduler"])
    sched.set_timesteps(6)
    late = (0, float(sched.timesteps[2]) - 1)  # the last three of six steps
    pipe = runtime.load_pipeline(bundle)
    kw = dict(num_images=2, seed=5, steps=6, guidance=4.0, class_label=[3, 7], output="latents")
    part = pipe.generate(guidance_interval=late, **kw)
    ref, _ = torch_images(tiny_checkpoints["dit-tiny"], "dit-tiny", manifest, torch.tensor([3, 7]),
                          torch.tensor([10, 10]), steps=6, guidance=4.0, seed=5, n=2,
                          guidance_interval=late)
    assert np.abs(part - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())

    # Two images fill the graph's two rows: a guided step takes two calls, an unguided one one.
    calls = []
    run = pipe.denoiser.run
    pipe.denoiser.run = lambda feeds, t: calls.append(t) or run(feeds, t)
    np.testing.assert_array_equal(pipe.generate(guidance_interval=late, **kw), part)
    assert len(calls) == 3 * 2 + 3
    del pipe.denoiser.run

    every = pipe.generate(**kw)
    np.testing.assert_array_equal(pipe.generate(guidance_interval=(0, 999), **kw), every)
    unguided = pipe.generate(**{**kw, "guidance": 1.0})
    np.testing.assert_array_equal(pipe.generate(guidance_interval=(1000, 2000), **kw), unguided)
    scale = np.abs(every - unguided).max()
    assert np.abs(part - every).max() > 0.01 * scale
    assert np.abs(part - unguided).max() > 0.01 * scale

    own = tmp_path / "own"
    shutil.copytree(bundle, own)
    manifest["sampling"]["guidance_interval"] = list(late)
    (own / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(runtime.load_pipeline(own).generate(**kw), part)
    manifest["sampling"]["guidance_interval"] = [500, 0]
    (own / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="guidance interval"):
        runtime.load_pipeline(own).generate(**kw)
    with pytest.raises(ValueError, match="two timesteps"):
        pipe.generate(guidance_interval=(1, 2, 3), **kw)


def test_pytorch_sampler_calls_the_model_on_the_conditional_rows_alone_outside_the_interval(
        tiny_checkpoints):
    """What calibration sees is what the runtime runs: two rows per image on the guided steps,
    one on the others."""
    from effgen.models.sampling import diffusers_scheduler

    denoiser = load_denoiser("dit-tiny", tiny_checkpoints["dit-tiny"])
    rows = []
    denoiser.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    scheduler = denoiser.spec.scheduler
    noise = initial_noise((4, 8, 8), 0, 3)
    sample(denoiser, noise, torch.tensor([1, 2, 3]), torch.full((3,), 10), scheduler, 5, 3.0,
           guidance_interval=(0, 500))
    sched = diffusers_scheduler(scheduler)
    sched.set_timesteps(5)
    assert rows == [6 if t <= 500 else 3 for t in sched.timesteps.tolist()]
    assert 3 in rows and 6 in rows


def test_image_does_not_depend_on_how_many_are_generated(tiny_bundles):
    pipe = runtime.load_pipeline(tiny_bundles["dit-tiny"])
    three = pipe.generate(num_images=3, seed=0, steps=3, class_label=[1, 2, 3])
    one = pipe.generate(num_images=1, seed=2, steps=3, class_label=3)
    np.testing.assert_array_equal(three[2], one[0])


def test_manifest_records_parity_and_hashes(tiny_bundles):
    manifest = json.loads((tiny_bundles["pixart-tiny"] / "manifest.json").read_text())
    den = manifest["components"]["denoiser"]
    assert den["max_abs_error"] <= den["tolerance"]
    assert [i["name"] for i in den["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    assert set(manifest["files"]) == {"denoiser.onnx", "denoiser.weights",
                                      "vae_decoder.onnx", "vae_decoder.weights"}
    assert manifest["model"]["resolution"] == 16  # 8x8 latents, VAE with 2x downsampling


@pytest.mark.parametrize("family", ["dit-tiny", "pixart-tiny"])
def test_generate_cli_writes_pngs(tiny_bundles, tmp_path, family, capsys):
    from PIL import Image

    from effgen.cli import main

    cond = ["--class-label", "4"] if family == "dit-tiny" else ["--prompt-embeds", str(tmp_path / "e.npy")]
    if family == "pixart-tiny":
        np.save(tmp_path / "e.npy", np.ones((8, 32), np.float32))
    rc = main(["generate", str(tiny_bundles[family]), *cond, "--num-images", "2", "--steps", "2",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    assert Image.open(tmp_path / "out" / "001.png").size == (16, 16)
    assert (tmp_path / "out" / "grid.png").is_file()
    assert "grid" in capsys.readouterr().out


def test_bench_writes_json(tiny_bundles, tmp_path, capsys):
    from effgen.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_bundles["dit-tiny"]), "--repeat", "2", "--images", "1",
                 "--steps", "2", "--profile", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # --profile: kernel time per operator type of one call, from ONNX Runtime's profiler
    ops = result["op_ms"]
    assert {"Gemm", "MatMul"} & set(ops) and all(ms >= 0 for ms in ops.values())
    assert list(ops.values()) == sorted(ops.values(), reverse=True)
    assert "by operator type" in capsys.readouterr().out
    assert result["step_ms"] > 0 and result["image_ms"] > result["step_ms"]
    assert result["weight_bytes"] == sum(
        (tiny_bundles["dit-tiny"] / f).stat().st_size for f in
        ["denoiser.onnx", "denoiser.weights", "vae_decoder.onnx", "vae_decoder.weights"])
    assert result["peak_mb"] > 0


def test_bench_several_bundles_interleaved(tiny_bundles, tmp_path, capsys):
    """Several bundles: each timed in its own worker process, their calls interleaved; a
    bundle that cannot load is reported on its own line and fails the command, without
    losing the others' numbers."""
    from effgen.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundles["dit-tiny"], broken)
    (broken / "denoiser.onnx").write_bytes(b"not an onnx graph")
    out = tmp_path / "bench.json"
    bundles = [tiny_bundles["dit-tiny"], tiny_bundles["pixart-tiny"], broken]
    assert main(["bench", *map(str, bundles), "--repeat", "3", "--images", "1", "--steps", "2",
                 "--threads", "1", "--json", str(out)]) == 1
    results = json.loads(out.read_text())
    for r, bundle in zip(results[:2], bundles):
        assert r["bundle"] == str(bundle) and "error" not in r
        assert len(r["step_ms_rounds"]) == 3 and r["step_ms"] == sorted(r["step_ms_rounds"])[1]
        assert r["image_ms"] > r["step_ms"] and r["steps"] == 2 and r["peak_mb"] > 0
    assert "broken" in results[2]["error"]
    printed = capsys.readouterr().out
    assert "ratios against" in printed and "failed:" in printed
