"""GPTQ weight rounding (Frantar et al., 2022): the integer weights that minimise the layer's
output error on the calibration activations, column by column, instead of rounding every
weight to its nearest grid point.

Rounding weight column i leaves an error e_i; GPTQ moves that error onto the columns not yet
rounded along the inverse Hessian of the layer's input (H = sum of x x^T over the calibration
rows), where it cancels in the output as far as the inputs' correlations allow. The scales stay
those of `weight_scale` (computed before, "static groups"), so the codes are on exactly the
grid the scales file describes; the scales file carries them as `L.w_codes` and the
simulation and the exporter use them instead of rounding.

    H = collect_hessians(denoiser, layers, ...)          # one (K, K) per layer, cached
    codes = gptq_codes(w, H[name], bits, granularity, scale)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from .quantizers import qmax
from .stats import (CALIB_SEED, cache_dir, calibration_items, on_device, read_cache, run_sampler,
                    sampler_config, weights_hash)

HESSIAN_FORMAT = "effgen.hessians/2"  # /2: float32 (was float64)
DEFAULT_DAMP = 0.01  # fraction of the mean diagonal added to H (GPTQ's percdamp)
BLOCK = 128  # columns rounded per lazy batch update


def column_scales(scale: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """(rows, K): the scale of every weight, from (out,) per channel or (out, K // block)."""
    if scale.ndim == 1:
        return scale.float()[:, None].expand(rows, k)
    return scale.float().repeat_interleave(k // scale.shape[1], dim=1)


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, bits: int, scale: torch.Tensor,
               damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """int8 codes (out, K) of the Linear weight `w` (out, K) on the grid of `scale`, rounded
    column by column with GPTQ's error feedback along `hessian` (K, K) of its inputs."""
    out, k = w.shape
    H = hessian.detach().double().clone()
    if H.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} for a weight with {k} input features")
    dead = torch.diag(H) <= 0  # channels the calibration never fed: any rounding is as good
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    # The upper Cholesky factor of H^-1: row i holds how the remaining columns absorb the
    # error of column i (GPTQ's Cholesky form, numerically stable).
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # Work on W^T (K, out): column i of W is the contiguous row i, so every per-column step
    # and rank-1 update below runs over contiguous memory (the same codes; 1.4-1.7x faster
    # on pixart-alpha-512's FFN layers on 2 cores, several times faster when they are busy).
    Wt = torch.empty(k, out, dtype=torch.float64).copy_(w.detach().T)
    St = column_scales(scale, out, k).T.double().contiguous()
    q = qmax(bits)
    codes = torch.zeros(k, out, dtype=torch.int8)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        Wb, Ub = Wt[b0:b1].clone(), U[b0:b1, b0:b1]
        Eb = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            row, s = Wb[j], St[b0 + j]
            c = torch.clamp(torch.round(row / s), -q - 1, q)
            codes[b0 + j] = c.to(torch.int8)
            err = (row - c * s) / Ub[j, j]
            Wb[j + 1:].addr_(Ub[j, j + 1:], err, alpha=-1)
            Eb[j] = err
        Wt[b1:].addmm_(U[b0:b1, b1:].T, Eb, alpha=-1)
    return codes.T.contiguous()


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """The float weight the codes stand for, in the weight's own shape."""
    rows = codes.reshape(codes.shape[0], -1).float()
    return (rows * column_scales(scale, *rows.shape)).reshape(shape)


def transform_hessian(H: torch.Tensor, smooth: torch.Tensor | None,
                      rot: torch.Tensor | None) -> torch.Tensor:
    """The Hessian of the input as the quantized weight sees it: x' = (x / s) R gives
    H' = R^T diag(1/s) H diag(1/s) R."""
    if smooth is not None:
        inv = 1.0 / smooth.double()
        H = H * inv[:, None] * inv[None, :]
    if rot is not None:
        R = rot.double()
        H = R.T @ H @ R
    return H


class _HessianHooks:
    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        # float32, as GPTQ's reference keeps H: the x^T x products are half the arithmetic of
        # float64 (on a 600M-parameter PixArt they cost more than the forward passes) and the
        # cache half the disk; gptq_codes factors H in float64.
        self.H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32,
                                 device=m.weight.device) for n, m in modules.items()}
        self.rows = {n: 0 for n in modules}
        self.handles = []

    def __enter__(self):
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.H[name].addmm_(x.T, x)
            self.rows[name] += x.shape[0]
        return hook


def collect_hessians(model, layers: Sequence[str], items: Sequence | None = None,
                     n_calib: int = 32, steps: int | None = None, guidance: float | None = None,
                     seed: int = CALIB_SEED, use_cache: bool = True,
                     cache: str | Path | None = None, progress: bool = True,
                     log: Callable[[str], None] | None = None,
                     device: str | None = None) -> dict[str, torch.Tensor]:
    """H = sum x x^T / rows of every Linear in `layers` over the FP sampler (all steps or
    stages, both CFG halves), float32 on the CPU, cached by model, data, sampler and layers;
    the sampler and the products run on the torch `device` (default: where the model is)."""
    from safetensors.torch import load_file, save_file

    from .scales import _atomic_write_bytes

    spec = model.spec
    wanted = set(layers)
    modules = {n: m for n, m in model.named_modules() if n in wanted}
    if len(modules) != len(wanted):
        raise ValueError(f"no module {sorted(wanted - set(modules))[0]} in {spec.name}")
    not_linear = [n for n, m in modules.items() if not isinstance(m, torch.nn.Linear)]
    if not_linear:
        raise ValueError(f"GPTQ rounds Linear weights; {not_linear[0]} is not a Linear")
    items = list(items) if items is not None else calibration_items(spec, n_calib, seed=seed)
    sampler = sampler_config(model, steps, guidance)
    doc = {"format": HESSIAN_FORMAT, "model": spec.name, "weights": weights_hash(model),
           "data": items, "noise_seed": seed, **sampler, "layers": sorted(modules)}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache or cache_dir()) / "hessians" / f"{spec.name}-{key[:24]}.safetensors"
    cached = read_cache(path, load_file, "Hessians", use_cache, log)
    if cached is not None:
        return cached
    with on_device(model, device), _HessianHooks(modules) as hooks:
        run_sampler(model, items, sampler, seed, lambda i: None,
                    f"GPTQ Hessians ({spec.name})", progress)
    out = {n: (hooks.H[n] / max(1, hooks.rows[n])).cpu().contiguous() for n in modules}
    if use_cache:
        _atomic_write_bytes(path, lambda tmp: save_file(out, tmp, metadata={"format": HESSIAN_FORMAT}))
        if log:
            log(f"Hessians cached in {path}")
    return out
