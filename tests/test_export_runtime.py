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
                 cond_mask=None, uncond_mask=None):
    from diffusers import AutoencoderKL

    denoiser = load_denoiser(name, checkpoint)
    m = manifest["model"]
    noise = initial_noise((m["in_channels"], m["sample_size"], m["sample_size"]), seed, n)
    x = sample(denoiser, noise, cond, uncond, manifest["scheduler"], steps, guidance,
               cond_mask, uncond_mask)
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
