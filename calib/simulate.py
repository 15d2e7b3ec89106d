"""Simulated quantization in PyTorch, torchao style: `quantize_(denoiser, plan, scales)` swaps
every quantized Linear/Conv for a module that runs the target's effective numerics
(DESIGN §3): smoothing and rotation folded into the weight, fake-quantized weights, and
activations fake-quantized with the current timestep group's static scale (or per token);
in BOS-aware layers (calib/bos.py) the first text token's activation is left unquantized.

The modules learn the current timestep from a `SimContext` shared by all of them; the FP
sampler sets it through `sample(..., on_step=ctx.on_step)`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import scales as scales_mod
from .balance import hadamard, rotate_weight, rotated_layers, smooth_weight
from .gptq import dequantize_codes
from .bos import TOKEN_AXIS, first_token_layers
from .plan import LayerPrecision, Plan
from .quantizers import fake_quant_per_tensor, fake_quant_per_token, quantize_weight
from .stats import in_features, module_kind, quantizable_modules
from .targets import effective_precision, int4_block_size
from .timesteps import group_index

_ATTR = "_effgen_sim_context"


class SimContext:
    """The current timestep group of a simulated model."""

    def __init__(self, ranges: Sequence[tuple[int, int]]):
        self.ranges = [tuple(r) for r in ranges]
        self.group: int | None = 0 if len(self.ranges) == 1 else None
        self.timestep: float | None = None

    def set_timestep(self, t: float) -> None:
        self.timestep = float(t)
        self.group = group_index(self.ranges, t)

    def set_group(self, g: int) -> None:
        if not 0 <= g < len(self.ranges):
            raise ValueError(f"timestep group {g} does not exist ({len(self.ranges)} groups)")
        self.group = g

    def on_step(self, i: int, t: int) -> None:
        """The `on_step` hook of `effgen.models.sampling.sample`."""
        self.set_timestep(t)

    def current(self) -> int:
        if self.group is None:
            raise RuntimeError("the simulated model has several timestep groups and no current "
                               "timestep: sample with on_step=sim_context(model).on_step")
        return self.group


@dataclasses.dataclass
class SimConfig:
    """How one layer is simulated (the effective precision on the target)."""

    precision: LayerPrecision
    w_scale: torch.Tensor | None = None  # from the scales file
    a_amax: torch.Tensor | None = None  # (G,)
    smooth: torch.Tensor | None = None  # (in,)
    rotate: bool = False
    keep_first_token: bool = False  # BOS-aware: token 0's activation is not quantized
    w_codes: torch.Tensor | None = None  # GPTQ's integer weights (out, K), used as they are
    a_shift: torch.Tensor | None = None  # (G,): x - shift is quantized, then shift added back


class _SimBase(torch.nn.Module):
    def _setup(self, weight: torch.Tensor, bias, cfg: SimConfig, ctx: SimContext, kind: str):
        self.precision = cfg.precision
        self.ctx = ctx
        self.kind = kind
        w = weight.detach().float()

        def here(t):  # the scales file's tensors, on the device of the layer they simulate
            return None if t is None else t.to(w.device)

        smooth, w_scale, w_codes = here(cfg.smooth), here(cfg.w_scale), here(cfg.w_codes)
        self.register_buffer("inv_smooth", None if smooth is None else 1.0 / smooth.float())
        if smooth is not None:
            w = smooth_weight(w, smooth.float())
        self.register_buffer("hadamard", here(hadamard(w.shape[1])) if cfg.rotate else None)
        if cfg.rotate:
            w = rotate_weight(w, self.hadamard)
        if w_codes is not None:
            w = dequantize_codes(w_codes, w_scale, w.shape)
        elif cfg.precision.w_bits < 16:
            w = quantize_weight(w, cfg.precision.w_bits, cfg.precision.w_granularity, w_scale)
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("a_amax", None if cfg.a_amax is None else here(cfg.a_amax).float())
        self.register_buffer("a_shift", None if cfg.a_shift is None else here(cfg.a_shift).float())
        self.keep_first_token = cfg.keep_first_token

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        ch = 1 if self.kind == "conv" else -1
        if self.inv_smooth is not None:
            shape = (1, -1, 1, 1) if self.kind == "conv" else (-1,)
            x = x * self.inv_smooth.reshape(shape)
        if self.hadamard is not None:
            x = x @ self.hadamard
        p = self.precision
        if p.a_bits >= 16:
            return x
        if p.a_granularity == "per_token":  # ort-cpu W4: MatMulNBits quantizes per K block
            block = int4_block_size(p, x.shape[ch]) if p.w_bits == 4 else None
            return fake_quant_per_token(x, p.a_bits, channel_dim=ch, block=block)
        if self.a_shift is not None:  # exported: a zero point (ort-cpu), Sub + bias (TensorRT)
            z = self.a_shift[self.ctx.current()]
            return fake_quant_per_tensor(x - z, self.a_amax[self.ctx.current()], p.a_bits) + z
        q = fake_quant_per_tensor(x, self.a_amax[self.ctx.current()], p.a_bits)
        if self.keep_first_token:
            n = x.shape[TOKEN_AXIS]
            q = torch.cat([x.narrow(TOKEN_AXIS, 0, 1), q.narrow(TOKEN_AXIS, 1, n - 1)], dim=TOKEN_AXIS)
        return q

    def extra_repr(self) -> str:
        from .quantizers import describe

        tech = [t for t, on in (("smooth", self.inv_smooth is not None),
                                ("shift", self.a_shift is not None),
                                ("hadamard", self.hadamard is not None),
                                ("fp-first-token", self.keep_first_token)) if on]
        return describe(self.precision) + (f", {'+'.join(tech)}" if tech else "")


class SimLinear(_SimBase):
    def __init__(self, linear: torch.nn.Linear, cfg: SimConfig, ctx: SimContext):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear.weight, linear.bias, cfg, ctx, "linear")

    def forward(self, x):
        return F.linear(self._quant_input(x), self.weight, self.bias)


class SimConv2d(_SimBase):
    def __init__(self, conv: torch.nn.Conv2d, cfg: SimConfig, ctx: SimContext):
        super().__init__()
        if cfg.smooth is not None and conv.groups != 1:
            raise ValueError("smoothing a grouped convolution is not supported")
        self.conv_args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                              groups=conv.groups)
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv padding_mode {conv.padding_mode!r} is not supported")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self._setup(conv.weight, conv.bias, cfg, ctx, "conv")

    def forward(self, x):
        return F.conv2d(self._quant_input(x), self.weight, self.bias, **self.conv_args)


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def layer_configs(denoiser: torch.nn.Module, plan: Plan, scales: dict[str, torch.Tensor],
                  target: str | None = None) -> dict[str, SimConfig]:
    """The SimConfig of every layer that is not FP on `target` (default: the plan's)."""
    target = target or plan.target
    modules = quantizable_modules(denoiser)
    quantized = plan.quantized()
    rotated = set(rotated_layers(plan.techniques, {n: (module_kind(modules[n]), in_features(modules[n]))
                                                   for n in quantized if n in modules}))
    G = len(plan.timestep_groups)
    effective = {n: effective_precision(p, module_kind(modules[n]), target)
                 for n, p in quantized.items() if n in modules}
    first_token = set(first_token_layers(plan.techniques, effective))
    out = {}
    for name, prec in sorted(quantized.items()):
        if name not in modules:
            raise scales_mod.ScalesError(f"plan layer {name} is not a quantizable module of this model")
        eff = effective_precision(prec, module_kind(modules[name]), target)
        if eff.is_fp:
            continue
        w_scale = scales.get(scales_mod.key(name, "w_scale"))
        a_amax = scales.get(scales_mod.key(name, "a_amax"))
        if eff.w_bits < 16 and w_scale is None:
            raise scales_mod.ScalesError(f"scales: no {name}.w_scale for a {eff.w_bits}-bit weight "
                                         f"(calibrated for another target?)")
        if eff.w_bits < 16:
            want = 1 if eff.w_granularity == "per_channel" else 2
            if w_scale.ndim != want:
                raise scales_mod.ScalesError(f"scales: {name}.w_scale has shape {tuple(w_scale.shape)}, "
                                             f"which does not fit {eff.w_granularity} on {target}")
        if eff.a_bits < 16 and eff.a_granularity == "per_tensor":
            if a_amax is None or a_amax.shape != (G,):
                raise scales_mod.ScalesError(
                    f"scales: {name}.a_amax must have one value per timestep group ({G}), got "
                    f"{None if a_amax is None else tuple(a_amax.shape)}")
        a_shift = scales.get(scales_mod.key(name, "a_shift"))
        if a_shift is not None and (eff.a_bits >= 16 or eff.a_granularity != "per_tensor"
                                    or a_shift.shape != (G,)):
            raise scales_mod.ScalesError(
                f"scales: {name}.a_shift has shape {tuple(a_shift.shape)}; a shift needs a "
                f"per-tensor quantized activation and one value per timestep group ({G})")
        codes = scales.get(scales_mod.key(name, "w_codes"))
        if codes is not None:
            shape = tuple(modules[name].weight.shape)
            if eff.w_bits >= 16 or tuple(codes.shape) != (shape[0], int(np.prod(shape[1:]))):
                raise scales_mod.ScalesError(
                    f"scales: {name}.w_codes has shape {tuple(codes.shape)}, the weight "
                    f"{shape} at {eff.w_bits} bits")
        out[name] = SimConfig(eff, w_scale, a_amax, scales.get(scales_mod.key(name, "smooth")),
                              name in rotated, name in first_token, codes, a_shift)
    return out


def quantize_(denoiser: torch.nn.Module, plan: Plan, scales: dict[str, torch.Tensor],
              target: str | None = None) -> SimContext:
    """Swap, in place, every layer that `plan` quantizes (on `target`, default the plan's)
    for its simulating module; returns the SimContext that selects the timestep group
    (also `sim_context(denoiser)`)."""
    ctx = SimContext(plan.timestep_groups)
    modules = quantizable_modules(denoiser)
    for name, cfg in layer_configs(denoiser, plan, scales, target).items():
        m = modules[name]
        new = SimConv2d(m, cfg, ctx) if isinstance(m, torch.nn.Conv2d) else SimLinear(m, cfg, ctx)
        _set_module(denoiser, name, new)
    setattr(denoiser, _ATTR, ctx)
    return ctx


def sim_context(denoiser: torch.nn.Module) -> SimContext:
    ctx = getattr(denoiser, _ATTR, None)
    if ctx is None:
        raise ValueError("this model has not been through quantize_")
    return ctx


def simulated_modules(denoiser: torch.nn.Module) -> dict[str, _SimBase]:
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, _SimBase)}
