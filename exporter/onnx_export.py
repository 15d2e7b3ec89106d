"""Floating-point ONNX export of a model's components, checked against PyTorch.

Each component is exported with fixed shapes at opset 21 by the TorchScript exporter, whose
node names carry the module path (`/transformer/transformer_blocks.0/attn1/to_q/MatMul`): the
QDQ passes map plan entries to graph nodes through them. Weights always go to one external
data file per component (`<component>.weights`), so graphs past 2 GB work and the timestep
variants of a component can share one weight file (DESIGN §4).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

OPSET = 21


@dataclass
class ExportedGraph:
    """What the manifest records about one exported graph."""

    onnx: str  # file name inside the bundle
    external_data: str
    inputs: list[dict]
    outputs: list[dict]
    max_abs_error: float
    tolerance: float


def _io_entries(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[dict]:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in zip(names, tensors)]


def export_module(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                  input_names: Sequence[str], output_names: Sequence[str], out_dir: Path,
                  name: str, rtol: float = 1e-3) -> ExportedGraph:
    """Export `module` to `out_dir/name.onnx` (+ `name.weights`), then run it in ONNX Runtime on
    `inputs` and compare with PyTorch. Raises if the largest error passes
    `rtol * max(1, max|reference|)`."""
    module = module.eval()
    with torch.no_grad():
        reference = module(*inputs)
    reference = reference if isinstance(reference, (tuple, list)) else (reference,)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / f"{name}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow
            torch.onnx.export(module, inputs, str(raw), input_names=list(input_names),
                              output_names=list(output_names), opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
        model = onnx.load(str(raw))  # pulls in external data the exporter wrote past 2 GB
    save_with_external_data(model, out_dir / f"{name}.onnx", f"{name}.weights")

    outputs = run_onnx(out_dir / f"{name}.onnx",
                       {n: t.numpy() for n, t in zip(input_names, inputs)})
    err, scale = 0.0, 1.0
    for ref, out in zip(reference, outputs):
        ref = ref.numpy()
        err = max(err, float(np.abs(ref - out).max()))
        scale = max(scale, float(np.abs(ref).max()))
    tolerance = rtol * scale
    if not err <= tolerance:  # also catches NaN
        raise RuntimeError(f"{name}: ONNX Runtime output differs from PyTorch by {err:.3g} "
                           f"(tolerance {tolerance:.3g})")
    return ExportedGraph(f"{name}.onnx", f"{name}.weights", _io_entries(input_names, inputs),
                         _io_entries(output_names, reference), err, tolerance)


def save_with_external_data(model: onnx.ModelProto, path: Path, weights_name: str) -> None:
    """Save `model` with all initializers above 1 KiB in one external file next to it."""
    (path.parent / weights_name).unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=weights_name, size_threshold=1024)


def run_onnx(path: Path, feeds: dict[str, np.ndarray], threads: int = 0) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
