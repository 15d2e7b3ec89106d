"""Layer sensitivity for mixed precision (MixDQ, ViDiT-Q; DESIGN §6).

For every layer the allocator may quantize and every candidate precision, the layer alone is
quantized (everything else stays FP) with the scales `calibrate` gives it, and its effect is
measured against the FP model from the same noise. Two metrics of the final samples and one
of single denoiser calls:

- "ssim": SSIM of the final images, loss = 1 - mean SSIM. A latent model's final samples
  are not images (they need the VAE) and images under 11 pixels a side have no SSIM window:
  there it falls back to "final_sqnr", and `meta.content_metric` says so.
- "final_sqnr": SQNR of the final samples, the whole sampler run with the layer quantized
  (images clipped to [-1, 1] as the runtime writes them, since PSNR is measured on those:
  an error in values the clip removes is no error in the picture).
- "sqnr": SQNR of the denoiser output over a fixed batch of (x_t, t, condition) inputs
  captured from the FP sampler, one call each (cheaper: no sampler run per layer).
The two SQNRs give loss = noise power / signal power = 10^(-SQNR/10): quantization noises of
different layers add in power to first order, which is what lets the allocator sum losses.

Which layer gets which metric is the `metric` setting (`METRICS`):
- "decoupled" (MixDQ's metric decoupling): content layers (cross-attention `attn2` and the
  FFN by default: what is drawn, where, in which colour) by "ssim", the others ("quality"
  layers) by "sqnr";
- "final" (the default): every layer by "final_sqnr", so the allocator minimises the summed
  noise of the final images, which is what PSNR against FP measures. The one-call metric
  misses how an error grows along the sampler's trajectory: on pixart-ref (trt, `effgen
  plan`'s 4 prompts and 8 steps) the self-attention query of block 4 at W4 is 53.0 dB at
  the denoiser output, 12th of the 30 layers "sqnr" judges, and 34.7 dB in the final
  samples, the third worst of all 66 (earlier weights). Measured with
  samples/quality_table.py at 4.5 bits over 1024 images (README): on the shipped pixart-ref
  the "final" plan is 0.43 dB higher in PSNR against FP than the "decoupled" one and keeps
  16 more of FP's right images (SSIM 0.0021 lower); on the shipped dit-ref it is 0.84 dB
  lower and keeps 5 more (on its weights of 34,176 steps, 0.34 dB lower and 10 more). On the
  earlier, less-trained weights "final" led on both (1.5 and 0.1 dB).

One FP sampler run (N calibration prompts, a few sampler steps) is the reference: its final
samples for the first two metrics, its denoiser inputs for the third. A layer's candidates
that the target runs at the same effective precision (on TensorRT W4A8 and W4A16 are both
W4A16) are measured once.

With `per_timestep`, losses are also measured per timestep group: "sqnr" over the captured
steps of each group, the final-sample metrics with the layer quantized only during that
group's steps.

Results are cached as JSON next to the statistics cache ($EFFGEN_CACHE or ~/.cache/effgen,
folder sensitivity/), keyed by model name, weights hash, prompts, sampler, candidates,
target, techniques and group rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .gptq import HESSIAN_FORMAT
from .plan import FORMAT, FP, LayerPrecision, Plan
from .stats import (CALIB_SEED, cache_dir, calibration_items, collect_statistics, in_features,
                    model_conditions, module_kind, on_device, quantizable_modules, read_cache,
                    weights_hash)

SENSITIVITY_FORMAT = "effgen.sensitivity/1"
# (w_bits, a_bits) a layer may be planned at.
DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = ((4, 8), (4, 16), (8, 8), (8, 16))
# Weight granularity per weight width, as in samples/plans/w4a8.json and w8a8.json.
W_GRANULARITY = {4: "block32", 8: "per_channel"}
# Layers whose effect shows in what the image depicts: cross-attention and the FFN (MixDQ's
# "content" layers, judged by SSIM under the "decoupled" metric).
DEFAULT_CONTENT_RULES: tuple[str, ...] = (r"\.attn2\.", r"\.ff\.", r"\.mlp\.")  # .mlp.: ECAR's FFN
# What `effgen plan --metric` names: (quality metric, content rules by default).
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "final": ("final_sqnr", ()),  # every layer by the final samples' SQNR
    "decoupled": ("sqnr", DEFAULT_CONTENT_RULES),  # MixDQ: content by SSIM, the rest one call
}
DEFAULT_METRIC = "final"
SSIM_MIN_SIDE = 11  # metrics.ssim's window


class SensitivityError(ValueError):
    """Bad input to the sensitivity measurement; one line."""


def candidate_precision(w_bits: int, a_bits: int) -> LayerPrecision:
    if w_bits not in W_GRANULARITY or a_bits not in (4, 8, 16):
        raise SensitivityError(f"candidate W{w_bits}A{a_bits}: weights must be 4 or 8 bits and "
                               "activations 4, 8 or 16")
    return LayerPrecision(w_bits, a_bits, W_GRANULARITY[w_bits], "per_tensor")


def metric_settings(metric: str, content_rules: Sequence[str] | None = None
                    ) -> tuple[str, tuple[str, ...]]:
    """(quality metric, content rules) of a `METRICS` name; `content_rules` given replace the
    name's own (their layers are judged by the content metric, the rest by the quality one)."""
    if metric not in METRICS:
        raise SensitivityError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    quality, rules = METRICS[metric]
    return quality, tuple(rules if content_rules is None else content_rules)


