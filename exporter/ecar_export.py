"""Export an ECAR model to a bundle: components `ar` and `head`, one graph per stage each.

Every graph has fixed shapes (DESIGN §2), and the token count changes from stage to stage, so
each component has one variant per stage, keyed like timestep variants (`"timesteps": [s, s]`,
plus `"stage": s`); the runtime picks graph s with `timestep=s`. `ar` is a full-prefix graph:
stage s feeds the input tokens of stages 1..s (`prefix_tokens`, absent for stage 0) and the
class labels, and returns `z` for stage s's tokens only. `head` takes the stage's noisy tokens
`x_t`, the time `t` and `z`, and returns `velocity`.

The graphs of one component share one external weight file (`ar.weights`, `head.weights`):
tensors with the same bytes are stored once (DESIGN §4). The model entry carries the whole
ECAR config plus the derived schedule (stage time ranges, renoise coefficients) the runtime
applies, so the runtime does no schedule maths of its own.

Quantized (`--plan`/`--scales`): one plan covers both components (module paths `ar.*`,
`head.*`); its timestep groups are stage groups. Every stage graph is lowered with its stage
group's activation scales as constants, on every target (a stage graph runs one stage only,
so ONNX Runtime CPU needs no in-graph scale selection either), and checked against the
PyTorch simulation of that stage; the quantized weights, the same bytes in every stage graph,
are stored once.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import external_data_helper

from ..calib.plan import Plan
from ..calib.scales import write_calibration
from ..calib.simulate import sim_context
from ..calib.timesteps import group_index
from ..models.configs import get_spec
from ..models.ecar import ECAR, ECARConfig, load_ecar
from ..runtime.bundle import FORMAT, MANIFEST, sha256_file, write_json_atomic
from . import qdq
from .onnx_export import export_module, save_with_external_data
from .quantized import (SQNR_WARN_DB, prepare_quantization, quantization_entry, run_graph,
                        simulated_model, sqnr_db)

AR_INPUTS = ("class_labels", "prefix_tokens")
HEAD_INPUTS = ("x_t", "t", "z")


class ARStage(torch.nn.Module):
    """The AR transformer as run at stage `stage` (node names keep the `ar.` module paths)."""

    def __init__(self, model: ECAR, stage: int):
        super().__init__()
        self.ar = model.ar
        self.stage = stage

    def forward(self, class_labels, prefix_tokens=None):
        return self.ar(prefix_tokens, class_labels, upto=self.stage)


class HeadStep(torch.nn.Module):
    def __init__(self, model: ECAR):
        super().__init__()
        self.head = model.head

    def forward(self, x_t, t, z):
        return self.head(x_t, t, z)


def ar_example(cfg: ECARConfig, stage: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    if stage == 0:
        return (labels,)
    prefix = torch.randn(batch, cfg.offset(stage + 1) - cfg.tokens(0), cfg.token_dim, generator=g)
    return labels, prefix


def head_example(cfg: ECARConfig, stage: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n = cfg.tokens(stage)
    return (torch.randn(batch, n, cfg.token_dim, generator=g), torch.full((batch,), 0.5),
            torch.randn(batch, n, cfg.width, generator=g))


def share_external_data(onnx_paths: list[Path], weights_name: str, align: int = 64) -> None:
    """Rewrite the graphs at `onnx_paths` (each with its own external data) to point into one
    file `weights_name` next to them, storing tensors with identical bytes once."""
    root = onnx_paths[0].parent
    stored: dict[str, tuple[int, int]] = {}
    tmp = root / f".{weights_name}.tmp"
    models = []
    with open(tmp, "wb") as f:
        for path in onnx_paths:
            model = onnx.load(str(path))  # loads the external data into the tensors
            for tensor in external_data_helper._get_all_tensors(model):
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                    continue
                raw = tensor.raw_data
                key = hashlib.sha256(raw).hexdigest() + str(tensor.data_type) + str(list(tensor.dims))
                if key not in stored:
                    pad = (-f.tell()) % align
                    f.write(b"\0" * pad)
                    stored[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = stored[key]
                del tensor.external_data[:]
                external_data_helper.set_external_data(tensor, weights_name, offset, length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            models.append((path, model))
    for path, model in models:
        old = root / f"{path.stem}.weights"
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        if old.name != weights_name:
            old.unlink(missing_ok=True)
    os.replace(tmp, root / weights_name)


def _export_component(name: str, wrap: Callable[[ECAR, int], torch.nn.Module], ecar: ECAR,
                      examples: list[tuple], input_names: list[tuple[str, ...]], output: str,
                      work: Path, log: Callable[[str], None], quant=None) -> dict:
    """The stage graphs of one component (`wrap(model, s)` runs it as at stage s), sharing one
    weight file; with `quant` (exporter/quantized.Quantization) each graph is lowered with
    the scales of its stage's group and checked against the PyTorch simulation."""
    variants, errors, tolerances, paths = [], [], [], []
    if quant is not None:
        plan = component_plan(quant.plan, name)
        sim = simulated_model(ecar, quant)
    for s, (inputs, names) in enumerate(zip(examples, input_names)):
        graph = export_module(wrap(ecar, s), inputs, names, [output], work, f"{name}_stage{s}")
        paths.append(work / graph.onnx)
        variant = {"onnx": graph.onnx, "engines": {}, "timesteps": [s, s], "stage": s,
                   "inputs": graph.inputs, "outputs": graph.outputs}
        if quant is not None:
            report = lower_stage_graph(paths[-1], plan, quant, s)
            sim_context(sim).set_timestep(s)
            with torch.no_grad():
                ref = wrap(sim, s)(*inputs).numpy()
            out = run_graph(paths[-1], {n: x.numpy() for n, x in zip(names, inputs)}, quant.target)
            sqnr = sqnr_db(ref, out)
            note = "" if sqnr >= SQNR_WARN_DB else f"  WARNING: below {SQNR_WARN_DB:.0f} dB"
            log(f"  {graph.onnx} (stage {s}): ONNX Runtime vs {quant.target} simulation SQNR "
                f"{sqnr:.1f} dB{note}")
            variant["sqnr_vs_simulation_db"] = round(sqnr, 2) if np.isfinite(sqnr) else "inf"
        variants.append(variant)
        errors.append(graph.max_abs_error)
        tolerances.append(graph.tolerance)
    share_external_data(paths, f"{name}.weights")
    last = variants[-1]
    log(f"  {name}: {len(variants)} stage graphs, ONNX Runtime vs PyTorch max error {max(errors):.2e}"
        + (" (FP graphs)" if quant is not None else ""))
    # Component-level inputs/outputs: names and dtypes are those of every variant; the shapes
    # are the last stage's (each variant records its own).
    entry = {"inputs": last["inputs"], "outputs": last["outputs"], "external_data": f"{name}.weights",
             "variants": variants, "max_abs_error": max(errors), "tolerance": min(tolerances),
             "variant_key": "stage"}
    if quant is not None:
        entry["quantization"] = quantization_entry(plan, quant, report, work)
        violations = [f"{p.name}: {v}" for p in paths for v in qdq.check_file(p, quant.target)]
        if quant.target == "ort-cpu" and not violations:
            violations = [f"{p.name}: {v}" for p in paths for v in qdq.ort_unfused(p)]
        if violations:
            raise RuntimeError(f"lowered graph breaks the {quant.target} rules: {violations[0]}")
    return entry


