"""The calibration flow (DESIGN §6): plan + model -> resolved plan + scales.

    plan, scales = calibrate(denoiser, read_plan_file("samples/plans/w8a8.json"), "trt")
    quantize_(denoiser, plan, scales)          # simulate what ships on the target

Steps: resolve the plan against the model's quantizable modules (with the family's default
FP layers); collect (or load cached) activation statistics from the FP sampler; choose the
timestep groups; per quantized layer: the target's effective precision, the smoothing vector,
the rotation, the weight scales of the transformed weight and one activation amax per
timestep group.

Plan `techniques` read here (besides plan.py's smoothing/rotation layer regexes):
  smoothing: {alpha: 0.5 | {regex: alpha}, layers: [regex, ...]} (applied only where the
             target quantizes the activation: not on weight-only W4A16 layers)
  rotation: {layers: [regex, ...]}
  act_scale: {method: "minmax" | "percentile" | "mse", percentile: 99.99}
  weight_scale: {method: "minmax" | "mse"} (mse: per row/block, the clipping of the absmax
             that minimises the weight error weighted by the input channel's squared absmax)
  weight_rounding: {method: "nearest" | "gptq", damp: 0.01} (gptq: calib/gptq.py, the
             integer weights of every quantized Linear rounded with error feedback along
             the Hessian of its inputs over the FP sampler; written as `L.w_codes`)
  timestep_grouping: {k: K} (equal contiguous groups) | {tolerance: 0.1} (ranges agree)
  bos_aware: true | false (default false): MixDQ's BOS-aware text embedding (calib/bos.py):
             in the layers that read the text-token sequence (PixArt's caption_projection
             and cross-attention attn2.to_k/to_v) with static per-tensor activations, token 0
             keeps full-precision activations and the amax (and smoothing vector) comes from
             tokens 1.. only
An explicit `timestep_groups` in the plan wins over `timestep_grouping`.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..models.ecar import DEFAULT_FP as ECAR_DEFAULT_FP
from .balance import (hadamard, rotated_layers, shifted_layers, smooth_weight, smoothing_alphas,
                      smoothing_vector)
from .bos import first_token_layers
from .gptq import DEFAULT_DAMP, collect_hessians, gptq_codes, transform_hessian
from .plan import Plan, PlanError, resolve_plan
from .quantizers import ACT_METHODS, WEIGHT_METHODS, qmax, search_amax, weight_scale
from .scales import key
from .stats import (Statistics, collect_statistics, encode_conditions, in_features, module_kind,
                    quantizable_modules)
from .targets import effective_precision
from .timesteps import group_by_tolerance, group_fixed, groups_to_ranges

# Layers that stay floating point unless a plan's rules or layers say otherwise: patch
# embedders, timestep/caption embedders, the adaLN modulation linears (per-sample
# conditioning, not per-token work) and the final layer. Measured (quality tables, 64
# images, earlier weights): the adaLN linears at W8A8 cost vidit-w8a8 0.4 dB on pixart-ref
# and 3.2 dB on dit-ref (one per block, a quarter of its weights); at W4 0.2-0.6 dB on
# pixart-ref.
DEFAULT_FP = {
    "pixart": [r"transformer\.pos_embed\..*", r"transformer\.adaln_single\..*",
               r"transformer\.caption_projection\..*", r"transformer\.proj_out"],
    "dit": [r"transformer\.pos_embed\..*", r"transformer\.transformer_blocks\.\d+\.norm1\..*",
            r"transformer\.proj_out_1", r"transformer\.proj_out_2"],
    "ecar": list(ECAR_DEFAULT_FP),
}


def _num_train_timesteps(model) -> int:
    """The range of the timestep that picks an activation-scale group: a diffusion model's
    training timesteps; an ECAR model's stages (its timestep groups are stage groups)."""
    if model.spec.family == "ecar":
        return model.cfg.num_timesteps
    return int(model.spec.scheduler.get("num_train_timesteps", 1000))


