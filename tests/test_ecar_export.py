"""ECAR bundles: export (components ar + head, one graph per stage), the torch-free
StagePipeline against the PyTorch sampler from the same noise, the CLIs, plan hooks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from effgen.exporter.ecar_export import (AR_INPUTS, HEAD_INPUTS, ar_example, export_ecar_bundle,
                                         head_example)
from effgen.metrics import psnr
from effgen.models import ecar as E
from effgen.runtime import Bundle, load_pipeline
from effgen.runtime.images import to_uint8
from effgen.runtime.stage_pipeline import StagePipeline, split_steps

BASE = dict(sample_size=16, patch_size=4, stages=(1, 2, 4), num_classes=5, width=32, depth=2,
            heads=2, head_width=32, head_depth=2, head_heads=2, boundaries=(0.0, 1 / 3, 2 / 3),
            stage_steps=(2, 3, 2), cfg_scale=2.5)
CONFIGS = {
    # the ECAR schedule with the transformer head
    "pyramid": E.ECARConfig(**BASE),
    # FlowAR baseline with the per-token MLP head, 2 stages
    "flowar-mlp": E.ECARConfig(**{**BASE, "sample_size": 8, "stages": (1, 2), "schedule": "flowar",
                                  "boundaries": (0.0, 0.0), "stage_steps": (2, 2),
                                  "head_type": "mlp"}),
    # single-stage baseline (plain flow matching at full resolution)
    "single": E.ECARConfig(**{**BASE, "sample_size": 8, "stages": (2,), "boundaries": (0.0,),
                              "stage_steps": (3,)}),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, perturbed_ecar):
    base = tmp_path_factory.mktemp("ecar")
    out = {}
    for name, cfg in CONFIGS.items():
        model = perturbed_ecar(cfg)
        out[name] = (model, export_ecar_bundle(f"ecar-{name}", base / name, ecar=model,
                                               log=lambda _: None))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ort_generation_matches_pytorch_sampler(bundles, name):
    model, path = bundles[name]
    cfg = model.cfg
    labels = [0, 3, 4]
    pipe = load_pipeline(path)
    assert isinstance(pipe, StagePipeline)
    got = pipe.generate(num_images=3, seed=11, class_label=labels, output="latents")
    ref = E.sample(model, labels, E.stage_noise(cfg, 11, 3)).numpy()
    assert np.abs(got - ref).max() < 1e-3
    assert psnr(to_uint8(got), to_uint8(ref)).min() >= 50
    # image i depends only on seed + i, not on how many are generated with it
    one = pipe.generate(num_images=1, seed=12, class_label=[3], output="latents")
    np.testing.assert_allclose(one[0], got[1], atol=1e-5)
    # without guidance (cfg 1.0: conditional rows only), and other step counts
    got = pipe.generate(num_images=2, seed=3, class_label=[1, 2], guidance=1.0,
                        steps=[4] * cfg.num_stages, output="latents")
    ref = E.sample(model, [1, 2], E.stage_noise(cfg, 3, 2), cfg_scale=1.0,
                   stage_steps=[4] * cfg.num_stages).numpy()
    assert psnr(to_uint8(got), to_uint8(ref)).min() >= 50
    with pytest.raises(ValueError, match="no guidance interval"):
        pipe.generate(num_images=1, class_label=[1], guidance_interval=(0, 500))


def test_manifest_components_variants_and_shared_weights(bundles):
    model, path = bundles["pyramid"]
    cfg = model.cfg
    bundle = Bundle.load(path)  # checks every sha256
    m = bundle.manifest
    assert m["format"] == "effgen.bundle/1" and m["model"]["family"] == "ecar"
    assert m["model"]["ecar"]["stages"] == [1, 2, 4]
    assert m["model"]["ecar"]["stage_ranges"] == [list(r) for r in cfg.stage_ranges()]
    assert m["sampling"]["stage_steps"] == [2, 3, 2] and m["sampling"]["steps"] == 7
    for comp in ("ar", "head"):
        entry = m["components"][comp]
        assert entry["external_data"] == f"{comp}.weights"
        assert [v["stage"] for v in entry["variants"]] == [0, 1, 2]
        assert [v["timesteps"] for v in entry["variants"]] == [[0, 0], [1, 1], [2, 2]]
        for v in entry["variants"]:
            graph = onnx.load(str(path / v["onnx"]), load_external_data=False)
            locations = {e.value for t in graph.graph.initializer for e in t.external_data
                         if e.key == "location"}
            assert locations == {f"{comp}.weights"}
    ar = m["components"]["ar"]["variants"]
    assert [i["name"] for i in ar[0]["inputs"]] == ["class_labels"]
    assert ar[2]["inputs"][1]["shape"] == [2, 1 + 4 + 16 - 1, cfg.token_dim]
    assert ar[2]["outputs"][0]["shape"] == [2, 16, cfg.width]
    # shared weights: the three head graphs store the head's parameters once
    head_bytes = (path / "head.weights").stat().st_size
    n_head = sum(p.numel() for p in model.head.parameters()) * 4
    assert head_bytes < 1.5 * n_head
    sizes = {f: (path / f).stat().st_size for f in m["files"]}
    assert not any(f.endswith(".weights") and f not in ("ar.weights", "head.weights") for f in sizes)


def _macs_of_graph(path, feeds) -> int:
    """MACs of every MatMul/Gemm of an ONNX graph, from the shapes of a real run (every
    MatMul input and output is made a graph output)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    mm = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    known = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for name in {x for n in mm for x in (n.input[0], n.output[0])} - known - set(inits):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = dict(zip(names, (list(np.shape(v)) for v in sess.run(names, feeds))))
    shapes.update({k: list(np.shape(v)) for k, v in feeds.items()})
    total = 0
    for node in mm:
        a, out = shapes[node.input[0]], shapes[node.output[0]]
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        total += int(np.prod(out)) * (a[-2] if trans_a else a[-1])
    return total


