"""ViDiT-Q static channel balancing: smoothing vectors and the Hadamard rotation.

A layer y = X W^T is rewritten exactly, before any quantization, as

    y = (X diag(1/s) H) (W diag(s) H)^T          (H orthonormal: H H^T = I)

so the activation outliers are moved into the weights (smoothing, s_j = max|X_j|^a /
max|W_j|^(1-a)) and then spread over all channels (rotation). W diag(s) H is computed
offline; X diag(1/s) is a Mul in the graph (or folds into the producer), X H is the online
rotation whose cost the exporter measures.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch

from .plan import PlanError

SMOOTH_MIN = 1e-5


def smoothing_vector(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j; 1 where a channel is
    dead (zero activation or zero weight column), never below SMOOTH_MIN."""
    w_absmax = w.detach().float().transpose(0, 1).reshape(w.shape[1], -1).abs().amax(dim=1)
    x_absmax = x_absmax.float()
    s = x_absmax.pow(alpha) / w_absmax.pow(1 - alpha)
    dead = (x_absmax <= 0) | (w_absmax <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s).clamp_min(SMOOTH_MIN)


def _in_shape(w: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (w.ndim - 2)


def smooth_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W diag(s): input column j times s_j (Linear (out, in) or Conv (out, in, kh, kw))."""
    return w * s.to(w.dtype).reshape(_in_shape(w))


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of two): H H^T = I."""
    if not is_power_of_two(n):
        raise PlanError(f"techniques.rotation: a Hadamard rotation needs a power-of-two "
                        f"feature dimension, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def rotate_weight(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W H for a Linear weight (out, in)."""
    return w @ h.to(w.dtype)


# --- which layers, with which alpha --------------------------------------------------------


def smoothing_alphas(techniques: dict[str, Any], layers: Iterable[str]) -> dict[str, float]:
    """Layer -> alpha for the layers that `techniques.smoothing.layers` selects (regexes,
    searched). `alpha` is one number or an object {regex: alpha} (the last matching regex
    wins; layers that match none get 0.5)."""
    cfg = techniques.get("smoothing") or {}
    if not isinstance(cfg, dict):
        raise PlanError("techniques.smoothing: expected an object {alpha, layers}")
    patterns = cfg.get("layers", [])
    if not isinstance(patterns, list):
        raise PlanError("techniques.smoothing.layers: expected a list of regular expressions")
    alpha = cfg.get("alpha", 0.5)
    if isinstance(alpha, dict):
        rules = []
        for k, v in alpha.items():
            try:
                rules.append((re.compile(k), _alpha(v, f"techniques.smoothing.alpha.{k}")))
            except re.error as e:
                raise PlanError(f"techniques.smoothing.alpha: invalid regular expression {k!r} ({e})") from None
    else:
        rules = [(re.compile(""), _alpha(alpha, "techniques.smoothing.alpha"))]
    out = {}
    rxs = [re.compile(p) for p in patterns]
    for name in layers:
        if any(rx.search(name) for rx in rxs):
            a = 0.5
            for rx, value in rules:
                if rx.search(name):
                    a = value
            out[name] = a
    return out


def _alpha(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise PlanError(f"{where}: expected a number in [0, 1], got {v!r}")
    return float(v)


def shifted_layers(techniques: dict[str, Any], layers: Iterable[str]) -> list[str]:
    """The layers (of `layers`) that `techniques.act_shift.layers` selects (regexes, searched).

    Activation shifting (Outlier Suppression+'s channel shift, here one shift per tensor and
    timestep group): the layer's input is quantized as x - z on a symmetric grid centred on its
    range, and the layer adds W z back. It pays on one-sided activations: a GELU output is
    >= -0.17, so a symmetric grid around 0 leaves half its codes unused (measured on
    pixart-ref's FFN output layers: the tensor absmax is 1.9-2.0x the half range)."""
    cfg = techniques.get("act_shift") or {}
    if not isinstance(cfg, dict) or set(cfg) - {"layers"}:
        raise PlanError("techniques.act_shift: expected an object {layers}")
    patterns = cfg.get("layers", [])
    if not isinstance(patterns, list):
        raise PlanError("techniques.act_shift.layers: expected a list of regular expressions")
    rxs = [re.compile(p) for p in patterns]
    return [n for n in layers if any(rx.search(n) for rx in rxs)]


def rotated_layers(techniques: dict[str, Any], layers: dict[str, Any]) -> list[str]:
    """Layers (of `layers`: name -> (kind, in_features)) that `techniques.rotation.layers`
    selects; a PlanError when one of them cannot be rotated."""
    cfg = techniques.get("rotation") or {}
    if not isinstance(cfg, dict):
        raise PlanError("techniques.rotation: expected an object {layers}")
    patterns = cfg.get("layers", [])
    if not isinstance(patterns, list):
        raise PlanError("techniques.rotation.layers: expected a list of regular expressions")
    rxs = [re.compile(p) for p in patterns]
    out = []
    for name, (kind, n_in) in layers.items():
        if not any(rx.search(name) for rx in rxs):
            continue
        if kind != "linear":
            raise PlanError(f"techniques.rotation.layers: {name} is a convolution; only Linear "
                            f"layers can be rotated")
        if not is_power_of_two(n_in):
            raise PlanError(f"techniques.rotation.layers: {name} has {n_in} input features, "
                            f"a Hadamard rotation needs a power of two")
        out.append(name)
    return out
