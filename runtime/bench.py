"""Latency and memory of a bundle on a backend, measured the same way for every bundle so
ratios between bundles (FP vs quantized) are meaningful when measured in one run."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .pipeline import DenoisePipeline, initial_noise


def weight_bytes(bundle: Bundle) -> int:
    """Bytes of all graphs and weight files the components load (engines excluded)."""
    total = 0
    for comp in bundle.components.values():
        files = {v["onnx"] for v in comp["variants"]}
        if comp.get("external_data"):
            files.add(comp["external_data"])
        total += sum(bundle.path(f).stat().st_size for f in files)
    return total


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _example_conditioning(pipe: DenoisePipeline, n: int):
    m = pipe.model
    if m["family"] == "dit":
        return {"class_label": [i % m["num_classes"] for i in range(n)]}
    if pipe.text_encoder is not None:
        return {"prompt": "a large red circle at the top left on a grey background"}
    t = m["text"]
    rng = np.random.default_rng(0)
    return {"prompt_embeds": {"prompt_embeds": rng.standard_normal((t["max_length"], t["dim"]),
                                                                   dtype=np.float32)}}


def op_times(trace: str | Path) -> dict[str, float]:
    """Kernel milliseconds per operator type in one ONNX Runtime profiler trace, summed over
    every run after the first (the warm-up), divided by the number of those runs."""
    events = json.loads(Path(trace).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) < 2:
        raise ValueError(f"{trace}: profile a warm-up run and at least one more")
    timed = runs[1:]
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed[0][0]:
            total[e["args"]["op_name"]] += e["dur"] / 1e3
    return {op: round(ms / len(timed), 3) for op, ms in sorted(total.items(), key=lambda kv: -kv[1])}


def profile_denoiser(bundle: Bundle, feeds: dict[str, np.ndarray], timestep: float,
                     threads: int = 0, repeat: int = 1) -> dict[str, float]:
    """Milliseconds per denoiser call by operator type, as ONNX Runtime's CPU provider runs
    the bundle's graph (after its fusions: an int8 layer shows as MatMulIntegerToFloat, an
    FP one as Gemm/MatMul). Where a quantized model's time goes next to its FP32 baseline."""
    from .backends import OrtComponent, variant_index

    with tempfile.TemporaryDirectory() as tmp:
        comp = OrtComponent(bundle, "denoiser", threads, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(1 + repeat):
            comp.run(feeds, timestep)
        trace = comp.sessions[variant_index(comp.variants, timestep)].end_profiling()
        return op_times(trace)


def _timed(fn, repeat: int) -> float:
    """Median milliseconds of `repeat` calls of `fn` after one warm-up call."""
    fn()
    ms = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ms), 3)


def bench_stages(bundle: Bundle, path: str | Path, steps: int | None, images: int, repeat: int,
                 threads: int, backend: str) -> dict:
    """`bench_bundle` for an ECAR bundle: `step_ms` is one head call of the last stage (one
    flow step at full resolution, the graph's fixed batch: a CFG pair), `image_ms` the whole
    stage loop of one image."""
    from .stage_pipeline import StagePipeline

    pipe = StagePipeline(bundle, backend=backend, threads=threads)
    last = pipe.num_stages - 1
    rng = np.random.default_rng(0)
    feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"])
             for i in bundle.component("head")["variants"][last]["inputs"]}
    stage_steps = pipe.resolve_steps(steps)
    n = pipe.model["num_classes"]
    image = lambda: pipe.generate(num_images=1, seed=0, class_label=[1 % n], steps=stage_steps)  # noqa: E731
    return {
        "bundle": str(path), "model": pipe.model["name"], "backend": backend, "threads": threads,
        "batch": int(feeds["x_t"].shape[0]), "steps": sum(stage_steps),
        "step_ms": _timed(lambda: pipe.head.run(feeds, last), repeat),
        "image_ms": _timed(image, images) if images else None,
        "peak_mb": round(peak_rss_mb(), 1),
        "weight_bytes": weight_bytes(bundle),
    }


def bench_bundle(path: str | Path, steps: int | None = None, images: int = 2, repeat: int = 10,
                 threads: int = 0, backend: str = "ort", profile: bool = False) -> dict:
    bundle = Bundle.load(path)
    if bundle.model["family"] == "ecar":
        if profile:
            raise ValueError("--profile times one denoiser call of a pixart or dit bundle; "
                             "an ECAR bundle has none")
        return bench_stages(bundle, path, steps, images, repeat, threads, backend)
    pipe = DenoisePipeline(bundle, backend=backend, threads=threads)
    steps = steps or bundle.manifest["sampling"]["steps"]
    m = pipe.model
    cond = pipe.conditioning(1, **_example_conditioning(pipe, 1))
    noise = initial_noise((m["in_channels"], m["sample_size"], m["sample_size"]), 0, 1)

    # One denoiser call at the graph's fixed batch (a CFG pair), timed alone.
    b = pipe.denoiser.batch
    pair = {k: np.concatenate([v, cond.uncond[k]]) for k, v in cond.cond.items()}
    feeds = {k: np.concatenate([v] * b)[:b] for k, v in pair.items()}
    feeds["sample"] = np.repeat(noise, b, 0)
    feeds["timestep"] = np.full(b, 500.0, np.float32)
    step_ms = _timed(lambda: pipe.denoiser.run(feeds, 500.0), repeat)

    image_ms = []
    output = "images" if (not m["latent_space"] or pipe.vae_decoder is not None) else "latents"
    for i in range(images):
        t0 = time.perf_counter()
        pipe.generate(num_images=1, seed=i, steps=steps, output=output,
                      **_example_conditioning(pipe, 1))
        image_ms.append((time.perf_counter() - t0) * 1e3)
    result = {
        "bundle": str(path), "model": m["name"], "backend": backend, "threads": threads,
        "batch": b, "steps": steps,
        "step_ms": step_ms,
        "image_ms": round(statistics.median(image_ms), 3) if image_ms else None,
        "peak_mb": round(peak_rss_mb(), 1),
        "weight_bytes": weight_bytes(bundle),
    }
    if profile:  # after the memory reading: the profiled sessions are extra
        del pipe
        result["op_ms"] = profile_denoiser(bundle, feeds, 500.0, threads)
    return result
