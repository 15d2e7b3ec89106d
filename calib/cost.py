"""What a plan costs in weight memory on a target (DESIGN §8: weight bytes, as a ratio
against FP on the same target)."""

from __future__ import annotations

import math

import torch

from .plan import LayerPrecision, Plan
from .stats import module_kind, quantizable_modules
from .targets import effective_precision


def fp_bytes(target: str) -> int:
    """Bytes of one floating-point value as the target runs FP: fp16 on TensorRT, fp32 on
    ONNX Runtime CPU."""
    return 2 if target.startswith("trt") else 4


def weight_bytes(denoiser: torch.nn.Module, plan: Plan | None = None, target: str | None = None) -> int:
    """Bytes of the denoiser's weights as they ship on `target` (default: the plan's; without
    a plan: everything FP). Quantized weights count w_bits/8 bytes each plus one FP scale per
    output channel or block; everything else (biases, norms, embeddings, FP layers,
    smoothing vectors) counts as FP. Pass the FP model, not a quantize_'d one."""
    target = target or (plan.target if plan is not None else "trt")
    b = fp_bytes(target)
    modules = quantizable_modules(denoiser)
    quantized: dict[str, tuple] = {}
    if plan is not None:
        smoothed = set((plan.provenance or {}).get("smoothing", {}))
        for name, prec in plan.quantized().items():
            eff = effective_precision(prec, module_kind(modules[name]), target)
            if not eff.is_fp and eff.w_bits < 16:
                quantized[name] = (eff, name in smoothed)
    total = 0
    for pname, p in denoiser.state_dict().items():
        owner, _, leaf = pname.rpartition(".")
        if owner in quantized and leaf == "weight":
            eff, smoothed = quantized[owner]
            total += layer_weight_bytes(tuple(p.shape), eff, smoothed, target)
        else:
            total += p.numel() * b
    return int(total)


def layer_weight_bytes(shape: tuple[int, ...], eff: LayerPrecision, smoothed: bool, target: str) -> int:
    """Bytes of one layer's weight of `shape` (out, in[, kh, kw]) at its effective precision
    on `target`: a byte per value (int8, the 7-bit grid included) or half a byte (int4), one
    FP scale per output channel or block, and the smoothing vector (one FP value per input
    channel) where the layer is smoothed. An FP
    weight is its values at the target's FP width. (The mixed-precision allocator prices
    each candidate precision of a layer with this.)"""
    b = fp_bytes(target)
    numel = math.prod(shape)
    if eff.w_bits >= 16:
        return numel * b
    rows = shape[0]
    k = numel // rows
    n_scales = rows * (k // eff.block_size if eff.block_size else 1)
    stored_bits = 4 if eff.w_bits <= 4 else 8  # ort-cpu's 7-bit weights are stored in int8
    return (numel * stored_bits + 7) // 8 + n_scales * b + (shape[1] * b if smoothed else 0)
