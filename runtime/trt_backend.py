"""TensorRT backend: a component's engines, device buffers allocated once, `execute_async_v3`,
and a CUDA graph per variant replayed on every later call (shapes are fixed, so the captured
launch stays valid; only the input bytes change).

Engines are refused, with one line, when they were built by another TensorRT version or for a
GPU of another compute capability: TensorRT engines are not portable.
"""

from __future__ import annotations

import numpy as np

from .backends import read_component_io, variant_index
from .bundle import Bundle, BundleError
from .cuda import DeviceBuffer, check, cudart, get_device_properties


def check_engine_compatible(build: dict | None, target: str, trt_version: str, gpu: dict) -> None:
    """Refuse engines that this TensorRT and GPU cannot run (pure, tested in CI)."""
    if not build:
        raise BundleError(f"the bundle has no '{target}' engines: build them on this device with "
                          f"`effgen-build BUNDLE --target {target}`")
    if build["tensorrt"] != trt_version:
        raise BundleError(f"the '{target}' engines were built by TensorRT {build['tensorrt']}, this "
                          f"is TensorRT {trt_version}: rebuild them with effgen-build")
    if build["compute_capability"] != gpu["compute_capability"]:
        raise BundleError(f"the '{target}' engines were built for {build['gpu']} (sm "
                          f"{build['compute_capability']}), this GPU is {gpu['name']} (sm "
                          f"{gpu['compute_capability']}): rebuild them with effgen-build")


def engine_target(bundle: Bundle) -> str:
    """The engine target built for this GPU's compute capability (desktop or orin)."""
    builds = bundle.manifest.get("engines", {})
    if not builds:
        raise BundleError(f"{bundle.root} has no TensorRT engines: build them on this device "
                          "with `effgen-build BUNDLE --target desktop|orin`")
    cc = get_device_properties(0)["compute_capability"]
    for target, build in builds.items():
        if build["compute_capability"] == cc:
            return target
    return next(iter(builds))  # check_engine_compatible explains the mismatch


class TrtComponent:
    """One component on TensorRT, same interface as OrtComponent."""

    def __init__(self, bundle: Bundle, name: str, target: str, use_cuda_graph: bool = True):
        import tensorrt as trt

        check_engine_compatible(bundle.manifest.get("engines", {}).get(target), target,
                                trt.__version__, get_device_properties(0))
        entry = read_component_io(self, bundle, name)
        rt = cudart()
        self.stream = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.use_cuda_graph = use_cuda_graph
        # Buffers are shared by all variants of the component: they have the same I/O.
        self.buffers = {io["name"]: DeviceBuffer(io["shape"], io["dtype"])
                        for io in entry["inputs"] + entry["outputs"]}
        self.engines, self.contexts, self.graphs = [], [], []
        for v in self.variants:
            rel = v.get("engines", {}).get(target)
            if rel is None:
                raise BundleError(f"variant {v['onnx']} has no '{target}' engine")
            engine = self._runtime.deserialize_cuda_engine(bundle.path(rel).read_bytes())
            if engine is None:
                raise BundleError(f"TensorRT could not load {rel}")
            context = engine.create_execution_context()
            for tensor, buf in self.buffers.items():
                context.set_tensor_address(tensor, int(buf.ptr))
            self.engines.append(engine)
            self.contexts.append(context)
            self.graphs.append(None)

    def _launch(self, i: int) -> None:
        rt = cudart()
        if not self.use_cuda_graph:
            if not self.contexts[i].execute_async_v3(self.stream):
                raise RuntimeError(f"{self.name}: TensorRT execution failed")
            return
        if self.graphs[i] is None:
            # The first call runs normally (TensorRT finishes lazy setup), then one launch is
            # captured; later calls replay it.
            self.contexts[i].execute_async_v3(self.stream)
            check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            check(rt.cudaStreamBeginCapture(
                self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                "cudaStreamBeginCapture")
            self.contexts[i].execute_async_v3(self.stream)
            graph = check(rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            self.graphs[i] = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        check(rt.cudaGraphLaunch(self.graphs[i], self.stream), "cudaGraphLaunch")

    def run(self, feeds: dict[str, np.ndarray], timestep: float | None = None) -> dict[str, np.ndarray]:
        for name, value in feeds.items():
            self.buffers[name].upload(value, self.stream)
        self._launch(variant_index(self.variants, timestep))
        outs = {n: self.buffers[n].download(self.stream) for n in self.output_names}
        check(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outs
