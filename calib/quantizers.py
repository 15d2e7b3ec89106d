"""Symmetric fake quantizers and activation-scale searches (DESIGN §3, §6).

Everything is "fake" quantization: values are rounded onto the integer grid of the target
precision and multiplied back, so PyTorch runs the numerics the exported graph will run.
All quantizers are symmetric with zero point 0, as TensorRT's explicit quantization requires.

- Weights: int8 per output channel (scale = row absmax / 127), int4 per output channel or
  blockwise along K (scale = block absmax / 7, one scale per (row, block)); or, with an MSE
  search, the clipped absmax per row/block that minimises the activation-weighted error.
- Activations: a static per-tensor scale (amax / 127, one per timestep group), found by
  min-max, a percentile of |x| or an MSE search; or ViDiT-Q's per-token dynamic scale
  (each token's own absmax / 127), a simulation mode only.
"""

from __future__ import annotations

import torch

from .plan import LayerPrecision, PlanError

ACT_METHODS = ("minmax", "percentile", "mse")
EPS = 1e-8


def qmax(bits: int) -> int:
    """Largest positive integer of a signed `bits`-bit grid (127 for int8, 7 for int4)."""
    return 2 ** (bits - 1) - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Round `x / scale` to the signed grid [-2^(b-1), 2^(b-1) - 1] and scale back.
    `scale` broadcasts against `x`."""
    q = qmax(bits)
    return torch.clamp(torch.round(x / scale), -q - 1, q) * scale


# --- weights -----------------------------------------------------------------------------


def _as_rows(w: torch.Tensor) -> torch.Tensor:
    """(out, K) view of a Linear (out, in) or Conv (out, in, kh, kw) weight; K = in*kh*kw
    (for a conv the input channel is the slowest index of K, so blocks along K stay
    inside one input channel only when kh*kw divides the block)."""
    return w.reshape(w.shape[0], -1)


WEIGHT_METHODS = ("minmax", "mse")
CLIP_RATIOS = torch.linspace(1.0, 0.5, 26)  # candidate fractions of the row/block absmax


def weight_scale(w: torch.Tensor, bits: int, granularity: str = "per_channel",
                 method: str = "minmax", importance: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric weight scales: (out,) per output channel, (out, K // block) blockwise.

    `minmax`: absmax / qmax. `mse`: for every row (or block) the clipping of its absmax, among
    CLIP_RATIOS, that minimises the squared weight error weighted per input channel by
    `importance` (e.g. the input activation's squared absmax: an error on a weight that
    meets large activations moves the output more). Clipping a few outliers buys a finer
    grid for the rest; at 4 bits that is most of the error.
    """
    if method not in WEIGHT_METHODS:
        raise PlanError(f"techniques.weight_scale.method: {method!r} is not one of {', '.join(WEIGHT_METHODS)}")
    rows = _as_rows(w.detach().float())
    if granularity == "per_channel":
        groups = rows[:, None, :]
    elif granularity.startswith("block"):
        block = int(granularity[5:])
        k = rows.shape[1]
        if k % block:
            raise PlanError(f"w_granularity: {granularity} needs the input features ({k}) to be a "
                            f"multiple of {block}")
        groups = rows.reshape(rows.shape[0], k // block, block)
    else:
        raise PlanError(f"w_granularity: {granularity!r} is not per_channel or blockNN")
    amax = groups.abs().amax(dim=2).clamp_min(EPS)
    if method == "minmax":
        return (amax / qmax(bits)).squeeze(1) if granularity == "per_channel" else amax / qmax(bits)
    weight = torch.ones(rows.shape[1]) if importance is None else importance.detach().float()
    if weight.numel() != rows.shape[1]:  # a conv: importance per input channel, K = in*kh*kw
        weight = weight.repeat_interleave(rows.shape[1] // weight.numel())
    weight = weight.reshape(1, *groups.shape[1:]) if granularity != "per_channel" else weight.view(1, 1, -1)
    best_err = torch.full(amax.shape, float("inf"))
    best = amax / qmax(bits)
    for ratio in CLIP_RATIOS:
        scale = amax * ratio / qmax(bits)
        err = ((fake_quant(groups, scale[..., None], bits) - groups) ** 2 * weight).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best.squeeze(1) if granularity == "per_channel" else best


def quantize_weight(w: torch.Tensor, bits: int, granularity: str = "per_channel",
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantized weight of the same shape, with `scale` (from `weight_scale` unless
    given: the scales file's values are used as they are)."""
    scale = weight_scale(w, bits, granularity) if scale is None else scale
    rows = _as_rows(w.detach().float())
    if scale.ndim == 1:
        out = fake_quant(rows, scale[:, None], bits)
    else:
        nb = scale.shape[1]
        out = fake_quant(rows.reshape(rows.shape[0], nb, -1), scale[:, :, None], bits)
    return out.reshape(w.shape).to(w.dtype)


# --- activations -------------------------------------------------------------------------


def fake_quant_per_token(x: torch.Tensor, bits: int, channel_dim: int = -1,
                         block: int | None = None) -> torch.Tensor:
    """ViDiT-Q's dynamic activation quantization: every token (every position along the
    dimensions other than `channel_dim`) gets its own scale, its absmax / qmax; with `block`,
    every run of `block` channels of a token its own (what ONNX Runtime's MatMulNBits does
    with accuracy_level 4)."""
    if block is None or block >= x.shape[channel_dim]:
        amax = x.detach().abs().amax(dim=channel_dim, keepdim=True).clamp_min(EPS)
        return fake_quant(x, amax / qmax(bits), bits)
    moved = x.movedim(channel_dim, -1)
    blocks = moved.reshape(*moved.shape[:-1], -1, block)
    amax = blocks.detach().abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    return fake_quant(blocks, amax / qmax(bits), bits).reshape(moved.shape).movedim(-1, channel_dim)


def fake_quant_per_tensor(x: torch.Tensor, amax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Static per-tensor activation quantization with a calibrated `amax`."""
    amax = torch.as_tensor(amax, dtype=x.dtype).clamp_min(EPS)
    return fake_quant(x, amax / qmax(bits), bits)


def quant_mse(values: torch.Tensor, amax: float | torch.Tensor, bits: int) -> torch.Tensor:
    """Mean squared error of static per-tensor quantization of `values` with `amax`."""
    return (fake_quant_per_tensor(values, amax, bits) - values).pow(2).mean()


def amax_minmax(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0


def amax_percentile(values: torch.Tensor, percentile: float = 99.99) -> float:
    """The `percentile`-th percentile of |x|: clips the rarest outliers."""
    if not values.numel():
        return 0.0
    a = values.detach().abs().flatten().double()
    k = max(1, min(a.numel(), int(round(percentile / 100.0 * a.numel()))))
    return float(torch.kthvalue(a, k).values)


def amax_mse(values: torch.Tensor, bits: int, upper: float | None = None,
             grid: int = 100, lowest: float = 0.05) -> float:
    """The clipping range in [lowest*upper, upper] (upper: the min-max amax unless given) that
    minimises the quantization MSE of `values`; `upper` itself is a candidate, so the result
    is never worse than min-max on these values."""
    v = values.detach().flatten().float()
    upper = amax_minmax(v) if upper is None else float(upper)
    if upper <= 0 or not v.numel():
        return upper
    cands = (torch.linspace(lowest, 1.0, grid, dtype=torch.float64) * upper).float()
    errs = []
    chunk = max(1, (1 << 22) // v.numel())  # candidates per batched evaluation (~16 MB)
    for c in cands.split(chunk):
        step = (c / qmax(bits))[:, None]
        q = torch.clamp(torch.round(v[None] / step), -qmax(bits) - 1, qmax(bits)) * step
        errs.append((q - v[None]).pow(2).mean(dim=1))
    return float(cands[int(torch.argmin(torch.cat(errs)))])


def search_amax(values: torch.Tensor, bits: int, method: str = "minmax",
                percentile: float = 99.99, upper: float | None = None) -> float:
    """One activation amax by `method` ("minmax", "percentile", "mse"). `upper`: the exact
    absmax when it is known better than from the subsample `values` (min-max returns it)."""
    if method == "minmax":
        return float(upper) if upper is not None else amax_minmax(values)
    if method == "percentile":
        p = amax_percentile(values, percentile)
        return min(p, float(upper)) if upper is not None else p
    if method == "mse":
        return amax_mse(values, bits, upper=upper)
    raise PlanError(f"techniques.act_scale.method: {method!r} is not one of {', '.join(ACT_METHODS)}")


def describe(prec: LayerPrecision) -> str:
    """Short name of a precision: W8A8, W4A16 (block32), FP."""
    if prec.is_fp:
        return "FP"
    name = f"W{prec.w_bits}A{prec.a_bits}"
    extras = []
    if prec.w_bits < 16 and prec.w_granularity != "per_channel":
        extras.append(prec.w_granularity)
    if prec.a_bits < 16 and prec.a_granularity != "per_tensor":
        extras.append(prec.a_granularity)
    return name + (f" ({', '.join(extras)})" if extras else "")