def layer_families(layers: Sequence[str], content_rules: Sequence[str] = DEFAULT_CONTENT_RULES
                   ) -> dict[str, str]:
    """'content' for the layers any of `content_rules` (regexes, searched) selects, else
    'quality'."""
    rxs = []
    for i, pattern in enumerate(content_rules):
        try:
            rxs.append(re.compile(pattern))
        except re.error as e:
            raise SensitivityError(f"content rule {i} {pattern!r} is not a regular expression ({e})") from None
    return {n: "content" if any(rx.search(n) for rx in rxs) else "quality" for n in layers}


def allocatable_layers(denoiser) -> list[str]:
    """The layers the allocator chooses precisions for: every quantizable Linear, the
    embedders, adaLN modulation and final layer (which uniform plans keep FP) included, so
    that a weight budget is a budget for the model's weights. Measured, pixart-ref and dit-ref
    on trt at 4.5 bits (samples/quality_table.py, 64 images, float64 Hessians, earlier weights
    and guidance): against the block linears alone
    with the rest FP, pixart-ref 33.77 -> 33.98 dB at 1.46 -> 1.15 MB (0.70x -> 0.56x uniform
    W8A8's bytes), dit-ref 39.49 -> 38.03 dB at 2.65 -> 1.37 MB (0.85x -> 0.44x), both still
    above uniform W4A8 with those layers FP (33.07 / 34.95 dB). Left out (and FP): the
    patch-embedding Conv (TensorRT has no INT4 convolution, so a W4 candidate would be W8
    there and no budget of 4.0 bits could be met) and a Linear whose input features the W4
    block does not divide (ECAR's 48-feature token_in)."""
    block = candidate_precision(4, 8).block_size
    return [n for n, m in quantizable_modules(denoiser).items()
            if module_kind(m) == "linear" and m.in_features % block == 0]


@dataclasses.dataclass
class Sensitivity:
    """Losses per layer and candidate (index into `candidates`).

    loss[layer][c]: 1 - SSIM (content) or noise/signal power (quality), over all steps;
    metric[layer][c]: the raw metric (SSIM, or SQNR in dB);
    group_loss[layer][g][c]: the same loss per timestep group (only with per_timestep);
    effective[layer][c]: the precision the target runs candidate c at;
    params[layer]: weight values; weight_shape[layer]; act_elems[layer]: input values per
    image and denoiser call; kind[layer]: 'linear' | 'conv';
    other_weight_bytes: bytes of everything that is not an allocatable layer's weight, on
    the target (FP).
    """

    model: str
    target: str
    candidates: list[LayerPrecision]
    layers: list[str]
    family: dict[str, str]
    loss: dict[str, list[float]]
    metric: dict[str, list[float]]
    effective: dict[str, list[LayerPrecision]]
    params: dict[str, int]
    weight_shape: dict[str, list[int]]
    act_elems: dict[str, int]
    kind: dict[str, str]
    other_weight_bytes: int
    techniques: dict[str, Any]
    timestep_groups: list[tuple[int, int]]
    group_loss: dict[str, list[list[float]]] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = SENSITIVITY_FORMAT
        d["candidates"] = [p.to_json() for p in self.candidates]
        d["effective"] = {n: [p.to_json() for p in ps] for n, ps in self.effective.items()}
        d["timestep_groups"] = [list(g) for g in self.timestep_groups]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Sensitivity":
        if d.get("format") != SENSITIVITY_FORMAT:
            raise SensitivityError(f"not an {SENSITIVITY_FORMAT} document")
        d = {k: v for k, v in d.items() if k != "format"}
        d["candidates"] = [LayerPrecision(**p) for p in d["candidates"]]
        d["effective"] = {n: [LayerPrecision(**p) for p in ps] for n, ps in d["effective"].items()}
        d["timestep_groups"] = [tuple(g) for g in d["timestep_groups"]]
        return cls(**d)


