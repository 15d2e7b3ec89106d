"""The TensorRT path, as far as it can be checked without a GPU: trtexec commands, engine
compatibility rules, the memory planner's arithmetic. Building and running engines needs
TensorRT and a GPU; those tests skip with the reason elsewhere."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from effgen.engines.build import BuildOptions, trtexec_commands
from effgen.engines.memory import RUNTIME_PROCESS_BYTES, peak_activation_bytes, plan_memory
from effgen.engines.targets import get_device
from effgen.runtime.bundle import Bundle, BundleError, sha256_file, write_json_atomic
from effgen.runtime.trt_backend import check_engine_compatible


def _bundle_with_two_variants(tmp_path, weight_dtype=np.float32, qdq=False):
    """A one-component bundle: y = relu(x @ W) with W (1000, 1000), x (4, 1000), two variants."""
    w = numpy_helper.from_array(np.ones((1000, 1000), weight_dtype), "W")
    nodes = []
    weight = "W"
    if qdq:
        nodes.append(helper.make_node("DequantizeLinear", ["W", "w_scale"], ["W_dq"], axis=1))
        weight = "W_dq"
    nodes += [helper.make_node("MatMul", ["x", weight], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    inits = [w] + ([numpy_helper.from_array(np.ones(1000, np.float32), "w_scale")] if qdq else [])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    for name in ("g0.onnx", "g1.onnx"):
        onnx.save(model, str(tmp_path / name))
    manifest = {
        "format": "effgen.bundle/1", "model": {"name": "toy", "family": "dit"},
        "scheduler": {"name": "ddim"}, "sampling": {"steps": 1, "guidance": 1.0, "batch": 4},
        "components": {"denoiser": {
            "inputs": [{"name": "x", "shape": [4, 1000], "dtype": "float32"}],
            "outputs": [{"name": "y", "shape": [4, 1000], "dtype": "float32"}],
            "variants": [{"onnx": "g0.onnx", "timesteps": [0, 499], "engines": {}},
                         {"onnx": "g1.onnx", "timesteps": [500, 999], "engines": {}}]}},
        "files": {n: sha256_file(tmp_path / n) for n in ("g0.onnx", "g1.onnx")},
    }
    write_json_atomic(tmp_path / "manifest.json", manifest)
    return Bundle.load(tmp_path)


def test_memory_plan_matches_hand_computation(tmp_path):
    bundle = _bundle_with_two_variants(tmp_path)
    # Live tensors: x (4x1000) + h (4x1000) while MatMul runs; then h + y: 2 x 4000 x 2 bytes.
    assert peak_activation_bytes(bundle.path("g0.onnx")) == 16_000
    plan = plan_memory(bundle, get_device("orin-nano-8gb"), workspace_mb=256)
    items = dict(plan.items)
    assert items["denoiser weights x 2 engines"] == 2 * 1000 * 1000 * 2  # FP32 -> FP16, 2 variants
    assert items["denoiser activations"] == 16_000
    assert items["workspace"] == 256 << 20
    assert items["engine load (host copy while deserializing)"] == 2_000_000
    assert plan.total == 4_000_000 + 16_000 + (256 << 20) + 2_000_000 + RUNTIME_PROCESS_BYTES
    assert plan.usable == int((8 - 1.5) * (1 << 30)) and plan.fits
    desktop = plan_memory(bundle, get_device("rtx-4090"), workspace_mb=256)
    assert "engine load (host copy while deserializing)" not in dict(desktop.items)


def test_memory_plan_counts_int8_weights_at_one_byte(tmp_path):
    bundle = _bundle_with_two_variants(tmp_path, np.int8, qdq=True)
    items = dict(plan_memory(bundle, get_device("agx-orin-64gb")).items)
    assert items["denoiser weights x 2 engines"] == 2 * (1_000_000 + 1000 * 2)  # + FP16 scales


def test_memory_plan_says_when_it_does_not_fit(tmp_path):
    bundle = _bundle_with_two_variants(tmp_path)
    plan = plan_memory(bundle, get_device("orin-nano-4gb"), workspace_mb=3000)
    assert not plan.fits
    assert plan.largest(1)[0][0] == "workspace"


def test_plan_memory_cli(tmp_path, capsys):
    from effgen.cli import main

    _bundle_with_two_variants(tmp_path)
    assert main(["plan-memory", str(tmp_path), "--device", "orin-nano-8gb", "--json",
                 str(tmp_path / "mem.json")]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "denoiser weights x 2 engines" in out
    assert json.loads((tmp_path / "mem.json").read_text())["fits"] is True
    assert main(["plan-memory", str(tmp_path), "--device", "orin-nano-9gb"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_trtexec_commands(tmp_path):
    bundle = _bundle_with_two_variants(tmp_path)
    cmds = trtexec_commands(bundle, BuildOptions(target="orin", workspace_mb=1024,
                                                 timing_cache=tmp_path / "t.cache"))
    assert len(cmds) == 2
    assert cmds[0].startswith("trtexec --onnx=g0.onnx --saveEngine=engines/denoiser.0.orin.plan")
    assert "--fp16" in cmds[0] and "--stronglyTyped" not in cmds[0]  # plain FP32 graph
    assert "--memPoolSize=workspace:1024M" in cmds[0]
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in cmds[1]
    qdq_dir = tmp_path / "qdq"
    qdq_dir.mkdir()
    qdq = trtexec_commands(_bundle_with_two_variants(qdq_dir, np.int8, qdq=True), BuildOptions())
    assert "--stronglyTyped" in qdq[0] and "--fp16" not in qdq[0]  # Q/DQ fix the precisions


def test_build_options_reject_bad_values():
    with pytest.raises(ValueError, match="unknown target 'jetson'"):
        BuildOptions(target="jetson")
    with pytest.raises(ValueError, match="optimization level"):
        BuildOptions(optimization_level=7)


BUILT = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}


def test_engines_from_another_tensorrt_or_gpu_are_refused():
    orin = {"name": "Orin", "compute_capability": "8.7"}
    check_engine_compatible(BUILT, "orin", "10.3.0", orin)
    with pytest.raises(BundleError, match="built by TensorRT 10.3.0, this is TensorRT 10.7.0"):
        check_engine_compatible(BUILT, "orin", "10.7.0", orin)
    with pytest.raises(BundleError, match=r"built for Orin \(sm 8.7\), this GPU is NVIDIA H100 \(sm 9.0\)"):
        check_engine_compatible(BUILT, "orin", "10.3.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})
    with pytest.raises(BundleError, match="no 'orin' engines"):
        check_engine_compatible(None, "orin", "10.3.0", orin)


def test_build_without_tensorrt_is_a_clean_error(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed: the GPU test below covers building")
    except ImportError:
        pass
    from effgen.engines.cli import main

    _bundle_with_two_variants(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "TensorRT is not installed here" in capsys.readouterr().err


def _gpu_with_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
        from effgen.runtime.cuda import get_device_properties

        get_device_properties(0)
        return None
    except Exception as e:  # ImportError, or no CUDA device
        return f"needs TensorRT and an NVIDIA GPU ({type(e).__name__}: {e})"


@pytest.mark.skipif(_gpu_with_tensorrt() is not None, reason=str(_gpu_with_tensorrt()))
def test_engine_build_and_trt_backend_match_onnx_runtime(tiny_bundles, tmp_path):
    from effgen import runtime
    from effgen.engines.build import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["dit-tiny"], bundle)
    info = build_engines(bundle, BuildOptions(target="desktop"), log=lambda _: None)
    assert Bundle.load(bundle).manifest["engines"]["desktop"] == info
    ort = runtime.generate(bundle, class_label=3, steps=4, output="latents")
    trt = runtime.generate(bundle, class_label=3, steps=4, output="latents", backend="trt")
    assert np.abs(ort - trt).max() < 5e-2 * max(1.0, np.abs(ort).max())  # FP16 engine
    # The same check per component call, as `effgen compare` reports it.
    from effgen.runtime.compare import compare_backends

    rows = compare_backends(bundle, reference="ort-reference", candidate="trt", steps=4, class_label=[3])
    assert {r.component for r in rows} == {"denoiser", "vae_decoder"}
    assert all(r.sqnr_db >= 30 for r in rows), [(r.component, r.sqnr_db) for r in rows]


def test_trt_extra_installs_what_the_tensorrt_path_imports_and_nothing_else():
    """pyproject's [trt] extra = the third-party modules the TensorRT path imports that the
    base install does not already bring."""
    import ast
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()  # noqa: E731
    extra = {name(r) for r in project["optional-dependencies"]["trt"]}
    base = {name(r) for r in project["dependencies"]}
    imported = set()
    for rel in ("engines/build.py", "runtime/trt_backend.py", "runtime/cuda.py"):
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    distribution = {"cuda": "cuda-python"}  # import name -> package name where they differ
    third_party = {distribution.get(m, m) for m in imported} - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party - base == extra
