"""What calibration runs on: the default held-out items, prompt files, and precomputed T5 text
states (`effgen encode-prompts` from a checkpoint's own text encoder, calibration on them with
`--prompts STATES.safetensors`, generation from them, and the refusal to calibrate a
T5-conditioned checkpoint on anything else).

The checkpoint is a tiny diffusers PixArt folder with a real (tiny, random) transformers T5
encoder and a `tokenizers` tokenizer saved through transformers, as the real one's folders are
laid out; pixart-tiny reads 8 tokens of 32-wide states."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from effgen.cli import main as effgen
from effgen.exporter.cli import main as effgen_export

@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFGEN_CACHE", str(tmp_path / "cache"))


PROMPTS = ["a red circle", "a small blue square at the top", "green star"]
WORDS = ["a", "red", "circle", "small", "blue", "square", "at", "the", "top", "green", "star"]
W8A8 = "samples/plans/w8a8.json"


def test_default_items_cover_the_model_conditions():
    from effgen.calib.stats import calibration_items
    from effgen.models import refdata
    from effgen.models.configs import get_spec

    attrs = refdata.eval_prompts(32, seed=999)
    assert calibration_items(get_spec("pixart-ref"), 32) == [a.caption for a in attrs]
    assert calibration_items(get_spec("dit-ref"), 32) == [a.class_id for a in attrs]
    # A real DiT: 32 distinct ImageNet classes, the same every time; not the reference's 0..19.
    labels = calibration_items(get_spec("dit-xl-2-256"), 32)
    assert len(set(labels)) == 32 and all(0 <= x < 1000 for x in labels)
    assert max(labels) >= 20 and labels == calibration_items(get_spec("dit-xl-2-256"), 32)
    assert sorted(calibration_items(get_spec("dit-tiny"), 12)[:10]) == list(range(10))


def test_prompt_files(tmp_path):
    from effgen.calib.stats import calibration_items
    from effgen.models.configs import get_spec

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n\n  a blue star  \na green square\n")
    assert calibration_items(get_spec("pixart-ref"), 2, captions) == ["a red circle", "a blue star"]
    labels = tmp_path / "labels.txt"
    labels.write_text("3\n19\n")
    assert calibration_items(get_spec("dit-ref"), 32, labels) == [3, 19]
    for text, words in [("20\n", "class label 20 is not in 0..19"), ("a red circle\n", "integer class label")]:
        labels.write_text(text)
        with pytest.raises(ValueError, match=words):
            calibration_items(get_spec("dit-ref"), 32, labels)


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory, tiny_checkpoints):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("pixart-t5") / "checkpoint"
    shutil.copytree(tiny_checkpoints["pixart-tiny"], root)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    torch.manual_seed(3)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=4)).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def states_file(t5_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("states")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = d / "states.safetensors"
    assert effgen(["encode-prompts", "pixart-tiny", "--checkpoint", str(t5_checkpoint), "--prompts",
                   str(d / "prompts.txt"), "--out", str(out), "--dtype", "float32"]) == 0
    return out


def test_encode_prompts_writes_t5_states_as_diffusers_computes_them(t5_checkpoint, states_file):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, T5EncoderModel

    arrays = load_file(str(states_file))
    assert arrays["prompt_embeds"].shape == (3, 8, 32)
    assert arrays["negative_prompt_embeds"].shape == (1, 8, 32)
    # "a small blue square at the top" is 7 words + </s>; "green star" 2 + </s>; "" only </s>.
    assert arrays["prompt_attention_mask"].sum(axis=1).tolist() == [4, 8, 3]
    assert arrays["negative_prompt_attention_mask"].sum() == 1
    tokenizer = AutoTokenizer.from_pretrained(t5_checkpoint / "tokenizer")
    encoder = T5EncoderModel.from_pretrained(t5_checkpoint / "text_encoder").eval()
    tok = tokenizer(PROMPTS, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = encoder(tok.input_ids, attention_mask=tok.attention_mask)[0].numpy()
    np.testing.assert_allclose(arrays["prompt_embeds"], want, rtol=1e-5, atol=1e-5)
    with safe_open(str(states_file), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "effgen.text_states/1" and meta["model"] == "pixart-tiny"
    assert "green star" in meta["prompts"]


def test_calibration_sees_exactly_the_states_of_the_file(t5_checkpoint, states_file):
    """The caption projection's first Linear reads the text states as they are, so its
    per-channel input absmax over the calibration sampler is the file's (conditional and
    negative rows), not random states'."""
    from safetensors.numpy import load_file

    from effgen.calib.stats import collect_statistics, model_calibration_items
    from effgen.models.denoiser import load_denoiser

    model = load_denoiser("pixart-tiny", t5_checkpoint)
    items = model_calibration_items(model, 2, states_file)
    assert len(items) == 2
    stats = collect_statistics(model, items=items, use_cache=False, progress=False)
    arrays = load_file(str(states_file))
    seen = np.concatenate([arrays["prompt_embeds"][:2], arrays["negative_prompt_embeds"]])
    want = np.abs(seen).max(axis=(0, 1))
    got = stats.absmax["transformer.caption_projection.linear_1"].numpy()
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-6)