# --- one layer quantized -------------------------------------------------------------------


class _GroupGate(torch.nn.Module):
    """Runs the quantized module during one timestep group and the FP module otherwise."""

    def __init__(self, fp: torch.nn.Module, quantized: torch.nn.Module, ctx, group: int):
        super().__init__()
        self.fp, self.quantized, self.ctx, self.group = fp, quantized, ctx, group

    def forward(self, *args, **kwargs):
        module = self.quantized if self.ctx.current() == self.group else self.fp
        return module(*args, **kwargs)


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@contextlib.contextmanager
def quantized_alone(denoiser: torch.nn.Module, plan: Plan, scales: dict[str, torch.Tensor],
                    layer: str, group: int | None = None):
    """`denoiser` with only `layer` quantized as `plan` (calibrated with `scales`) says, by the
    public `quantize_`; with `group`, only during that timestep group. Yields the SimContext;
    on exit every module `quantize_` swapped is put back, so the model is FP again."""
    from .simulate import _ATTR, quantize_

    single = dataclasses.replace(plan, layers={n: (p if n == layer else FP)
                                               for n, p in plan.layers.items()})
    before = dict(denoiser.named_modules())
    ctx = quantize_(denoiser, single, scales)
    swapped: dict[str, torch.nn.Module] = {}
    for name, module in before.items():
        if not name or any(name.startswith(s + ".") for s in swapped):
            continue
        try:
            now = denoiser.get_submodule(name)
        except AttributeError:
            now = None
        if now is not module:
            swapped[name] = now
    try:
        if group is not None:
            for name, new in swapped.items():
                _set_module(denoiser, name, _GroupGate(before[name], new, ctx, group))
        yield ctx
    finally:
        for name in swapped:
            _set_module(denoiser, name, before[name])
        if hasattr(denoiser, _ATTR):
            delattr(denoiser, _ATTR)


# --- the FP reference run ------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """One call of a network the sampler runs, captured for replay: the denoiser itself
    (`module` ""), or an ECAR component ("ar", "head")."""

    module: str
    args: tuple
    kwargs: dict
    output: torch.Tensor  # FP output (a denoiser's first in_channels channels)
    timestep: int  # the sampler timestep (ECAR: the stage)

    def run(self, model) -> torch.Tensor:
        net = model.get_submodule(self.module) if self.module else model
        return _model_output(model, net(*self.args, **self.kwargs))


@dataclasses.dataclass
class _Reference:
    calls: list[_Call]  # every network call of the FP sampler run, in order
    final: torch.Tensor  # FP final samples (N, C, H, W)
    noise: Any
    conditions: Any

    @property
    def timesteps(self) -> list[int]:
        """The sampler's timesteps (ECAR: stages) in the order it visited them."""
        return list(dict.fromkeys(c.timestep for c in self.calls))


def _model_output(model, out: torch.Tensor) -> torch.Tensor:
    """What is compared: a denoiser's prediction without its learned-sigma channels."""
    return out if model.spec.family == "ecar" else out[:, :model.spec.in_channels]


def _networks(model) -> list[str]:
    """The networks the sampler calls: the denoiser, or ECAR's two components."""
    return ["ar", "head"] if model.spec.family == "ecar" else [""]


