"""Will a bundle's engines fit on a device? An estimate from the bundle's graphs alone.

Items counted (DESIGN §4, §9):
- engine weights: every initializer at the precision TensorRT keeps it in (FP32 -> FP16,
  INT8 -> 1 byte, INT4 -> half a byte), once per engine: one engine per timestep variant
  (K x the weights: one engine per variant, see engines/build.py on why not refit);
- activations: the peak of live intermediate tensors (FP16) when the graph runs in
  topological order, freeing a tensor after its last consumer: what a memory-reusing
  executor needs, per component, counted once because components run one at a time but
  TensorRT keeps each engine's activation memory allocated for its execution context;
- workspace: the builder's limit for tactic scratch memory;
- engine load: the serialized engine file is read into host memory while it is deserialized,
  which on Jetson is the same memory (transient, the largest one counts);
- the runtime process itself (Python, numpy, I/O buffers).
The device's own reserve (OS, CUDA context, cuBLAS/cuDNN, TensorRT libraries) is taken off its
memory first (engines/targets.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.bundle import Bundle
from .targets import Device

RUNTIME_PROCESS_BYTES = 200 << 20  # python + numpy + onnx-free runtime + I/O buffers
DEFAULT_WORKSPACE_MB = 512

# Bytes per element as TensorRT stores it: FP32 weights are built as FP16 (DESIGN §3).
_DEPLOYED_BYTES = {1: 2.0, 10: 2.0, 16: 2.0, 3: 1.0, 2: 1.0, 22: 0.5, 21: 0.5, 6: 4.0, 7: 8.0, 9: 1.0}
# onnx.TensorProto: FLOAT=1, FLOAT16=10, BFLOAT16=16, INT8=3, UINT8=2, INT4=22, UINT4=21,
# INT32=6, INT64=7, BOOL=9.


def _numel(dims) -> int:
    return int(np.prod([int(d) for d in dims])) if len(dims) else 1


def engine_weight_bytes(onnx_path: Path) -> int:
    """Bytes of the graph's initializers (and Constant nodes) at deployed precision."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0.0
    for t in model.graph.initializer:
        total += _numel(t.dims) * _DEPLOYED_BYTES.get(t.data_type, 4.0)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    total += _numel(a.t.dims) * _DEPLOYED_BYTES.get(a.t.data_type, 4.0)
    return int(total)


def peak_activation_bytes(onnx_path: Path, bytes_per_element: float = 2.0) -> int:
    """Peak sum of live intermediate tensors (graph inputs and outputs included) when nodes
    run in the graph's (topological) order."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
    g = model.graph
    consts = {t.name for t in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    sizes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            sizes[vi.name] = _numel([d.dim_value for d in dims]) * bytes_per_element
    last_use = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            last_use[name] = i
    outputs = {o.name for o in g.output}
    live = {i.name for i in g.input if i.name not in consts}
    current = sum(sizes.get(t, 0) for t in live)
    peak = current
    for i, n in enumerate(g.node):
        for o in n.output:
            if o and o not in consts and o not in live:
                live.add(o)
                current += sizes.get(o, 0)
        peak = max(peak, current)
        for name in set(n.input):
            if name in live and last_use.get(name) == i and name not in outputs:
                live.discard(name)
                current -= sizes.get(name, 0)
    return int(peak)


@dataclass
class MemoryPlan:
    device: Device
    items: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.items)

    @property
    def usable(self) -> int:
        return int((self.device.memory_gb - self.device.reserved_gb) * (1 << 30))

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def largest(self, n: int = 5) -> list[tuple[str, int]]:
        return sorted(self.items, key=lambda kv: -kv[1])[:n]

    def to_json(self) -> dict:
        return {"device": self.device.name, "memory_bytes": int(self.device.memory_gb * (1 << 30)),
                "reserved_bytes": int(self.device.reserved_gb * (1 << 30)),
                "usable_bytes": self.usable, "total_bytes": self.total, "fits": self.fits,
                "items": [{"name": k, "bytes": b} for k, b in self.items]}


def plan_memory(bundle: Bundle, device: Device, workspace_mb: int | None = None) -> MemoryPlan:
    plan = MemoryPlan(device)
    largest_engine = 0
    for name, comp in bundle.components.items():
        variants = comp["variants"]
        weights = engine_weight_bytes(bundle.path(variants[0]["onnx"]))
        copies = len(variants)
        label = f"{name} weights" + (f" x {copies} engines" if copies > 1 else "")
        plan.items.append((label, weights * copies))
        plan.items.append((f"{name} activations", peak_activation_bytes(bundle.path(variants[0]["onnx"]))))
        largest_engine = max(largest_engine, weights)
    plan.items.append(("workspace", (workspace_mb or DEFAULT_WORKSPACE_MB) << 20))
    if device.shared_memory:
        plan.items.append(("engine load (host copy while deserializing)", largest_engine))
    plan.items.append(("runtime process", RUNTIME_PROCESS_BYTES))
    return plan


def format_plan(plan: MemoryPlan) -> str:
    mb = lambda b: f"{b / (1 << 20):,.1f} MB"  # noqa: E731
    lines = [f"{plan.device.name}: {plan.device.memory_gb:g} GB"
             f"{' shared with the CPU' if plan.device.shared_memory else ''}, "
             f"{plan.device.reserved_gb:g} GB reserved for OS/CUDA/TensorRT -> {mb(plan.usable)} usable"]
    for name, b in plan.items:
        lines.append(f"  {name:<48} {mb(b):>14}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'total':<48} {mb(plan.total):>14}  -> {verdict} "
                 f"({mb(abs(plan.usable - plan.total))} {'free' if plan.fits else 'short'})")
    lines.append("largest: " + ", ".join(f"{k} ({mb(b)})" for k, b in plan.largest(3)))
    return "\n".join(lines)