def test_calib_and_export_on_states_then_generate_from_them(t5_checkpoint, states_file, tmp_path):
    calib_dir, bundle = tmp_path / "calib", tmp_path / "bundle"
    assert effgen(["calib", "pixart-tiny", "--checkpoint", str(t5_checkpoint), "--plan", W8A8,
                   "--prompts", str(states_file), "--out", str(calib_dir), "--no-cache"]) == 0
    assert (calib_dir / "scales.safetensors").is_file()
    assert effgen_export(["pixart-tiny", "--checkpoint", str(t5_checkpoint), "--plan", W8A8,
                          "--target", "ort-cpu", "--prompts", str(states_file), "--n-calib", "2",
                          "--out", str(bundle)]) == 0
    out = tmp_path / "images"
    assert effgen(["generate", str(bundle), "--prompt-embeds", str(states_file), "--steps", "2",
                   "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == ["000.png", "001.png", "002.png"]
    from PIL import Image

    from effgen import runtime

    images = runtime.generate(bundle, prompt_embeds=str(states_file), num_images=3, steps=2)
    assert np.array_equal(images, np.stack([np.asarray(Image.open(out / f"{i:03d}.png")) for i in range(3)]))


def test_plan_measures_sensitivity_on_text_states(t5_checkpoint, states_file, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    args = ["plan", "pixart-tiny", "--checkpoint", str(t5_checkpoint), "--weight-bits", "6",
            "--n-prompts", "2", "--steps", "2", "--n-calib", "3", "--out", str(plan)]
    assert effgen(args) == 2  # captions of a T5 checkpoint: refused before measuring anything
    assert "effgen encode-prompts" in capsys.readouterr().err and not plan.exists()
    assert effgen(args + ["--prompts", str(states_file)]) == 0
    doc = json.loads(plan.read_text())
    assert doc["provenance"]["achieved"]["weight_bits"] <= 6.05
    assert doc["provenance"]["sensitivity"]["n_prompts"] == 2


@pytest.mark.parametrize("prompts", [None, "captions.txt"])
def test_t5_checkpoint_is_not_calibrated_on_random_states(t5_checkpoint, tmp_path, capsys, prompts):
    args = ["calib", "pixart-tiny", "--checkpoint", str(t5_checkpoint), "--plan", W8A8,
            "--out", str(tmp_path / "calib")]
    if prompts:
        (tmp_path / prompts).write_text("a red circle\n")
        args += ["--prompts", str(tmp_path / prompts)]
    assert effgen(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "effgen encode-prompts pixart-tiny" in err
    assert not (tmp_path / "calib").exists()
    assert effgen_export(["pixart-tiny", "--checkpoint", str(t5_checkpoint), "--plan", W8A8,
                          "--out", str(tmp_path / "bundle")] + args[len(args) - 2:] * bool(prompts)) == 2
    assert "encode-prompts" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


def test_bad_states_files_give_one_line_errors(t5_checkpoint, states_file, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(states_file))
    wide = tmp_path / "wide.safetensors"
    save_file({"prompt_embeds": np.zeros((2, 8, 48), np.float32)}, str(wide))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(states_file.read_bytes()[:200])
    nan = tmp_path / "nan.safetensors"
    save_file({**arrays, "prompt_embeds": np.full_like(arrays["prompt_embeds"], np.nan)}, str(nan))
    for path, words in [(wide, "(8, 32)"), (cut, "not a readable text states file"),
                        (nan, "NaN"), (tmp_path / "missing.safetensors", "does not exist")]:
        assert effgen(["calib", "pixart-tiny", "--checkpoint", str(t5_checkpoint), "--plan", W8A8,
                       "--prompts", str(path), "--out", str(tmp_path / "calib")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert effgen(["calib", "dit-tiny", "--plan", W8A8, "--prompts", str(states_file),
                   "--out", str(tmp_path / "calib")]) == 2
    assert "class-conditional" in capsys.readouterr().err
    no_encoder = tmp_path / "no-encoder"
    shutil.copytree(t5_checkpoint / "transformer", no_encoder / "transformer")
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert effgen(["encode-prompts", "pixart-tiny", "--checkpoint", str(no_encoder), "--prompts",
                   str(tmp_path / "p.txt"), "--out", str(tmp_path / "s.safetensors")]) == 2
    assert "no text_encoder/ folder" in capsys.readouterr().err
    assert effgen(["encode-prompts", "pixart-tiny", "--checkpoint", str(t5_checkpoint), "--prompts",
                   str(tmp_path / "p.txt"), "--out", str(tmp_path / "s.safetensors"), "--device", "npu0"]) == 2
    assert "'npu0' is not a torch device" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()


def test_bad_calibration_devices_give_one_line_errors(tmp_path, capsys):
    devices = ["npu0"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert effgen(["calib", "pixart-tiny", "--plan", W8A8, "--out", str(tmp_path / "c"),
                       "--no-cache", "--n-calib", "2", "--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and device in err, err
    assert effgen(["calib", "ecar-tiny", "--plan", W8A8, "--out", str(tmp_path / "c"), "--no-cache",
                   "--n-calib", "2", "--device", "cuda:0"]) == 2
    assert "ECAR models calibrate on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (calibration passes on --device cuda)")
def test_statistics_and_hessians_on_cuda_match_the_cpu():
    from effgen.calib.gptq import collect_hessians
    from effgen.calib.stats import collect_statistics, quantizable_modules
    from effgen.models.denoiser import load_denoiser

    model = load_denoiser("pixart-tiny")
    linears = [n for n, m in quantizable_modules(model).items() if isinstance(m, torch.nn.Linear)]
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = (collect_statistics(model, n_calib=4, use_cache=False, progress=False, device=device),
                        collect_hessians(model, linears, n_calib=4, use_cache=False, progress=False,
                                         device=device))
        assert next(model.parameters()).device.type == "cpu"  # back where calibration goes on
    (cpu, h_cpu), (gpu, h_gpu) = runs["cpu"], runs["cuda"]
    assert cpu.timesteps == gpu.timesteps and sorted(cpu.absmax) == sorted(gpu.absmax)
    for name in cpu.absmax:
        for field in ("absmax", "rows", "top", "maximum", "minimum"):
            a, b = getattr(cpu, field)[name], getattr(gpu, field)[name]
            assert b.device.type == "cpu"
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    # A Hessian sums x xT over every calibration row in float32, so its error is relative to
    # its largest entries, not to each one: measured on an H200, the GPU's pixart-tiny
    # Hessians are 7e-6 from the CPU's (Frobenius, relative), while single small entries
    # differed by up to 0.3% of themselves, and no entry by more than 2.6e-3, where the
    # largest is 3,318.
    for name in linears:
        assert h_gpu[name].device.type == "cpu"
        scale = h_cpu[name].abs().max().item()
        torch.testing.assert_close(h_gpu[name], h_cpu[name], rtol=0, atol=1e-4 * scale)
        assert ((h_gpu[name] - h_cpu[name]).norm() / h_cpu[name].norm()).item() < 1e-4


def test_calibration_data_sample_scores_both_kinds_of_states(tmp_path, capsys, sample_script):
    """samples/calibration_data.py: the same method calibrated on the encoder's states and on
    Gaussian states, each scored against FP (tiny sizes; the README's numbers are at 64)."""
    out = tmp_path / "rows.json"
    assert sample_script("calibration_data").main(
        ["--json", str(out), "--methods", "vidit-w8a8", "--n-images", "2", "--n-calib", "2",
         "--steps", "3"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["calibration_data"]) for r in rows] == [
        ("vidit-w8a8", "encoder states"), ("vidit-w8a8", "Gaussian states")]
    assert all(np.isfinite(r["psnr"]) and r["n_images"] == 2 for r in rows)
    assert rows[0]["psnr"] != rows[1]["psnr"]  # other statistics, other scales
    assert "| vidit-w8a8 | Gaussian states |" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (effgen plan --device cuda)")
def test_sensitivities_on_cuda_match_the_cpu():
    from effgen.calib.allocate import DEFAULT_TECHNIQUES
    from effgen.calib.sensitivity import measure_sensitivity
    from effgen.models.denoiser import load_denoiser

    model = load_denoiser("pixart-tiny")
    runs = [measure_sensitivity(model, DEFAULT_TECHNIQUES, "trt", n_prompts=2, steps=2, n_calib=3,
                                use_cache=False, progress=False, device=device)
            for device in ("cpu", "cuda")]
    assert next(model.parameters()).device.type == "cpu"
    cpu, gpu = runs
    assert cpu.layers == gpu.layers and cpu.act_elems == gpu.act_elems
    for name in cpu.layers:
        np.testing.assert_allclose(gpu.loss[name], cpu.loss[name], rtol=0.05, atol=1e-7)
