"""The scales file (`scales.safetensors`, format `effgen.scales/1`, DESIGN §2).

Tensors, per quantized layer `L` (module path):
  `L.w_scale`  weight scales of the weight as it ships (after smoothing/rotation):
               (out,) per output channel, (out, K // block) blockwise; w = q * scale
  `L.a_amax`   (G,) static activation amax per timestep group (scale = amax / 127), for
               layers whose effective precision quantizes activations (after smoothing and
               rotation: the amax of the tensor that is really quantized)
  `L.a_shift`  (G,) activation shift per timestep group, for the layers the plan shifts
               (techniques.act_shift): x - a_shift is quantized with a_amax, a whole number
               of grid steps; the layer adds W a_shift back
  `L.smooth`   (in,) smoothing vector s: the shipped weight is W diag(s) (then rotated,
               when the plan rotates L), the activation is multiplied by 1/s
  `L.w_codes`  int8 (out, K) integer weights on the `w_scale` grid, where the plan rounds
               weights by GPTQ (calib/gptq.py): used as they are instead of rounding
Metadata: `format`, `plan_sha256` (sha256 of the canonical JSON of the resolved plan the
scales belong to), `model`, `target`, `timestep_groups` (JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .plan import Plan

FORMAT = "effgen.scales/1"
SCALES_FILE = "scales.safetensors"
PLAN_FILE = "plan.json"
SUFFIXES = ("w_scale", "a_amax", "a_shift", "smooth", "w_codes")


class ScalesError(ValueError):
    """A scales file that cannot be used with the given plan; one line."""


def canonical_json(plan: Plan | dict[str, Any]) -> str:
    doc = plan.to_json() if isinstance(plan, Plan) else plan
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def plan_hash(plan: Plan | dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a resolved plan."""
    return hashlib.sha256(canonical_json(plan).encode()).hexdigest()


def key(layer: str, what: str) -> str:
    return f"{layer}.{what}"


def split_key(k: str) -> tuple[str, str]:
    layer, _, what = k.rpartition(".")
    if what not in SUFFIXES or not layer:
        raise ScalesError(f"scales: unknown tensor name {k!r}")
    return layer, what


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_scales(path: str | Path, scales: dict[str, torch.Tensor], plan: Plan) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    for k in scales:
        split_key(k)
    meta = {"format": FORMAT, "plan_sha256": plan_hash(plan), "model": plan.model,
            "target": plan.target, "timestep_groups": json.dumps([list(g) for g in plan.timestep_groups])}
    tensors = {k: (v.detach().to(torch.int8) if k.endswith(".w_codes") else v.detach().float())
               .contiguous().cpu() for k, v in sorted(scales.items())}
    _atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def scales_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scales file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ScalesError(f"{path} is not a safetensors file ({str(e).splitlines()[0]})") from None


def load_scales(path: str | Path, plan: Plan | dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read a scales file, refusing one that belongs to another plan (one-line ScalesError)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = scales_metadata(path)
    if meta.get("format") != FORMAT:
        raise ScalesError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    want, have = plan_hash(plan), meta.get("plan_sha256", "")
    if have != want:
        raise ScalesError(f"{path} belongs to another plan (plan sha256 {have[:12]}, this plan "
                          f"{want[:12]}): use the plan.json written with it or recalibrate")
    scales = load_file(str(path))
    for k in scales:
        split_key(k)
    return scales


def write_calibration(out_dir: str | Path, plan: Plan, scales: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """`plan.json` and `scales.safetensors` into `out_dir`, each written to a temporary
    name and renamed (scales first, so a complete plan.json always has its scales)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scales_path = save_scales(out / SCALES_FILE, scales, plan)
    text = json.dumps(plan.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    plan_path = out / PLAN_FILE

    def write(tmp):
        Path(tmp).write_text(text)

    _atomic_write_bytes(plan_path, write)
    return plan_path, scales_path
