"""Backends run a bundle's components: named numpy arrays in, named numpy arrays out.

A component can have several variants (one graph per timestep group, DESIGN §4); the backend
picks the variant from the timestep it is given.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .bundle import Bundle, BundleError


class Component(Protocol):
    input_names: list[str]
    batch: int

    def run(self, feeds: dict[str, np.ndarray], timestep: float | None = None) -> dict[str, np.ndarray]:
        ...


def variant_index(variants: list[dict[str, Any]], timestep: float | None) -> int:
    """The variant whose inclusive `timesteps` range holds `timestep` (the only one when the
    component has no ranges)."""
    if len(variants) == 1 or timestep is None:
        return 0
    for i, v in enumerate(variants):
        lo, hi = v["timesteps"]
        if lo <= timestep <= hi:
            return i
    raise BundleError(f"no variant covers timestep {timestep}")


class OrtComponent:
    """One component on ONNX Runtime's CPU (or CUDA) provider."""

    def __init__(self, bundle: Bundle, name: str, threads: int = 0,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        entry = bundle.component(name)
        self.name = name
        self.variants = entry["variants"]
        self.input_names = [i["name"] for i in entry["inputs"]]
        self.output_names = [o["name"] for o in entry["outputs"]]
        self.batch = entry["inputs"][0]["shape"][0]
        self._dtypes = {i["name"]: np.dtype(i["dtype"]) for i in entry["inputs"]}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = [ort.InferenceSession(str(bundle.path(v["onnx"])), opts, providers=providers)
                         for v in self.variants]

    def run(self, feeds: dict[str, np.ndarray], timestep: float | None = None) -> dict[str, np.ndarray]:
        sess = self.sessions[variant_index(self.variants, timestep)]
        feeds = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        return dict(zip(self.output_names, sess.run(self.output_names, feeds)))


BACKENDS = ("ort", "ort-cuda", "trt")


def load_component(bundle: Bundle, name: str, backend: str = "ort", threads: int = 0) -> Component:
    """`ort`: ONNX Runtime on the CPU; `ort-cuda`: ONNX Runtime's CUDA provider (effgen[gpu]);
    `trt`: the bundle's TensorRT engines for this GPU (built with effgen-build)."""
    if backend == "ort":
        return OrtComponent(bundle, name, threads)
    if backend == "ort-cuda":
        return OrtComponent(bundle, name, threads, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if backend == "trt":
        from .trt_backend import TrtComponent, engine_target

        return TrtComponent(bundle, name, engine_target(bundle))
    raise ValueError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")


def run_in_batches(component: Component, arrays: dict[str, np.ndarray],
                   timestep: float | None = None) -> dict[str, np.ndarray]:
    """Run a fixed-batch component over N rows: chunks of its batch, the last one padded by
    repeating its final row (the padding's outputs are dropped)."""
    n = len(next(iter(arrays.values())))
    b = component.batch
    outs: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, b):
        chunk = {k: v[start:start + b] for k, v in arrays.items()}
        k = len(next(iter(chunk.values())))
        if k < b:
            chunk = {name: np.concatenate([v, np.repeat(v[-1:], b - k, 0)]) for name, v in chunk.items()}
        for name, v in component.run(chunk, timestep).items():
            outs.setdefault(name, []).append(v[:k])
    return {k: np.concatenate(v) for k, v in outs.items()}
