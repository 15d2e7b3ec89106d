"""The quantized denoiser of a bundle: plan + scales (calibrated now, or from `effgen calib`)
baked into one QDQ graph per timestep group (DESIGN §3, §4; on ONNX Runtime CPU one graph
that picks each group's activation scales by its timestep input, exporter/qdq.py
`scales_in_graph`), checked against the PyTorch simulation of the same plan, scales and
target in every group.

    quant = prepare_quantization(denoiser, plan="samples/plans/w8a8.json", target="ort-cpu")
    entry = export_quantized_denoiser(denoiser, quant, batch, sample_size, work_dir, log)
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..calib.plan import TARGETS, Plan, PlanError, read_plan_file
from .onnx_export import OPSET, export_module

SQNR_WARN_DB = 35.0  # ORT vs simulation below this is reported as a warning


@dataclasses.dataclass
class Quantization:
    plan: Plan
    scales: dict[str, Any]  # torch tensors, keys of calib.scales
    target: str
    source: str  # "calibrated" | the --scales directory
    fp_bundle: Path | None = None  # reuse this FP bundle's denoiser graph instead of exporting


def prepare_quantization(denoiser, plan: str | Path | None = None, scales_dir: str | Path | None = None,
                         target: str | None = None, n_calib: int = 32, calib_steps: int | None = None,
                         prompts: str | Path | None = None, device: str | None = None,
                         fp_bundle: str | Path | None = None,
                         log: Callable[[str], None] = print) -> Quantization:
    """Calibrate `plan` for `denoiser` on `target` (cached statistics are reused) over
    `prompts` (a prompt or text states file, calib.stats.calibration_items; default: held-out
    reference prompts), its sampler passes on the torch `device`; or read a calibration
    directory (plan.json + scales.safetensors from `effgen calib`). `fp_bundle`: an FP bundle
    of the same model and shapes whose denoiser graph is lowered (no new export)."""
    from ..calib.calibrate import calibrate, resolve_for_model
    from ..calib.scales import PLAN_FILE, SCALES_FILE, load_scales
    from ..calib.targets import effective_precision
    from ..calib.stats import model_calibration_items, module_kind, quantizable_modules

    if target is not None and target not in TARGETS:
        raise PlanError(f"--target: {target!r} is not one of {', '.join(TARGETS)}")
    if scales_dir is not None:
        if prompts is not None or device is not None:
            raise PlanError("--prompts and --calib-device calibrate: give them with --plan, not "
                            "with --scales")
        scales_dir = Path(scales_dir)
        if not (scales_dir / SCALES_FILE).is_file():
            raise FileNotFoundError(f"{scales_dir} has no {SCALES_FILE} (a directory written by effgen calib)")
        resolved = resolve_for_model(denoiser, read_plan_file(scales_dir / PLAN_FILE))
        if plan is not None:
            given = resolve_for_model(denoiser, read_plan_file(plan), resolved.target)
            if given.layers != resolved.layers:
                raise PlanError(f"--plan {plan} is not the plan {scales_dir / PLAN_FILE} was "
                                "calibrated for: give only --scales, or recalibrate")
        scales = load_scales(scales_dir / SCALES_FILE, resolved)
        target = target or resolved.target
        if target != resolved.target:
            modules = quantizable_modules(denoiser)
            differ = [n for n, p in resolved.quantized().items()
                      if effective_precision(p, module_kind(modules[n]), target)
                      != effective_precision(p, module_kind(modules[n]), resolved.target)]
            if differ:
                raise PlanError(f"--target {target}: {scales_dir} was calibrated for "
                                f"{resolved.target}, and {differ[0]} runs at another precision on "
                                f"{target}; recalibrate with --target {target}")
        log(f"plan and scales from {scales_dir} ({resolved.target}, "
            f"{len(resolved.timestep_groups)} timestep group(s))")
        return Quantization(resolved, scales, target, str(scales_dir),
                            None if fp_bundle is None else Path(fp_bundle))
    if plan is None:
        raise PlanError("give --plan PLAN (calibrated now) or --scales DIR (from effgen calib)")
    raw = read_plan_file(plan)
    items = model_calibration_items(denoiser, n_calib, prompts)
    resolved, scales = calibrate(denoiser, raw, target, items=items, steps=calib_steps,
                                 log=log, progress=False, device=device)
    log(f"calibrated {Path(plan).name} for {resolved.target}: "
        f"{len(resolved.timestep_groups)} timestep group(s) {resolved.timestep_groups}")
    return Quantization(resolved, scales, resolved.target, "calibrated",
                        None if fp_bundle is None else Path(fp_bundle))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    err = float(((ref - np.asarray(out, np.float64)) ** 2).mean())
    return float("inf") if err == 0 else float(10 * np.log10(float((ref ** 2).mean()) / err))


def group_timestep(lo: int, hi: int) -> float:
    return float((lo + hi) // 2)


def simulated_model(denoiser, quant: Quantization):
    """A copy of `denoiser` with the plan's layers swapped for their simulation."""
    from ..calib.simulate import quantize_

    sim = copy.deepcopy(denoiser)
    quantize_(sim, quant.plan, quant.scales, quant.target)
    return sim


