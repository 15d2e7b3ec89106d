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


class BundleTimer:
    """One bundle loaded once and timed call by call. `step()`: one denoiser call at the
    graph's fixed batch (a CFG pair) at t = 500; for an ECAR bundle one head call of the last
    stage (one flow step at full resolution). `image(seed)`: one whole image (every step or
    stage, CFG included). Both return milliseconds. `bench_bundle` takes medians of these; a
    caller comparing several bundles can interleave their calls round by round, so that the
    machine's load falls on all of them alike (samples/bench_table.py)."""

    def __init__(self, path: str | Path, steps: int | None = None, threads: int = 0,
                 backend: str = "ort"):
        self.path, self.backend, self.threads = str(path), backend, threads
        self.bundle = Bundle.load(path)
        self.model = self.bundle.model
        if self.model["family"] == "ecar":
            from .stage_pipeline import StagePipeline

            self.pipe = StagePipeline(self.bundle, backend=backend, threads=threads)
            last = self.pipe.num_stages - 1
            rng = np.random.default_rng(0)
            self.feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"])
                          for i in self.bundle.component("head")["variants"][last]["inputs"]}
            self.steps = self.pipe.resolve_steps(steps)
            self.batch = int(self.feeds["x_t"].shape[0])
            self._step = lambda: self.pipe.head.run(self.feeds, last)
            n = self.model["num_classes"]
            self._image = lambda seed: self.pipe.generate(num_images=1, seed=seed, class_label=[1 % n],
                                                          steps=self.steps)
            return
        self.pipe = DenoisePipeline(self.bundle, backend=backend, threads=threads)
        self.steps = steps or self.bundle.manifest["sampling"]["steps"]
        m = self.model
        cond = self.pipe.conditioning(1, **_example_conditioning(self.pipe, 1))
        noise = initial_noise((m["in_channels"], m["sample_size"], m["sample_size"]), 0, 1)
        self.batch = b = self.pipe.denoiser.batch
        pair = {k: np.concatenate([v, cond.uncond[k]]) for k, v in cond.cond.items()}
        self.feeds = {k: np.concatenate([v] * b)[:b] for k, v in pair.items()}
        self.feeds["sample"] = np.repeat(noise, b, 0)
        self.feeds["timestep"] = np.full(b, 500.0, np.float32)
        self._step = lambda: self.pipe.denoiser.run(self.feeds, 500.0)
        output = "images" if (not m["latent_space"] or self.pipe.vae_decoder is not None) else "latents"
        self._image = lambda seed: self.pipe.generate(num_images=1, seed=seed, steps=self.steps, output=output,
                                                      **_example_conditioning(self.pipe, 1))

    @staticmethod
    def _ms(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def step(self) -> float:
        return self._ms(self._step)

    def image(self, seed: int = 0) -> float:
        return self._ms(lambda: self._image(seed))

    def info(self) -> dict:
        steps = sum(self.steps) if self.model["family"] == "ecar" else self.steps
        return {"bundle": self.path, "model": self.model["name"], "backend": self.backend,
                "threads": self.threads, "batch": self.batch, "steps": steps,
                "peak_mb": round(peak_rss_mb(), 1), "weight_bytes": weight_bytes(self.bundle)}


def bench_bundle(path: str | Path, steps: int | None = None, images: int = 2, repeat: int = 10,
                 threads: int = 0, backend: str = "ort", profile: bool = False) -> dict:
    """Median milliseconds of `repeat` denoiser calls and of `images` whole images, each
    after one warm-up (BundleTimer: a whole image also runs the variants and stages one call
    does not), peak memory and weight bytes; with `profile` also the milliseconds of one
    denoiser call by operator type."""
    timer = BundleTimer(path, steps=steps, threads=threads, backend=backend)
    if profile and timer.model["family"] == "ecar":
        raise ValueError("--profile times one denoiser call of a pixart or dit bundle; "
                         "an ECAR bundle has none")
    timer.step()
    step_ms = [timer.step() for _ in range(repeat)]
    if images:
        timer.image(0)
    image_ms = [timer.image(seed) for seed in range(images)]
    result = {**timer.info(),
              "step_ms": round(statistics.median(step_ms), 3),
              "image_ms": round(statistics.median(image_ms), 3) if image_ms else None}
    if profile:  # after the memory reading: the profiled sessions are extra
        feeds, bundle = timer.feeds, timer.bundle
        del timer
        result["op_ms"] = profile_denoiser(bundle, feeds, 500.0, threads)
    return result