def test_analytic_flops_match_the_exported_graphs(bundles):
    from effgen.models import flops

    for name in ("pyramid", "flowar-mlp"):
        model, path = bundles[name]
        m = json.loads((path / "manifest.json").read_text())
        for s in range(model.cfg.num_stages):
            ar_onnx = path / m["components"]["ar"]["variants"][s]["onnx"]
            head_onnx = path / m["components"]["head"]["variants"][s]["onnx"]
            ar_feeds = dict(zip(AR_INPUTS, (t.numpy() for t in ar_example(model.cfg, s, 2))))
            head_feeds = dict(zip(HEAD_INPUTS, (t.numpy() for t in head_example(model.cfg, s, 2))))
            # the graphs run batch 2 (one image with guidance)
            assert _macs_of_graph(ar_onnx, ar_feeds) == 2 * flops.ecar_ar_stage(model.cfg, s)
            assert _macs_of_graph(head_onnx, head_feeds) == 2 * flops.ecar_head_step(model.cfg, s)


def test_split_steps():
    assert split_steps(16, [4, 4, 4, 4]) == [4, 4, 4, 4]
    assert split_steps(8, [4, 4, 4, 4]) == [2, 2, 2, 2]
    assert sum(split_steps(10, [2, 3, 2])) == 10
    assert split_steps(3, [2, 3, 2]) == [1, 1, 1]
    with pytest.raises(ValueError):
        split_steps(2, [2, 3, 2])


def test_runtime_runs_ecar_with_torch_unimportable(bundles, run_torch_free):
    path = str(bundles["pyramid"][1])
    run_torch_free(f"""
        from effgen import runtime
        from effgen.runtime.stage_pipeline import StagePipeline
        images = runtime.generate({path!r}, class_label=[1, 2], num_images=2, steps=5)
        assert images.shape == (2, 16, 16, 3), images.shape
        assert isinstance(runtime.load_pipeline({path!r}), StagePipeline)
    """)


def test_cli_export_and_generate(tmp_path, capsys):
    from effgen import cli
    from effgen.exporter import cli as export_cli

    out = tmp_path / "ecar-tiny"
    assert export_cli.main(["ecar-tiny", "--out", str(out)]) == 0
    assert cli.main(["generate", str(out), "--class-label", "1", "7", "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "001.png").is_file() and (tmp_path / "png" / "grid.png").is_file()
    assert cli.main(["generate", str(out), "--prompt", "a red circle"]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert cli.main(["generate", str(out), "--class-label", "10"]) == 2  # ecar-tiny: 10 classes


def test_plan_resolves_on_ecar_modules_with_stage_groups(bundles):
    from effgen.calib.plan import PlanError, resolve_plan

    model, path = bundles["pyramid"]
    mods = E.quantizable_modules(model)
    assert "ar.blocks.1.attn.qkv" in mods["ar"] and "head.blocks.0.mlp.fc2" in mods["head"]
    raw = {"format": "effgen.plan/1", "target": "ort-cpu", "default": {"w_bits": 8, "a_bits": 8},
           "rules": [{"match": r"^head\.blocks\.\d+\.mlp", "w_bits": 4, "w_granularity": "block32"}],
           "timestep_groups": [[0, 1], [2, 2]]}
    plan = resolve_plan(raw, mods["ar"] + mods["head"], default_fp=E.DEFAULT_FP,
                        num_train_timesteps=model.cfg.num_timesteps)
    assert plan.timestep_groups == [(0, 1), (2, 2)]
    assert plan.layers["head.blocks.1.mlp.fc1"].w_bits == 4
    assert plan.layers["ar.token_in"].is_fp and plan.layers["head.out"].is_fp
    assert plan.layers["ar.blocks.0.attn.proj"].w_bits == 8
    with pytest.raises(PlanError, match="cover"):
        resolve_plan({**raw, "timestep_groups": [[0, 1]]}, mods["ar"] + mods["head"],
                     num_train_timesteps=model.cfg.num_timesteps)
    # every Linear keeps its module path in the node names of its component's graphs
    m = json.loads((path / "manifest.json").read_text())
    for comp in ("ar", "head"):
        names = []
        for v in m["components"][comp]["variants"]:
            names += [n.name for n in onnx.load(str(path / v["onnx"]), load_external_data=False).graph.node]
        for mod in mods[comp]:
            parts, node_path = mod.split("."), []
            for part in parts:  # "blocks.0" stays one scope in the exporter's names
                if part.isdigit():
                    node_path[-1] += f".{part}"
                else:
                    node_path.append(part)
            scope = "/" + "/".join(node_path) + "/"
            assert any(n.startswith(scope) for n in names), mod
