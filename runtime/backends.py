"""Backends run a bundle's components: named numpy arrays in, named numpy arrays out.

A component can have several variants (one graph per timestep group, DESIGN §4); the backend
picks the variant from the timestep it is given.
"""

from __future__ import annotations

import os
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


_ENV_ALLOCATOR = False
SHARE_MIN_BYTES = 64 << 20  # shared weights below this are cheaper duplicated (pre-packed)


def _register_env_allocator() -> None:
    """One CPU arena for every session that sets session.use_env_allocators (process-wide)."""
    global _ENV_ALLOCATOR
    if _ENV_ALLOCATOR:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, None)
    _ENV_ALLOCATOR = True


def shared_initializer_values(bundle: Bundle, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """The component's external initializers (manifest `shared_initializers`) as read-only
    views into ONE memory map of its weight file (INT4 data is left to the sessions: ONNX
    Runtime repacks it into MatMulNBits weights anyway)."""
    out: dict[str, np.ndarray] = {}
    maps: dict[str, np.memmap] = {}
    for t in entry.get("shared_initializers", []):
        try:
            dtype = np.dtype(t["data_type"])
        except TypeError:
            continue  # INT4 / UINT4: no numpy type
        loc = t["location"]
        if loc not in maps:
            maps[loc] = np.memmap(bundle.path(loc), dtype=np.uint8, mode="r")
        n = t["length"] // dtype.itemsize
        view = np.frombuffer(maps[loc], dtype=dtype, count=n, offset=t["offset"]).reshape(t["dims"])
        out[t["name"]] = view if t["offset"] % dtype.itemsize == 0 else view.copy()
    return out


def read_component_io(component, bundle: Bundle, name: str) -> dict[str, Any]:
    """Set what every backend's component exposes from its manifest entry; returns the entry."""
    entry = bundle.component(name)
    component.name = name
    component.variants = entry["variants"]
    component.input_names = [i["name"] for i in entry["inputs"]]
    component.output_names = [o["name"] for o in entry["outputs"]]
    component.batch = entry["inputs"][0]["shape"][0]
    return entry


class OrtComponent:
    """One component on ONNX Runtime's CPU (or CUDA) provider.

    An ort-cpu quantized denoiser is one graph for every timestep group (it picks the
    group's activation scales itself: one session, weights pre-packed once; measured on
    pixart-alpha-512 W8A8, 2 groups, 2 threads: 12.0-13.2 s per step and 1.39 GB peak as one
    graph, against 15.3 s and 2.1 GB as two pre-packed sessions and 17.0 s and 1.45 GB as two
    sessions sharing un-packed weights). Several variants are
    what TensorRT-target bundles (one graph per group) and ECAR's per-stage graphs bring here.
    A component with several variants whose graphs share one weight file
    creates its sessions with shared initializers (`share_weights`, default on for K > 1 on
    the CPU provider): every external initializer is one read-only view into one memory map,
    handed to every session with `SessionOptions.add_initializer`; pre-packing is off (a
    kernel's pre-packed copy is per session: measured, it made K sessions cost K x the
    weights) and the sessions share one arena (`session.use_env_allocators`). Measured on a
    16-layer int8 graph: 4 sessions 131 -> 132 MB instead of 131 -> 397 MB.
    Sharing costs latency where a GEMM is small next to re-packing its weight on every call
    (measured, pixart-ref W8A8: 19 ms per step pre-packed, 28 ms shared), so by default it is
    on only where the duplicated weights would matter: K > 1 and at least
    `SHARE_MIN_BYTES` of shared weights, and not for graphs with INT4 weights: MatMulNBits
    without pre-packing dequantizes its weight on every call (pixart-alpha-512 W4A8-MP, 2
    variants: slower than W8A8) and the INT4 data cannot be shared anyway (ONNX Runtime
    repacks it into new MatMulNBits initializers per session).
    `EFFGEN_ORT_SHARE_WEIGHTS=0|1` overrides; the sessions of a multi-variant component
    always share one arena.
    A TensorRT-target quantized bundle runs the Q/DQ reference semantics here
    (`session.disable_quant_qdq`): its S8S8 graphs with full-range int8 weights are not
    shaped for ONNX Runtime's integer kernels (see exporter/qdq.py, default_int8_format).
    """

    def __init__(self, bundle: Bundle, name: str, threads: int = 0,
                 providers: list[str] | None = None, share_weights: bool | None = None,
                 optimize: bool = True, profile_prefix: str | None = None):
        import onnxruntime as ort

        entry = read_component_io(self, bundle, name)
        self._dtypes = {i["name"]: np.dtype(i["dtype"]) for i in entry["inputs"]}
        opts = ort.SessionOptions()
        if not optimize:  # every node as written: Q/DQ run literally, nothing fused
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if profile_prefix:  # ONNX Runtime's profiler: one JSON trace per session (end_profiling)
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        providers = providers or ["CPUExecutionProvider"]
        quant = entry.get("quantization") or {}
        if quant.get("target") in ("trt", "trt-orin"):
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        cpu = providers == ["CPUExecutionProvider"]
        multi = len(self.variants) > 1 and cpu
        if share_weights is None:
            env = os.environ.get("EFFGEN_ORT_SHARE_WEIGHTS", "")
            tensors = entry.get("shared_initializers", [])
            int4 = any(t["data_type"] in ("INT4", "UINT4") for t in tensors)
            share_weights = multi and (env == "1" or (env != "0" and not int4 and sum(
                t["length"] for t in tensors) >= SHARE_MIN_BYTES))
        self.shared: dict[str, Any] = {}
        if share_weights and entry.get("shared_initializers"):
            self.shared = {k: ort.OrtValue.ortvalue_from_numpy(v)
                           for k, v in shared_initializer_values(bundle, entry).items()}
            for k, v in self.shared.items():
                opts.add_initializer(k, v)  # the sessions use this memory, they do not copy it
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if multi or self.shared:
            opts.add_session_config_entry("session.use_env_allocators", "1")
            _register_env_allocator()
        self.sessions = [ort.InferenceSession(str(bundle.path(v["onnx"])), opts, providers=providers)
                         for v in self.variants]

    def run(self, feeds: dict[str, np.ndarray], timestep: float | None = None) -> dict[str, np.ndarray]:
        sess = self.sessions[variant_index(self.variants, timestep)]
        feeds = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        return dict(zip(self.output_names, sess.run(self.output_names, feeds)))


BACKENDS = ("ort", "ort-reference", "ort-cuda", "trt")


def load_component(bundle: Bundle, name: str, backend: str = "ort", threads: int = 0) -> Component:
    """`ort`: ONNX Runtime on the CPU; `ort-reference`: the same with graph optimisations off,
    so every QuantizeLinear/DequantizeLinear runs as written (the ONNX semantics TensorRT is
    compared against); `ort-cuda`: ONNX Runtime's CUDA provider (effgen[gpu]); `trt`: the
    bundle's TensorRT engines for this GPU (built with effgen-build)."""
    if backend == "ort":
        return OrtComponent(bundle, name, threads)
    if backend == "ort-reference":
        return OrtComponent(bundle, name, threads, optimize=False)
    if backend == "ort-cuda":
        return OrtComponent(bundle, name, threads, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401

            from .cuda import cudart
            cudart()
        except ImportError as e:
            raise BundleError(f"the trt backend needs TensorRT, cuda-python and an NVIDIA GPU "
                              f"(pip install 'effgen[trt]', or JetPack's python3-libnvinfer on "
                              f"Jetson): {e}") from None
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