def _act_scale_config(techniques: dict[str, Any]) -> tuple[str, float]:
    cfg = techniques.get("act_scale") or {}
    if not isinstance(cfg, dict):
        raise PlanError("techniques.act_scale: expected an object {method, percentile}")
    extra = set(cfg) - {"method", "percentile"}
    if extra:
        raise PlanError(f"techniques.act_scale: unknown key '{sorted(extra)[0]}' (allowed: method, percentile)")
    method = cfg.get("method", "minmax")
    if method not in ACT_METHODS:
        raise PlanError(f"techniques.act_scale.method: {method!r} is not one of {', '.join(ACT_METHODS)}")
    pct = cfg.get("percentile", 99.99)
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 50 < pct <= 100:
        raise PlanError(f"techniques.act_scale.percentile: expected a number in (50, 100], got {pct!r}")
    return method, float(pct)


def _weight_scale_config(techniques: dict[str, Any]) -> str:
    cfg = techniques.get("weight_scale") or {}
    if not isinstance(cfg, dict) or set(cfg) - {"method"}:
        raise PlanError("techniques.weight_scale: expected an object {method}")
    method = cfg.get("method", "minmax")
    if method not in WEIGHT_METHODS:
        raise PlanError(f"techniques.weight_scale.method: {method!r} is not one of {', '.join(WEIGHT_METHODS)}")
    return method


def _rounding_config(techniques: dict[str, Any]) -> tuple[str, float]:
    cfg = techniques.get("weight_rounding") or {}
    if not isinstance(cfg, dict) or set(cfg) - {"method", "damp"}:
        raise PlanError("techniques.weight_rounding: expected an object {method, damp}")
    method = cfg.get("method", "nearest")
    if method not in ("nearest", "gptq"):
        raise PlanError(f"techniques.weight_rounding.method: {method!r} is not nearest or gptq")
    damp = cfg.get("damp", DEFAULT_DAMP)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise PlanError(f"techniques.weight_rounding.damp: expected a number in (0, 1), got {damp!r}")
    return method, float(damp)


