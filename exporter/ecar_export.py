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
"""

from __future__ import annotations

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
from onnx import external_data_helper, numpy_helper

from ..models.configs import get_spec
from ..models.ecar import ECAR, ECARConfig, config_of, load_ecar
from ..runtime.bundle import FORMAT, MANIFEST, sha256_file, write_json_atomic
from .onnx_export import export_module

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


def _export_component(name: str, wrappers: list[torch.nn.Module], examples: list[tuple],
                      input_names: list[tuple[str, ...]], output: str, work: Path,
                      log: Callable[[str], None]) -> dict:
    variants, errors, tolerances, paths = [], [], [], []
    for s, (module, inputs, names) in enumerate(zip(wrappers, examples, input_names)):
        graph = export_module(module, inputs, names, [output], work, f"{name}_stage{s}")
        paths.append(work / graph.onnx)
        variants.append({"onnx": graph.onnx, "engines": {}, "timesteps": [s, s], "stage": s,
                         "inputs": graph.inputs, "outputs": graph.outputs})
        errors.append(graph.max_abs_error)
        tolerances.append(graph.tolerance)
    share_external_data(paths, f"{name}.weights")
    last = variants[-1]
    log(f"  {name}: {len(variants)} stage graphs, ONNX Runtime vs PyTorch max error {max(errors):.2e}")
    # Component-level inputs/outputs: names and dtypes are those of every variant; the shapes
    # are the last stage's (each variant records its own).
    return {"inputs": last["inputs"], "outputs": last["outputs"], "external_data": f"{name}.weights",
            "variants": variants, "max_abs_error": max(errors), "tolerance": min(tolerances),
            "variant_key": "stage"}


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
                       log: Callable[[str], None] = print) -> Path:
    """Export the ECAR spec `model` (or the given `ecar` module, e.g. a test's tiny one, named
    `model`) into the bundle directory `out` (replaced if it exists)."""
    from .export import _replace_dir, _version

    out = Path(out)
    spec = get_spec(model) if ecar is None else None
    if ecar is None:
        ecar = load_ecar(model)
    cfg = ecar.cfg
    ecar = ecar.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        n_params = sum(p.numel() for p in ecar.parameters())
        log(f"exporting ECAR {model} ({n_params / 1e6:.2f}M parameters, stages {cfg.stages}, "
            f"{cfg.schedule}, head {cfg.head_type}, batch {batch})")
        S = cfg.num_stages
        components = {
            "ar": _export_component(
                "ar", [ARStage(ecar, s) for s in range(S)],
                [ar_example(cfg, s, batch) for s in range(S)],
                [AR_INPUTS[:1] if s == 0 else AR_INPUTS for s in range(S)], "z", work, log),
            "head": _export_component(
                "head", [HeadStep(ecar)] * S, [head_example(cfg, s, batch) for s in range(S)],
                [HEAD_INPUTS] * S, "velocity", work, log),
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
