"""Build TensorRT engines for a bundle's graphs (TensorRT Python API, 10.3 as on JetPack 6;
10.x and 11.x on desktop).

One engine per variant (timestep group), fixed shapes from the ONNX graphs. A graph that
carries its own precisions (Q/DQ nodes, FP16 tensors) is built strongly typed, as TensorRT
wants for explicit quantization. A plain FP32 graph is built weakly typed with FP16 allowed on
TensorRT 10 (DESIGN §3: FP runs as fp16); TensorRT 11 builds only strongly typed networks, so
there the FP32 graph stays FP32 and the build says so.

No refit mode: one refittable engine whose activation-scale constants are refit per timestep
group would save K-1 copies of the weights, but it is only worth keeping if a GPU run shows
it gives the same outputs as separate engines, and no GPU has been available to show that;
the weights of K engines are counted honestly by `effgen plan-memory` instead.
"""

from __future__ import annotations

import datetime
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..runtime.bundle import Bundle, sha256_file, write_json_atomic
from .targets import BUILD_TARGETS


@dataclass
class BuildOptions:
    target: str = "desktop"
    workspace_mb: int | None = None
    optimization_level: int = 3
    timing_cache: Path | None = None

    def __post_init__(self):
        if self.target not in BUILD_TARGETS:
            raise ValueError(f"unknown target '{self.target}'; choose one of {', '.join(BUILD_TARGETS)}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError("builder optimization level must be 0..5")
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise ValueError("--workspace-mb must be positive")


def engine_path(component: str, variant: int, target: str) -> str:
    return f"engines/{component}.{variant}.{target}.plan"


def graph_is_typed(onnx_path: Path) -> bool:
    """True when the graph fixes its own precisions: Q/DQ nodes or FP16 initializers."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return True
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def trtexec_commands(bundle: Bundle, options: BuildOptions) -> list[str]:
    """The equivalent `trtexec` commands, one per variant, run from the bundle directory (for a
    device where only trtexec is installed, e.g. a bare JetPack image)."""
    cmds = []
    for name, comp in bundle.components.items():
        for i, v in enumerate(comp["variants"]):
            args = ["trtexec", f"--onnx={v['onnx']}",
                    f"--saveEngine={engine_path(name, i, options.target)}",
                    f"--builderOptimizationLevel={options.optimization_level}", "--skipInference"]
            if graph_is_typed(bundle.path(v["onnx"])):
                args.append("--stronglyTyped")
            else:
                args.append("--fp16")  # TensorRT 10: FP layers in fp16 (weakly typed)
            if options.workspace_mb:
                args.append(f"--memPoolSize=workspace:{options.workspace_mb}M")
            if options.timing_cache:
                args.append(f"--timingCacheFile={options.timing_cache}")
            cmds.append(" ".join(shlex.quote(a) for a in args))
    return cmds


def device_info() -> dict:
    """Name and compute capability of GPU 0, through cuda-python (no torch)."""
    from ..runtime.cuda import get_device_properties

    return get_device_properties(0)


def _build_one(trt, onnx_path: Path, options: BuildOptions, cache_blob: bytes | None, logger):
    builder = trt.Builder(logger)
    typed = graph_is_typed(onnx_path)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if typed or major >= 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if not typed and major < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(cache_blob or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}")
    return bytes(engine), bytes(config.get_timing_cache().serialize()), typed


def build_engines(bundle_dir: Path, options: BuildOptions,
                  log: Callable[[str], None] = print) -> dict:
    """Build every variant's engine into `bundle/engines/` and record them in the manifest."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ValueError("TensorRT is not installed here: install effgen[trt] on the machine "
                         "that will run the engines, or use --emit-trtexec") from None
    bundle = Bundle.load(bundle_dir)
    gpu = device_info()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_blob = (options.timing_cache.read_bytes()
                  if options.timing_cache and options.timing_cache.is_file() else None)
    (bundle.root / "engines").mkdir(exist_ok=True)
    manifest = bundle.manifest
    for name, comp in manifest["components"].items():
        for i, v in enumerate(comp["variants"]):
            rel = engine_path(name, i, options.target)
            log(f"building {rel} from {v['onnx']} ...")
            blob, cache_blob, typed = _build_one(trt, bundle.path(v["onnx"]), options, cache_blob, logger)
            fd, tmp = tempfile.mkstemp(dir=bundle.root / "engines", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, bundle.root / rel)
            v.setdefault("engines", {})[options.target] = rel
            v.setdefault("engine_typing", {})[options.target] = "strong" if typed else "weak-fp16"
            manifest["files"][rel] = sha256_file(bundle.root / rel)
    if options.timing_cache and cache_blob:
        options.timing_cache.write_bytes(cache_blob)
    manifest.setdefault("engines", {})[options.target] = {
        "tensorrt": trt.__version__, "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "builder_optimization_level": options.optimization_level,
        "workspace_mb": options.workspace_mb,
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(bundle.root / "manifest.json", manifest)
    return manifest["engines"][options.target]