def _grouping_config(techniques: dict[str, Any]) -> dict[str, Any]:
    cfg = techniques.get("timestep_grouping") or {}
    if not isinstance(cfg, dict) or len(set(cfg) & {"k", "tolerance"}) > 1 or set(cfg) - {"k", "tolerance"}:
        raise PlanError("techniques.timestep_grouping: expected {\"k\": K} or {\"tolerance\": X}")
    if "tolerance" in cfg:
        tol = cfg["tolerance"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise PlanError(f"techniques.timestep_grouping.tolerance: expected a number >= 0, got {tol!r}")
    return cfg


def resolve_for_model(denoiser, raw: dict[str, Any], target: str | None = None) -> Plan:
    """Resolve a plan document for this model (family default-FP layers, its timestep
    count) and check everything calibration needs from the plan, as PlanErrors."""
    if not isinstance(raw, dict):
        raise PlanError("a plan must be a JSON object")
    raw = copy.deepcopy(raw)
    if target is not None:
        raw["target"] = target
    modules = quantizable_modules(denoiser)
    plan = resolve_plan(raw, list(modules), DEFAULT_FP.get(denoiser.spec.family, []),
                        _num_train_timesteps(denoiser))
    source_model = plan.model
    plan.model = denoiser.spec.name
    if source_model and source_model != plan.model:
        plan.provenance = {**plan.provenance, "plan_written_for": source_model}
    _act_scale_config(plan.techniques)
    _weight_scale_config(plan.techniques)
    _rounding_config(plan.techniques)
    _grouping_config(plan.techniques)
    quantized = plan.quantized()
    smoothing_alphas(plan.techniques, quantized)
    rotated_layers(plan.techniques, {n: (module_kind(modules[n]), in_features(modules[n]))
                                     for n in quantized})
    for name, prec in quantized.items():
        m = modules[name]
        block = prec.block_size
        if block and module_kind(m) == "linear" and m.in_features % block:
            raise PlanError(f"layers.{name}.w_granularity: {prec.w_granularity} needs the input "
                            f"features ({m.in_features}) to be a multiple of {block}")
    return plan


def choose_timestep_groups(plan: Plan, stats: Statistics, layers: Sequence[str], explicit: bool,
                           num_train_timesteps: int) -> list[tuple[int, int]]:
    if explicit:
        return plan.timestep_groups
    cfg = _grouping_config(plan.techniques)
    n = len(stats.timesteps)
    if "k" in cfg:
        groups = group_fixed(n, cfg["k"])
    elif "tolerance" in cfg:
        groups = group_by_tolerance(stats.layer_ranges(layers), float(cfg["tolerance"]))
    else:
        return [(0, num_train_timesteps - 1)]
    return groups_to_ranges(stats.timesteps, groups, num_train_timesteps)


def _steps_of_group(timesteps: Sequence[int], lo: int, hi: int) -> list[int]:
    idx = [i for i, t in enumerate(timesteps) if lo <= t <= hi]
    if not idx:  # the sampler never visits this range: use the nearest visited step
        mid = (lo + hi) / 2
        idx = [int(np.argmin([abs(t - mid) for t in timesteps]))]
    return idx


def activation_amax(stats: Statistics, name: str, ranges: Sequence[tuple[int, int]], bits: int,
                    method: str, percentile: float, smooth: torch.Tensor | None,
                    rot: torch.Tensor | None, skip_first_token: bool = False) -> torch.Tensor:
    """(G,) amax of the activation as it is quantized (divided by `smooth`, rotated by `rot`)
    per timestep group. Min-max is exact (from per-channel absmax) without rotation; after a
    rotation, which mixes channels, it is the max over the sampled and the largest-norm rows.
    The percentile and MSE searches run on the uniform row sample. `skip_first_token`: of
    tokens 1.. only (BOS-aware layers, whose token 0 is not quantized)."""
    absmax, rows, top = stats.of_layer(name, skip_first_token)
    out = []
    for lo, hi in ranges:
        idx = _steps_of_group(stats.timesteps, lo, hi)
        x = rows[idx].reshape(-1, rows.shape[-1])
        a = absmax[idx].amax(dim=0)
        if smooth is not None:
            x, a = x / smooth, a / smooth
        upper = float(a.max())
        if rot is not None:
            extreme = top[idx].reshape(-1, top.shape[-1])
            extreme = (extreme if smooth is None else extreme / smooth) @ rot
            x = x @ rot
            upper = max(float(x.abs().max()), float(extreme.abs().max()))
        out.append(search_amax(x, bits, method, percentile, upper))
    return torch.tensor(out, dtype=torch.float32)


def activation_shift(stats: Statistics, name: str, ranges: Sequence[tuple[int, int]], bits: int,
                     smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """((G,) amax, (G,) shift) per timestep group of a shifted layer (techniques.act_shift):
    x - shift is quantized on the symmetric grid of amax, which covers the (smoothed) input's
    range [lo, hi] exactly, from the signed per-channel extremes. The shift is a whole number
    k of grid steps (|k| < qmax), so ONNX Runtime's uint8 zero point 128 - k carries it
    exactly; TensorRT, whose zero points are 0, subtracts it and adds W shift to the bias."""
    if name not in stats.maximum:
        raise ValueError(f"no signed extremes for {name}: the statistics predate activation "
                         "shifting (collect them again)")
    q = qmax(bits)
    amax, shift = [], []
    for lo_t, hi_t in ranges:
        idx = _steps_of_group(stats.timesteps, lo_t, hi_t)
        hi, lo = stats.maximum[name][idx].amax(dim=0), stats.minimum[name][idx].amin(dim=0)
        if smooth is not None:
            hi, lo = hi / smooth, lo / smooth
        hi, lo = max(float(hi.max()), 0.0), min(float(lo.min()), 0.0)
        half = (hi - lo) / 2
        if half <= 0:
            amax.append(0.0)
            shift.append(0.0)
            continue
        k = int(np.clip(round((hi + lo) / 2 / (half / q)), -q + 1, q - 1))
        # the step a with hi <= (k + q) a and lo >= (k - q) a, as small as that allows
        step = max(hi / (k + q), lo / (k - q))
        amax.append(step * q)
        shift.append(step * k)
    return torch.tensor(amax, dtype=torch.float32), torch.tensor(shift, dtype=torch.float32)


def calibrate(denoiser, plan_raw: dict[str, Any], target: str | None = None, *,
              stats: Statistics | None = None, items: Sequence | None = None, n_calib: int = 32,
              steps: int | None = None, guidance: float | None = None,
              use_cache: bool = True, cache=None, progress: bool = True,
              log: Callable[[str], None] | None = None,
              device: str | None = None) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Resolve `plan_raw` for `denoiser`, calibrate it for `target` (default: the plan's) and
    return the resolved plan (timestep groups, provenance.effective, ...) and its scales.
    The FP sampler passes (statistics, GPTQ Hessians) run on the torch `device`, the rest on
    the CPU.
    `denoiser` may be an ECAR model from `load_ecar` too: its stages are the timesteps, so its
    timestep groups are stage groups (both components, `ar.*` and `head.*`, in one plan)."""
    plan = resolve_for_model(denoiser, plan_raw, target)
    explicit_groups = plan_raw.get("timestep_groups") is not None
    modules = quantizable_modules(denoiser)
    quantized = plan.quantized()
    effective = {n: effective_precision(p, module_kind(modules[n]), plan.target)
                 for n, p in quantized.items()}
    if stats is None:
        stats = collect_statistics(denoiser, items=items, n_calib=n_calib, steps=steps,
                                   guidance=guidance, use_cache=use_cache, cache=cache,
                                   progress=progress, log=log, device=device)
    missing = [n for n, e in effective.items() if not e.is_fp and n not in stats.absmax]
    if missing:
        raise ValueError(f"no statistics for {missing[0]} (the FP sampler did not run it at "
                         "every step; an ECAR layer must run at every stage)")
    act_layers = [n for n, e in effective.items() if e.a_bits < 16]
    n_train = _num_train_timesteps(denoiser)
    plan.timestep_groups = choose_timestep_groups(plan, stats, act_layers or list(stats.absmax),
                                                  explicit_groups, n_train)
    method, pct = _act_scale_config(plan.techniques)
    w_method = _weight_scale_config(plan.techniques)
    # Smoothing moves activation outliers into the weights: it pays only where the target
    # quantizes the activation. On a weight-only layer (W4A16 on TensorRT) it would only make
    # the weight harder to quantize (and cost a Mul), so it is not applied there.
    alphas = smoothing_alphas(plan.techniques, [n for n, e in effective.items() if e.a_bits < 16])
    rotated = rotated_layers(plan.techniques, {n: (module_kind(modules[n]), in_features(modules[n]))
                                               for n, e in effective.items() if not e.is_fp})
    first_token = set(first_token_layers(plan.techniques, effective))
    # (a per-token activation, ort-cpu's W4A8, is quantized over its own range already)
    shifted = set(shifted_layers(plan.techniques, [n for n, e in effective.items()
                                                   if e.a_bits < 16 and e.a_granularity == "per_tensor"]))
    clash = sorted(shifted & (set(rotated) | first_token))
    if clash:
        raise PlanError(f"techniques.act_shift: {clash[0]} is also rotated or BOS-aware; a "
                        "shifted layer can be neither")
    if shifted and method != "minmax":
        raise PlanError(f"techniques.act_shift: shifted layers take min-max scales (their "
                        f"grid covers the signed range), not act_scale.method {method!r}")
    rounding, damp = _rounding_config(plan.techniques)
    hessians: dict[str, torch.Tensor] = {}
    if rounding == "gptq":  # GPTQ rounds Linear weights; a Conv keeps nearest rounding
        gptq_layers = [n for n, e in effective.items()
                       if e.w_bits < 16 and isinstance(modules[n], torch.nn.Linear)]
        if gptq_layers:
            hessians = collect_hessians(denoiser, gptq_layers, items=items, n_calib=n_calib,
                                        steps=steps, guidance=guidance, use_cache=use_cache,
                                        cache=cache, progress=progress, log=log, device=device)
    scales: dict[str, torch.Tensor] = {}
    for name, eff in sorted(effective.items()):
        if eff.is_fp:
            continue
        w = modules[name].weight.detach().float()
        s = None
        # A BOS-aware layer quantizes tokens 1.. only: they set its smoothing and its amax.
        absmax = stats.of_layer(name, name in first_token)[0]
        if name in alphas:
            s = smoothing_vector(absmax.amax(dim=0), w, alphas[name])
            scales[key(name, "smooth")] = s
            w = smooth_weight(w, s)
        rot = hadamard(w.shape[1]) if name in rotated else None
        if rot is not None:
            w = w @ rot
        if eff.w_bits < 16:
            # The MSE search weighs each input channel's weight error by what the layer sees
            # there: the squared absmax of its (smoothed) input; a rotation spreads the
            # channels evenly, so a rotated layer weighs them alike.
            importance = None
            if w_method == "mse" and rot is None:
                importance = (absmax.amax(dim=0) / (s if s is not None else 1.0)) ** 2
            scales[key(name, "w_scale")] = weight_scale(w, eff.w_bits, eff.w_granularity,
                                                        w_method, importance)
            if name in hessians:
                H = transform_hessian(hessians[name], s, rot)
                scales[key(name, "w_codes")] = gptq_codes(w, H, eff.w_bits,
                                                          scales[key(name, "w_scale")], damp)
        if name in shifted:
            scales[key(name, "a_amax")], scales[key(name, "a_shift")] = activation_shift(
                stats, name, plan.timestep_groups, eff.a_bits, s)
        elif eff.a_bits < 16:
            scales[key(name, "a_amax")] = activation_amax(stats, name, plan.timestep_groups,
                                                          eff.a_bits, method, pct, s, rot,
                                                          skip_first_token=name in first_token)
    plan.provenance = {
        **{k: v for k, v in plan.provenance.items()
           if k not in ("effective", "smoothing", "rotation", "bos_aware", "act_shift",
                        "calibration")},
        "effective": {n: e.to_json() for n, e in sorted(effective.items())},
        "smoothing": {n: a for n, a in sorted(alphas.items())},
        "rotation": sorted(rotated),
        "bos_aware": sorted(first_token),
        "act_shift": sorted(shifted),
        "calibration": {"statistics": stats.meta.get("key", ""), "n_items": stats.meta.get("n_items"),
                        "steps": stats.meta.get("steps"), "guidance": stats.meta.get("guidance"),
                        "guidance_interval": stats.meta.get("guidance_interval"),
                        "scheduler": stats.meta.get("scheduler"), "noise_seed": stats.meta.get("noise_seed"),
                        "sampler_timesteps": list(stats.timesteps), "act_scale": method,
                        "weight_scale": w_method, "weight_rounding": rounding,
                        **({"percentile": pct} if method == "percentile" else {})},
    }
    return plan, scales


# --- sampling ----------------------------------------------------------------------------


def sample_items(spec, n: int) -> tuple[list, list]:
    """The evaluation convention of `effgen eval`: `refdata.eval_prompts(n)`; captions for
    text models, class ids for class-conditional ones. Returns (items, attributes)."""
    from ..models import refdata

    attrs = refdata.eval_prompts(n)
    if spec.family == "dit":
        return [a.class_id % spec.num_classes for a in attrs], attrs
    return [a.caption for a in attrs], attrs


@torch.no_grad()
def generate_images(denoiser, items: Sequence, seed: int = 0, steps: int | None = None,
                    guidance: float | None = None, batch: int = 16, progress: bool = True,
                    desc: str = "sampling") -> np.ndarray:
    """uint8 images (N, H, W, 3) from the PyTorch sampler, image i from
    `runtime.pipeline.initial_noise` seed + i, as the runtime seeds them. A simulated model
    (quantize_) gets its timestep from the sampler's on_step."""
    from tqdm import tqdm

    from ..models.sampling import sample
    from ..runtime.images import to_uint8
    from ..runtime.pipeline import initial_noise
    from .simulate import _ATTR

    spec = denoiser.spec
    if spec.latent_space:
        raise ValueError(f"{spec.name} denoises latents: images need its VAE "
                         "(export a bundle from a checkpoint with a vae/ and use effgen generate)")
    steps = int(steps or spec.steps)
    guidance = float(spec.guidance if guidance is None else guidance)
    n = len(items)
    noise = initial_noise((spec.in_channels, spec.sample_size, spec.sample_size), seed, n)
    cond, uncond, cmask, umask = encode_conditions(spec, items)
    ctx = getattr(denoiser, _ATTR, None)
    out = []
    with tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, n, batch):
            sl = slice(start, start + batch)
            x = sample(denoiser, noise[sl], cond[sl], uncond[sl], spec.scheduler, steps, guidance,
                       None if cmask is None else cmask[sl], None if umask is None else umask[sl],
                       on_step=None if ctx is None else ctx.on_step,
                       guidance_interval=spec.guidance_interval)
            out.append(x.numpy())
            bar.update(len(out[-1]))
    return to_uint8(np.concatenate(out))