def simulation_sqnr(denoiser, quant: Quantization, path: Path, inputs: tuple, group: int,
                    input_names, threads: int = 0, sim=None) -> float:
    """SQNR (dB) of ONNX Runtime running the variant graph `path` against the PyTorch
    simulation (`calib.simulate.quantize_`, same plan, scales and target) on `inputs`, at a
    timestep inside the variant's group. TensorRT graphs run in ONNX Runtime without graph
    optimizations (the reference semantics of Q/DQ). `sim`: a `simulated_model` to reuse."""
    import torch

    from ..calib.simulate import sim_context

    lo, hi = quant.plan.timestep_groups[group]
    t = group_timestep(lo, hi)
    b = inputs[0].shape[0]
    feeds_t = (inputs[0], torch.full((b,), t), *inputs[2:])
    sim = simulated_model(denoiser, quant) if sim is None else sim
    sim_context(sim).set_timestep(t)
    with torch.no_grad():
        ref = sim(*feeds_t).numpy()
    out = run_graph(path, {n: x.numpy() for n, x in zip(input_names, feeds_t)}, quant.target, threads)
    return sqnr_db(ref, out)


def run_graph(path: Path, feeds: dict[str, np.ndarray], target: str, threads: int = 0) -> np.ndarray:
    """The graph's first output in ONNX Runtime: TensorRT graphs with every node as written
    (the reference semantics of their Q/DQ), ort-cpu graphs as ONNX Runtime optimizes them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if target != "ort-cpu":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def quantization_entry(plan: Plan, quant: Quantization, report: dict, work: Path) -> dict[str, Any]:
    """A quantized component's manifest `quantization`: the target, the plan and scales files
    (in `work`) and their hashes, the timestep groups and what every layer of `plan` (the
    component's layers) runs as, with a count per precision."""
    from ..calib.scales import PLAN_FILE, SCALES_FILE, plan_hash
    from ..runtime.bundle import sha256_file
    from . import qdq

    counts: dict[str, int] = {}
    for r in report.values():
        counts[r.to_json()["precision"]] = counts.get(r.to_json()["precision"], 0) + 1
    counts["FP"] = len(plan.layers) - sum(counts.values())
    fp_layers = {m: {"planned": p.to_json(), "precision": "FP"} for m, p in plan.layers.items()
                 if m not in report}
    return {
        "target": quant.target, "int8_format": qdq.default_int8_format(quant.target), "opset": OPSET,
        "plan": PLAN_FILE, "scales": SCALES_FILE, "plan_sha256": plan_hash(quant.plan),
        "plan_file_sha256": sha256_file(work / PLAN_FILE),
        "scales_sha256": sha256_file(work / SCALES_FILE), "source": quant.source,
        "timestep_groups": [list(g) for g in plan.timestep_groups], "summary": counts,
        "layers": {**{m: r.to_json() for m, r in report.items()}, **fp_layers},
    }


def _fp_from_bundle(bundle_dir: Path, denoiser, inputs):
    """The FP denoiser graph of an FP bundle of the same model, checked against `inputs`."""
    from ..runtime.bundle import Bundle
    from .onnx_export import ExportedGraph

    bundle = Bundle.load(bundle_dir, verify_hashes=False)
    entry = bundle.component("denoiser")
    if bundle.model["name"] != denoiser.spec.name or entry.get("quantization") or len(entry["variants"]) != 1:
        raise ValueError(f"{bundle_dir}: not an FP bundle of {denoiser.spec.name}")
    shapes = [list(x.shape) for x in inputs]
    if [i["shape"] for i in entry["inputs"]] != shapes:
        raise ValueError(f"{bundle_dir}: denoiser inputs {[i['shape'] for i in entry['inputs']]} "
                         f"differ from this export's {shapes}")
    graph = ExportedGraph(entry["variants"][0]["onnx"], entry["external_data"], entry["inputs"],
                          entry["outputs"], entry["max_abs_error"], entry["tolerance"])
    return graph, bundle.path(graph.onnx)


def export_quantized_denoiser(denoiser, quant: Quantization, batch: int, sample_size: int,
                              work: Path, log: Callable[[str], None] = print,
                              output: str = "model_output") -> dict[str, Any]:
    """Write the denoiser's variant graphs, their shared `denoiser.weights`, `plan.json` and
    `scales.safetensors` into `work`; return the manifest's component entry."""
    import onnx

    from ..calib.scales import write_calibration
    from . import qdq

    plan, target = quant.plan, quant.target
    inputs = denoiser.example_inputs(batch, sample_size=sample_size)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        if quant.fp_bundle is not None:
            fp, fp_path = _fp_from_bundle(quant.fp_bundle, denoiser, inputs)
            log(f"  FP denoiser from {quant.fp_bundle} (max error {fp.max_abs_error:.2e} at its export)")
        else:
            fp = export_module(denoiser, inputs, denoiser.input_names, [output], Path(tmp), "denoiser")
            fp_path = Path(tmp) / fp.onnx
            log(f"  FP denoiser: ONNX Runtime vs PyTorch max error {fp.max_abs_error:.2e}")
        model = onnx.load(str(fp_path))
        files, weights, report = qdq.write_variants(model, plan, quant.scales, target, work, "denoiser")
        del model
    write_calibration(work, plan, quant.scales)
    violations = [f"{f}: {v}" for f in files for v in qdq.check_file(work / f, target)]
    if target == "ort-cpu" and not violations:  # the variants differ only in scale values
        violations = [f"{files[0]}: {v}" for v in qdq.ort_unfused(work / files[0])]
    if violations:
        raise RuntimeError(f"lowered graph breaks the {target} rules: {violations[0]}"
                           + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""))
    # One graph per timestep group, or (scales in the graph) one graph checked in every group.
    sim = simulated_model(denoiser, quant)
    sqnr = []
    for g, (lo, hi) in enumerate(plan.timestep_groups):
        f = qdq.graph_of_group(files, g)
        s = simulation_sqnr(denoiser, quant, work / f, inputs, g, denoiser.input_names, sim=sim)
        note = "" if s >= SQNR_WARN_DB else f"  WARNING: below {SQNR_WARN_DB:.0f} dB"
        log(f"  {f} (timesteps {lo}..{hi}): ONNX Runtime vs {target} simulation SQNR {s:.1f} dB{note}")
        sqnr.append(round(s, 2) if np.isfinite(s) else "inf")
    del sim
    groups = [[int(lo), int(hi)] for lo, hi in plan.timestep_groups]
    if len(files) > 1:
        variants = [{"onnx": f, "engines": {}, "timesteps": r, "sqnr_vs_simulation_db": v}
                    for f, r, v in zip(files, groups, sqnr)]
    else:
        finite = [v for v in sqnr if v != "inf"]
        variants = [{"onnx": files[0], "engines": {}, "timesteps": [groups[0][0], groups[-1][1]],
                     "sqnr_vs_simulation_db": min(finite) if finite else "inf",
                     "sqnr_vs_simulation_db_by_group": sqnr}]
    base = onnx.load(str(work / files[0]), load_external_data=False)
    quantization = quantization_entry(plan, quant, report, work)
    log("  layers: " + ", ".join(f"{v} {k}" for k, v in sorted(quantization["summary"].items())))
    return {
        "inputs": fp.inputs, "outputs": fp.outputs, "external_data": weights, "variants": variants,
        "max_abs_error": fp.max_abs_error, "tolerance": fp.tolerance,
        "quantization": quantization,
        "shared_initializers": qdq.external_initializers(base),
    }

