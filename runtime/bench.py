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
    """Peak resident memory of this process. On Linux VmHWM, which belongs to the process's
    own address space: ru_maxrss survives exec, so in a worker started from a larger process
    it would report the parent's size at fork."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
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


# --- several bundles, interleaved ----------------------------------------------------------


def serve(path: str | Path, steps: int | None, threads: int, backend: str) -> None:
    """A timing worker (`python -m effgen.runtime.bench --serve BUNDLE`): load the bundle,
    print "ready", then answer each "step" / "image SEED" on stdin with the call's
    milliseconds and "quit" with BundleTimer.info() as JSON."""
    timer = BundleTimer(path, steps=steps, threads=threads, backend=backend)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd == ["step"]:
            print(timer.step(), flush=True)
        elif len(cmd) == 2 and cmd[0] == "image":
            print(timer.image(int(cmd[1])), flush=True)
        elif cmd == ["quit"]:
            print(json.dumps(timer.info()), flush=True)
            return
        else:
            raise ValueError(f"unknown request {line.strip()!r}")


class TimerProcess:
    """One bundle's BundleTimer in its own worker process (its own peak memory)."""

    def __init__(self, path: str | Path, steps: int | None, threads: int, backend: str):
        import subprocess

        self.path = str(path)
        cmd = [sys.executable, "-m", "effgen.runtime.bench", "--serve", self.path,
               "--threads", str(threads), "--backend", backend]
        if steps is not None:
            cmd += ["--steps", str(steps)]
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe would stall the worker
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self._reply("ready")

    def ask(self, request: str) -> str:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._reply(None)

    def _reply(self, expected: str | None) -> str:
        out = self.proc.stdout.readline().strip()
        if not out or (expected is not None and out != expected):
            self.proc.kill()
            self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read().strip().splitlines()
            self.stderr.close()
            raise RuntimeError(f"{self.path}: {err[-1] if err else 'the timing worker stopped'}")
        return out


def bench_interleaved(paths: list[str | Path], steps: int | None = None, images: int = 2,
                      repeat: int = 10, threads: int = 0, backend: str = "ort",
                      pause_s: float = 0.2) -> list[dict]:
    """`bench_bundle` for several bundles at once, for comparing them on a machine whose load
    comes and goes: each bundle in its own worker process (TimerProcess), all loaded side by
    side; one warm-up call each, then `repeat` rounds of one denoiser call per bundle, then a
    warm-up image and `images` rounds of one image each, one process running at a time and
    `pause_s` between calls (ONNX Runtime's threads spin a while after a run). Returns one
    result per bundle, in order: BundleTimer.info() with the medians `step_ms`, `image_ms` and
    every round's `step_ms_rounds`, or {"bundle", "error"} for a bundle that failed."""
    workers: dict[int, TimerProcess] = {}
    out: list[dict | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            workers[i] = TimerProcess(path, steps, threads, backend)
        except RuntimeError as e:  # one bundle that cannot load must not lose the others
            out[i] = {"bundle": str(path), "error": str(e)}
    times = {i: {"step": [], "image": []} for i in workers}
    rounds = [("step", "step", False)] + [("step", "step", True)] * repeat
    if images:
        rounds += [("image", "image 0", False)] + [("image", f"image {k}", True) for k in range(images)]
    for kind, request, keep in rounds:
        for i, worker in list(workers.items()):
            time.sleep(pause_s)
            try:
                ms = float(worker.ask(request))
            except RuntimeError as e:
                out[i] = {"bundle": str(paths[i]), "error": str(e)}
                del workers[i]
                continue
            if keep:
                times[i][kind].append(ms)
    for i, worker in workers.items():
        try:
            result = json.loads(worker.ask("quit"))
            worker.proc.wait(timeout=60)
        except RuntimeError as e:
            out[i] = {"bundle": str(paths[i]), "error": str(e)}
            continue
        finally:
            worker.stderr.close()
        result["step_ms"] = round(statistics.median(times[i]["step"]), 3) if times[i]["step"] else None
        result["image_ms"] = round(statistics.median(times[i]["image"]), 3) if times[i]["image"] else None
        result["step_ms_rounds"] = [round(t, 3) for t in times[i]["step"]]
        out[i] = result
    return out


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="timing worker of effgen.runtime.bench.bench_interleaved")
    p.add_argument("--serve", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--backend", default="ort")
    args = p.parse_args(argv)
    serve(args.serve, args.steps, args.threads, args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
