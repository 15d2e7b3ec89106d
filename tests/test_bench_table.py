"""samples/bench_table.py's measurement: every bundle loaded in its own worker process and
their calls interleaved; a bundle that cannot load is reported on its own row without losing
the others' numbers."""

import argparse
import importlib.util
import shutil
from pathlib import Path


def _bench_table():
    path = Path(__file__).resolve().parents[1] / "samples" / "bench_table.py"
    spec = importlib.util.spec_from_file_location("bench_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_measurement_times_each_bundle_and_isolates_a_broken_one(tiny_bundles, tmp_path):
    bench_table = _bench_table()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundles["dit-tiny"], broken)
    (broken / "denoiser.onnx").write_bytes(b"not an onnx graph")
    bundles = {"dit": tiny_bundles["dit-tiny"], "pixart": tiny_bundles["pixart-tiny"], "broken": broken}

    out = bench_table.measure(bundles, argparse.Namespace(threads=1, images=1), steps=2, repeat=3)

    for method in ("dit", "pixart"):
        r = out[method]
        assert "error" not in r, r
        assert len(r["step_ms_rounds"]) == 3 and all(ms > 0 for ms in r["step_ms_rounds"])
        assert r["step_ms"] == sorted(r["step_ms_rounds"])[1]  # the median round
        assert r["image_ms"] > r["step_ms"]  # two denoiser calls and more
        assert r["steps"] == 2 and r["peak_mb"] > 0
        assert r["denoiser_bytes"] == bench_table.denoiser_bytes(bundles[method])
    assert "broken" in out["broken"]["error"]