def component_plan(plan: Plan, component: str) -> Plan:
    """The plan's layers of one component (`ar.*` or `head.*`): a component's graphs hold its
    own modules only."""
    return dataclasses.replace(plan, layers={m: p for m, p in plan.layers.items()
                                             if m.split(".")[0] == component})


def lower_stage_graph(path: Path, plan: Plan, quant, stage: int) -> dict:
    """Lower the stage graph at `path` in place: the plan's layers with the activation scales
    of the stage's group as constants (a stage graph runs one stage only, on every target)."""
    group = group_index(plan.timestep_groups, stage)
    lowered, report = qdq.lower(onnx.load(str(path)), plan, quant.scales, quant.target, group,
                                by_timestep=False)
    save_with_external_data(lowered, path, f"{path.stem}.weights")
    return report


def ecar_model_entry(name: str, cfg: ECARConfig) -> dict:
    ranges = cfg.stage_ranges()
    renoise = [None] + [
        {"data_scale": cfg.renoise_coefficients(s)[0], "noise_scale": cfg.renoise_coefficients(s)[1],
         "mean_noise_scale": cfg.mean_noise_scale} if cfg.schedule == "pyramid" else None
        for s in range(1, cfg.num_stages)]
    return {
        "name": name, "family": "ecar", "in_channels": cfg.in_channels,
        "sample_size": cfg.sample_size, "latent_space": False, "resolution": cfg.sample_size,
        "learned_sigma": False, "num_classes": cfg.num_classes, "text": None,
        "ecar": {**cfg.to_dict(), "stage_ranges": [list(r) for r in ranges], "renoise": renoise,
                 "token_dim": cfg.token_dim},
    }


