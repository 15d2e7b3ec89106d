"""The reference data set and the shipped text encoder: determinism, tokenizer parity
between the runtime (tokenizers) and transformers, text-encoder ONNX against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from effgen.models import refdata


def test_dataset_is_deterministic_and_seed_dependent():
    a, attrs_a = refdata.make_dataset(16, "train", seed=3)
    b, attrs_b = refdata.make_dataset(16, "train", seed=3)
    c, _ = refdata.make_dataset(16, "train", seed=4)
    np.testing.assert_array_equal(a, b)
    assert attrs_a == attrs_b
    assert not np.array_equal(a, c)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8


def test_heldout_combinations_never_appear_in_training():
    held = {(a.shape, a.colour, a.row, a.col) for a in refdata.split("heldout")}
    train = {(a.shape, a.colour, a.row, a.col) for a in refdata.split("train")}
    assert held and not held & train
    _, attrs = refdata.make_dataset(500, "train", seed=0)
    assert not {(a.shape, a.colour, a.row, a.col) for a in attrs} & held
    prompts = refdata.eval_prompts(20)
    assert sum((a.shape, a.colour, a.row, a.col) in held for a in prompts) == 10


def test_picture_shows_its_attributes():
    """The shape is drawn in its colour in its grid cell, on its background."""
    a = refdata.Attributes("square", "red", "large", "top", "right", "white")
    img = refdata.render(a, np.random.default_rng(0)).astype(int)
    cell = img[:11, 21:]  # top-right cell
    assert (np.abs(cell - refdata.COLOURS["red"]).sum(-1) < 60).sum() > 40
    assert (np.abs(img[20:, :11] - refdata.BACKGROUNDS["white"]).sum(-1) < 60).all()
    assert a.caption == "a large red square at the top right on a white background"
    assert refdata.class_name(a.class_id) == "red square"


def test_runtime_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    from effgen.models.text_encoder import load_tokenizer, minilm_path
    from effgen.runtime.text import encode_batch

    prompts = [a.caption for a in refdata.eval_prompts(6)] + [
        "", "A LARGE Purple STAR, top-left!", "word " * 40]
    ref = AutoTokenizer.from_pretrained(minilm_path())(
        prompts, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    ids, mask = encode_batch(load_tokenizer(), prompts, 16)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_text_encoder_onnx_matches_pytorch(tmp_path):
    import torch

    from effgen.exporter.onnx_export import export_module, run_onnx
    from effgen.models.text_encoder import MiniLMEncoder, tokenize

    encoder = MiniLMEncoder()
    ids, mask = tokenize(["a small red circle at the top left on a grey background", ""])
    graph = export_module(encoder, (ids, mask), ["input_ids", "attention_mask"],
                          ["encoder_hidden_states"], tmp_path, "text_encoder")
    other_ids, other_mask = tokenize(["a large blue star at the bottom right on a black background",
                                      "a small green triangle"])
    (onnx_out,) = run_onnx(tmp_path / graph.onnx, {"input_ids": other_ids.numpy(),
                                                   "attention_mask": other_mask.numpy()})
    with torch.no_grad():
        ref = encoder(other_ids, other_mask).numpy()
    np.testing.assert_allclose(onnx_out, ref, atol=2e-4)
    # The [CLS] state is the outlier MixDQ's BOS-aware quantization is about.
    assert np.abs(ref[:, 0]).max() > 1.5 * np.abs(ref[:, 1:][other_mask.numpy()[:, 1:] > 0]).max()