def _fp_reference(model, items: Sequence, steps: int, guidance: float) -> _Reference:
    from ..runtime.pipeline import initial_noise

    spec = model.spec
    if spec.family == "ecar":
        from ..models.ecar import stage_noise

        noise, conditions = stage_noise(model.cfg, CALIB_SEED, len(items)), list(items)
    else:
        noise = initial_noise((spec.in_channels, spec.sample_size, spec.sample_size), CALIB_SEED,
                              len(items))
        conditions = model_conditions(model, items)
    calls: list[_Call] = []
    now = {"t": 0}

    def capture(name):
        def hook(module, args, kwargs, out):
            clone = lambda a: a.clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            calls.append(_Call(name, tuple(clone(a) for a in args),
                               {k: clone(v) for k, v in kwargs.items()},
                               _model_output(model, out).clone(), now["t"]))
        return hook

    handles = [(model.get_submodule(n) if n else model).register_forward_hook(capture(n), with_kwargs=True)
               for n in _networks(model)]
    try:
        final = _sample(model, noise, conditions, steps, guidance,
                        on_step=lambda i, t: now.update(t=int(t)))
    finally:
        for h in handles:
            h.remove()
    return _Reference(calls, final, noise, conditions)


def _sample(model, noise, conditions, steps, guidance, on_step=None) -> torch.Tensor:
    """The FP sampler: a diffusion model's `steps` steps, or ECAR's stage loop at its own stage
    steps (`on_step(s, s)` as stage s starts)."""
    if model.spec.family == "ecar":
        from ..models.ecar import sample as sample_ecar

        return sample_ecar(model, conditions, noise, cfg_scale=guidance,
                           on_stage=None if on_step is None else lambda s: on_step(s, s))
    from ..models.sampling import sample

    cond, uncond, cmask, umask = conditions
    return sample(model, noise, cond, uncond, model.spec.scheduler, steps, guidance,
                  cmask, umask, on_step=on_step, guidance_interval=model.spec.guidance_interval)


def _input_elements(model, ref: _Reference, layers: Sequence[str]) -> dict[str, int]:
    """Input values per image of each layer in one call of its network (tokens x features;
    ECAR: the last stage's call, which sees every token)."""
    modules = quantizable_modules(model)
    seen: dict[str, int] = {}
    batch = {"n": 1}

    def hook(name):
        def record(module, args):  # returns None: the input goes on unchanged
            seen.setdefault(name, args[0].numel() // batch["n"])
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            for name in _networks(model):
                call = [c for c in ref.calls if c.module == name][-1]
                batch["n"] = next(a for a in (*call.args, *call.kwargs.values())
                                  if isinstance(a, torch.Tensor)).shape[0]
                call.run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: int(seen.get(n, 0)) for n in layers}