def export_ecar_bundle(model: str, out: Path, batch: int = 2, ecar: ECAR | None = None,
                       log: Callable[[str], None] = print, quantize: dict | None = None) -> Path:
    """Export the ECAR spec `model` (or the given `ecar` module, e.g. a test's tiny one, named
    `model`) into the bundle directory `out` (replaced if it exists). `quantize`: keyword
    arguments of `quantized.prepare_quantization` (plan, scales_dir, target, n_calib, ...): both
    components are lowered, every stage graph with its stage group's activation scales, and
    plan.json + scales.safetensors go into the bundle."""
    from .export import _replace_dir, _version

    out = Path(out)
    spec = get_spec(model) if ecar is None else None
    if ecar is None:
        model = spec.name  # `ecar` -> `ecar-ref`: the bundle names the model itself
        ecar = load_ecar(model)
    cfg = ecar.cfg
    ecar = ecar.eval()
    quant = None
    if quantize is not None:
        if ecar.spec is None:
            raise ValueError(f"{model}: a quantized export needs an ECAR loaded by load_ecar (its spec)")
        quant = prepare_quantization(ecar, log=log, **quantize)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        n_params = sum(p.numel() for p in ecar.parameters())
        log(f"exporting ECAR {model} ({n_params / 1e6:.2f}M parameters, stages {cfg.stages}, "
            f"{cfg.schedule}, head {cfg.head_type}, batch {batch})")
        S = cfg.num_stages
        if quant is not None:  # the component entries hash the files
            write_calibration(work, quant.plan, quant.scales)
        components = {
            "ar": _export_component(
                "ar", ARStage, ecar, [ar_example(cfg, s, batch) for s in range(S)],
                [AR_INPUTS[:1] if s == 0 else AR_INPUTS for s in range(S)], "z", work, log, quant),
            "head": _export_component(
                "head", lambda m, s: HeadStep(m), ecar, [head_example(cfg, s, batch) for s in range(S)],
                [HEAD_INPUTS] * S, "velocity", work, log, quant),
        }
        files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()}

        manifest = {
            "format": FORMAT,
            "model": ecar_model_entry(model, cfg),
            "components": components,
            "scheduler": {"name": "ecar-multistage-euler", "schedule": cfg.schedule,
                          "gamma": cfg.gamma, "boundaries": list(cfg.boundaries)},
            "sampling": {"steps": sum(cfg.stage_steps), "stage_steps": list(cfg.stage_steps),
                         "guidance": cfg.cfg_scale, "batch": batch},
            "files": files,
            "provenance": {
                "effgen": _version(), "torch": torch.__version__,
                "checkpoint": (f"shipped:{spec.weights}" if spec is not None and spec.weights
                               else "in-memory module" if spec is None else "random-init(seed=0)"),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
            },
        }
        write_json_atomic(work / MANIFEST, manifest)
        os.chmod(work, 0o755)
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out