def _noise_ratio(q: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(noise power, signal power) of `q` against `ref`."""
    return float(((q - ref) ** 2).sum()), float((ref ** 2).sum())


def _ratio_to_db(noise: float, signal: float) -> float:
    if noise == 0:
        return float("inf")
    return 10 * np.log10(signal / noise) if signal > 0 else float("-inf")


# --- measurement ---------------------------------------------------------------------------


def sensitivity_key(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def measure_sensitivity(denoiser, techniques: dict[str, Any] | None = None, target: str = "trt", *,
                        candidates: Sequence[tuple[int, int]] = DEFAULT_CANDIDATES,
                        metric: str = DEFAULT_METRIC, content_rules: Sequence[str] | None = None,
                        per_timestep: bool = False, n_prompts: int = 4, steps: int = 8,
                        guidance: float | None = None, n_calib: int = 32,
                        calib_items: Sequence | None = None, stats=None, device: str | None = None,
                        use_cache: bool = True, cache: str | Path | None = None,
                        progress: bool = True,
                        log: Callable[[str], None] | None = None) -> Sensitivity:
    """Loss of every allocatable layer of `denoiser` at every candidate (w_bits, a_bits),
    quantized alone for `target` with `techniques` (smoothing, act_scale, timestep_grouping,
    ... of a plan), from the cache when seen before. `metric` (a `METRICS` name) says how
    layers are judged; `content_rules` replace its content rules (`metric_settings`).
    `n_calib` prompts calibrate the scales (the statistics `effgen calib` uses and caches);
    `n_prompts` prompts with `steps` sampler steps measure. `calib_items`
    (calib.stats.calibration_items of a prompt or text states file) replace the default
    calibration prompts, and their first `n_prompts` measure.
    `device`: where the calibration sampler passes and the measurements run (the model is
    back on the CPU after); scales and GPTQ rounding are computed on the CPU."""
    from tqdm import tqdm

    from ..runtime.bundle import write_json_atomic
    from ..runtime.images import to_uint8
    from .calibrate import calibrate
    from .cost import fp_bytes, weight_bytes
    from .timesteps import group_index

    spec = denoiser.spec
    techniques = dict(techniques or {})
    if n_prompts < 1 or steps < 1:
        raise SensitivityError("sensitivity needs at least one prompt and one sampler step")
    quality_metric, content_rules = metric_settings(metric, content_rules)
    cands = [candidate_precision(w, a) for w, a in candidates]
    if not cands:
        raise SensitivityError("no candidate precisions")
    layers = allocatable_layers(denoiser)
    if not layers:
        raise SensitivityError(f"{spec.name} has no layers to allocate precisions for")
    family = layer_families(layers, content_rules)
    guidance = float(spec.guidance if guidance is None else guidance)
    items = (list(calib_items[:n_prompts]) if calib_items is not None
             else calibration_items(spec, n_prompts))
    pixel_images = (not spec.latent_space and spec.in_channels == 3
                    and spec.sample_size >= SSIM_MIN_SIDE)
    content_metric = "ssim" if pixel_images else "final_sqnr"
    doc = {"format": SENSITIVITY_FORMAT, "model": spec.name, "weights": weights_hash(denoiser),
           "items": items, "steps": steps, "guidance": guidance, "scheduler": spec.scheduler,
           "guidance_interval": spec.guidance_interval,
           "n_calib": n_calib, "candidates": [p.to_json() for p in cands], "target": target,
           "techniques": techniques, "content_rules": list(content_rules),
           "quality_metric": quality_metric,
           "per_timestep": per_timestep, "noise_seed": CALIB_SEED, "layers": layers,
           "stats": None if stats is None else stats.meta.get("key"),
           # GPTQ's codes (weight_rounding) come from Hessians of this format
           "hessians": HESSIAN_FORMAT}
    if calib_items is not None:
        doc["calibration_items"] = list(calib_items)
    key = sensitivity_key(doc)
    path = Path(cache or cache_dir()) / "sensitivity" / f"{spec.name}-{key[:24]}.json"
    cached = read_cache(path, lambda f: Sensitivity.from_json(json.loads(f.read_text())),
                        "sensitivity", use_cache, log)
    if cached is not None:
        return cached

    if stats is None:
        stats = collect_statistics(denoiser, items=calib_items, n_calib=n_calib, use_cache=use_cache,
                                   cache=cache, progress=progress, log=log, device=device)
    # One calibration per candidate: every allocatable layer at that precision, so each
    # layer gets exactly the scales (smoothing, weight scales, activation amax per group)
    # it would get in a plan that chooses this candidate for it.
    calibrated: list[tuple[Plan, dict]] = []
    for p in cands:
        raw = {"format": FORMAT, "model": spec.name, "target": target, "techniques": techniques,
               "layers": {n: p.to_json() for n in layers}}
        # n_calib and the cache also serve GPTQ's Hessians (one sampler pass for all candidates)
        calibrated.append(calibrate(denoiser, raw, target, stats=stats, items=calib_items,
                                    n_calib=n_calib, use_cache=use_cache, cache=cache,
                                    progress=False, device=device))
    groups = calibrated[0][0].timestep_groups
    modules = quantizable_modules(denoiser)
    effective = {n: [LayerPrecision(**plan.provenance["effective"][n]) for plan, _ in calibrated]
                 for n in layers}

    # The reference and every measurement run where the calibration passes ran (`device`).
    with on_device(denoiser, device):
        ref = _fp_reference(denoiser, items, steps, guidance)
        fp_images = to_uint8(ref.final.cpu().numpy()) if pixel_images else None
        final_ref = ref.final.clamp(-1, 1) if pixel_images else ref.final
        G = len(groups) if per_timestep else 0

        def call_losses(ctx) -> tuple[float, float, list[float]]:
            """The denoiser output's noise ratio over the captured calls: (total, SQNR dB,
            per group)."""
            noise = np.zeros(len(groups))
            signal = np.zeros(len(groups))
            for call in ref.calls:
                ctx.set_timestep(call.timestep)
                g = group_index(groups, call.timestep)
                n_, s_ = _noise_ratio(call.run(denoiser), call.output)
                noise[g] += n_
                signal[g] += s_
            total = noise.sum() / signal.sum()
            per_group = [float(noise[g] / signal[g]) if signal[g] else 0.0 for g in range(len(groups))]
            return float(total), _ratio_to_db(noise.sum(), signal.sum()), per_group

        def final_loss(ctx, kind: str) -> tuple[float, float]:
            """(loss, raw metric) of the final samples of a sampler run: 1 - SSIM, or the
            noise ratio and its SQNR in dB."""
            final = _sample(denoiser, ref.noise, ref.conditions, steps, guidance, on_step=ctx.on_step)
            if kind == "ssim":
                from ..metrics import ssim

                s = float(np.mean(ssim(to_uint8(final.cpu().numpy()), fp_images)))
                return max(0.0, 1.0 - s), s
            if pixel_images:  # the images as the runtime writes them: values outside
                final = final.clamp(-1, 1)  # [-1, 1] are clipped, so is their noise
            n_, s_ = _noise_ratio(final, final_ref)
            return n_ / s_, _ratio_to_db(n_, s_)

        # The metric of each layer: its family's; only "sqnr" replays single calls.
        layer_metric = {n: content_metric if family[n] == "content" else quality_metric for n in layers}
        sampled = {n for n in layers if layer_metric[n] != "sqnr"}
        loss = {n: [0.0] * len(cands) for n in layers}
        raw_metric = {n: [0.0] * len(cands) for n in layers}
        group_loss = {n: [[0.0] * len(cands) for _ in range(G)] for n in layers} if per_timestep else None
        # Candidates of a layer with one effective precision are measured once.
        work = []
        for n in layers:
            firsts: dict[LayerPrecision, int] = {}
            for c, e in enumerate(effective[n]):
                firsts.setdefault(e, c)
            work.append((n, firsts))
        units = sum(len(f) * (1 + (G if n in sampled else 0)) for n, f in work)
        with tqdm(total=units, desc=f"sensitivity ({spec.name}, {target})", unit="run",
                  file=sys.stderr, disable=not progress) as bar:
            for n, firsts in work:
                for e, c0 in firsts.items():
                    plan, scales = calibrated[c0]
                    if e.is_fp:
                        values = (0.0, 1.0 if layer_metric[n] == "ssim" else float("inf"),
                                  [0.0] * len(groups))
                        bar.update(1 + (G if n in sampled else 0))
                    elif n not in sampled:
                        with quantized_alone(denoiser, plan, scales, n) as ctx:
                            values = call_losses(ctx)
                        bar.update(1)
                    else:
                        with quantized_alone(denoiser, plan, scales, n) as ctx:
                            total, raw = final_loss(ctx, layer_metric[n])
                        bar.update(1)
                        per_group = []
                        for g in range(G):
                            with quantized_alone(denoiser, plan, scales, n, group=g) as ctx:
                                per_group.append(final_loss(ctx, layer_metric[n])[0])
                            bar.update(1)
                        values = (total, raw, per_group)
                    for c, e2 in enumerate(effective[n]):
                        if e2 != e:
                            continue
                        loss[n][c], raw_metric[n][c] = values[0], values[1]
                        if group_loss is not None:
                            for g in range(G):
                                group_loss[n][g][c] = values[2][g]
        act_elems = _input_elements(denoiser, ref, layers)

    allocatable_bytes = sum(modules[n].weight.numel() for n in layers) * fp_bytes(target)
    result = Sensitivity(
        model=spec.name, target=target, candidates=cands, layers=layers, family=family,
        loss=loss, metric=raw_metric, effective=effective,
        params={n: int(modules[n].weight.numel()) for n in layers},
        weight_shape={n: list(modules[n].weight.shape) for n in layers},
        act_elems=act_elems,
        kind={n: module_kind(modules[n]) for n in layers},
        other_weight_bytes=int(weight_bytes(denoiser, None, target) - allocatable_bytes),
        techniques=techniques, timestep_groups=[tuple(g) for g in groups], group_loss=group_loss,
        meta={"key": key, "metric": metric, "content_metric": content_metric,
              "quality_metric": quality_metric,
              "n_prompts": n_prompts, "steps": steps, "guidance": guidance,
              "sampler_timesteps": ref.timesteps, "content_rules": list(content_rules),
              "statistics": stats.meta.get("key"), "weights": doc["weights"],
              "in_features": {n: in_features(modules[n]) for n in layers}})
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result.to_json())
        if log:
            log(f"sensitivity cached in {path}")
    return result
