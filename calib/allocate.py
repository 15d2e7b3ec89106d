"""Bit allocation under a memory budget (MixDQ, ViDiT-Q; DESIGN §6).

The problem: L layers, each with a few candidate precisions c; choosing c for layer l costs
loss[l, c] and uses cost_k[l, c] of each budget k. Pick exactly one candidate per layer so
that every budget holds and the summed loss is least. As an integer program over binary
variables x[l, c] (`allocate_ilp`, scipy.optimize.milp / HiGHS):

    minimise  sum loss[l, c] x[l, c]
    s.t.      sum_c x[l, c] = 1                     for every layer l
              sum_{l,c} cost_k[l, c] x[l, c] <= limit_k   for every budget k

`allocate_greedy` is the usual baseline (the most sensitive layers get the better precision
first, until the budget is used); `allocate_brute_force` enumerates, for tests.

`mixed_precision_plan` turns a measured `Sensitivity` into a plan (effgen.plan/1):

Normalisation. Under the "decoupled" metric the two families of layers are measured with
different metrics (content: 1 - SSIM of final images; quality: noise/signal power of the
denoiser output), so their losses are not comparable as they are. Each family's losses are
divided by that family's total loss when every one of its layers takes its worst candidate:
    n[l, c] = loss[l, c] / sum_{l' in family(l)} max_c' loss[l', c'],
so each family's normalised losses sum to at most 1, and the objective is
    content_weight * sum_{content} n + (1 - content_weight) * sum_{quality} n.
Under the default "final" metric every layer is a quality layer: one family, whose
normalised losses are the final samples' noise powers over one constant, so the objective
is the summed noise of the final images (content_weight has nothing to weigh).
The score reported per layer and candidate is 1 - n. With per-timestep sensitivities the
same is done per timestep group and a candidate's normalised loss is its worst group's:
the plan has one precision per layer for every group (all variants share the weights,
DESIGN §4), so a layer that hurts at some timesteps is protected at all of them.

Budgets. `weight_bits`: the average weight bits of the allocatable layers (every Linear,
embedders and adaLN included: sensitivity.allocatable_layers), weighted by their parameter
counts, at the precision the target runs. `weight_mb`: the denoiser's shipped weight bytes /
1e6 on the target, as calib.cost.weight_bytes counts them (scales, smoothing vectors and FP
layers included). `act_bits`: the average activation
bits as the target runs them, weighted by each layer's input values per denoiser call. By
default it is what the uniform plan at the lowest weight bits runs at (W4A8 everywhere): a
mixed plan never runs wider activations than the plan it refines. On TensorRT that is 16,
because a W4 layer's activations run FP16 whatever the plan says (weight-only INT4, DESIGN
§3), so the allocator may give a sensitive layer W8A16 (weight-only INT8: the same FP16
GEMM as its W4 neighbours) instead of only W8A8, which would add activation quantization
the uniform plan does not have. (samples/quality_table.py, pixart-ref at 4.5 bits, on
earlier weights: +2.2 dB over uniform W4A8 this way, +0.8 dB counting planned bits, i.e.
W4A8 or W8A8 only.) The sensitivity of a candidate is always measured at its effective precision,
and the provenance records planned and effective activation averages.

The solvers are numpy/scipy only.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import numpy as np

from .plan import FORMAT, LayerPrecision

ALLOCATORS = ("ilp", "greedy")


class AllocationError(ValueError):
    """An allocation that cannot be made (infeasible budget, bad input); one line."""


@dataclasses.dataclass
class Budget:
    name: str
    cost: np.ndarray  # (L, C)
    limit: float
    per: float = 1.0  # messages show (cost + offset) / per: bits x parameters / parameters = bits
    offset: float = 0.0  # the part of the budget no choice changes (weight MB: the FP layers)


@dataclasses.dataclass
class Allocation:
    choice: list[int]  # candidate index per layer
    objective: float
    status: str
    allocator: str


def _check(loss: np.ndarray, budgets: Sequence[Budget], allowed: np.ndarray | None):
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim != 2 or loss.size == 0:
        raise AllocationError("loss must be a non-empty (layers, candidates) array")
    allowed = np.ones(loss.shape, bool) if allowed is None else np.asarray(allowed, bool)
    if allowed.shape != loss.shape or not allowed.any(axis=1).all():
        raise AllocationError("every layer needs at least one allowed candidate")
    for b in budgets:
        if np.shape(b.cost) != loss.shape:
            raise AllocationError(f"budget {b.name}: cost has shape {np.shape(b.cost)}, expected {loss.shape}")
    return loss, allowed


def _infeasible(budgets: Sequence[Budget], allowed: np.ndarray) -> AllocationError:
    """Name the budget that cannot be met even with each layer at its cheapest candidate."""
    for b in budgets:
        least = float(np.where(allowed, b.cost, np.inf).min(axis=1).sum())
        if least > b.limit + 1e-9:
            return AllocationError(f"budget {b.name} is infeasible: the cheapest allowed candidates "
                                   f"need {(least + b.offset) / b.per:.6g}")
    return AllocationError("the budgets cannot be met together: " + ", ".join(b.name for b in budgets))


def allocate_ilp(loss: np.ndarray, budgets: Sequence[Budget], allowed: np.ndarray | None = None,
                 time_limit: float = 60.0) -> Allocation:
    """The least-loss choice of one candidate per layer within all budgets (exact, HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    loss, allowed = _check(loss, budgets, allowed)
    L, C = loss.shape
    n = L * C
    one_each = np.zeros((L, n))
    for l in range(L):
        one_each[l, l * C:(l + 1) * C] = 1
    constraints = [LinearConstraint(one_each, 1, 1)]
    for b in budgets:
        constraints.append(LinearConstraint(np.asarray(b.cost, np.float64).reshape(1, n), -np.inf, b.limit))
    upper = allowed.reshape(n).astype(np.float64)
    c = np.where(allowed, loss, 0.0).reshape(n)
    res = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, upper),
               options={"time_limit": time_limit})
    if res.x is None:
        if res.status == 2:
            raise _infeasible(budgets, allowed)
        raise AllocationError(f"the integer program found no solution: {res.message}")
    x = np.round(res.x).reshape(L, C)
    choice = [int(np.argmax(x[l])) for l in range(L)]
    status = {0: "optimal", 1: "time or iteration limit reached (best found)"}.get(res.status, res.message)
    return Allocation(choice, float(sum(loss[l, k] for l, k in enumerate(choice))), status, "ilp")


def _fits(used: np.ndarray, budgets: Sequence[Budget]) -> bool:
    return all(u <= b.limit + 1e-9 for u, b in zip(used, budgets))


def allocate_greedy(loss: np.ndarray, budgets: Sequence[Budget], allowed: np.ndarray | None = None
                    ) -> Allocation:
    """Start every layer at its cheapest candidate (by the first budget, then the others, then
    loss); then, most sensitive layer first (largest loss drop from its cheapest to its best
    candidate), move each layer to the least-loss candidate that still fits every budget."""
    loss, allowed = _check(loss, budgets, allowed)
    L, C = loss.shape
    costs = [np.asarray(b.cost, np.float64) for b in budgets]

    def order_key(l, c):
        return tuple(cost[l, c] for cost in costs) + (loss[l, c],)

    choice = [min((c for c in range(C) if allowed[l, c]), key=lambda c: order_key(l, c)) for l in range(L)]
    used = np.array([sum(cost[l, choice[l]] for l in range(L)) for cost in costs])
    if not _fits(used, budgets):
        raise _infeasible(budgets, allowed)
    best = [min(loss[l, c] for c in range(C) if allowed[l, c]) for l in range(L)]
    for l in sorted(range(L), key=lambda l: -(loss[l, choice[l]] - best[l])):
        for c in sorted((c for c in range(C) if allowed[l, c]), key=lambda c: loss[l, c]):
            if loss[l, c] >= loss[l, choice[l]]:
                break
            delta = np.array([cost[l, c] - cost[l, choice[l]] for cost in costs])
            if _fits(used + delta, budgets):
                used += delta
                choice[l] = c
                break
    return Allocation(choice, float(sum(loss[l, k] for l, k in enumerate(choice))), "heuristic", "greedy")


def allocate_brute_force(loss: np.ndarray, budgets: Sequence[Budget],
                         allowed: np.ndarray | None = None) -> Allocation:
    """Every combination (C^L of them): the reference for small instances."""
    loss, allowed = _check(loss, budgets, allowed)
    L, C = loss.shape
    best, best_choice = math.inf, None
    for choice in itertools.product(*[[c for c in range(C) if allowed[l, c]] for l in range(L)]):
        if not all(sum(b.cost[l, c] for l, c in enumerate(choice)) <= b.limit + 1e-9 for b in budgets):
            continue
        value = sum(loss[l, c] for l, c in enumerate(choice))
        if value < best:
            best, best_choice = value, list(choice)
    if best_choice is None:
        raise _infeasible(budgets, allowed)
    return Allocation(best_choice, float(best), "optimal", "brute-force")


def allocate(loss, budgets, allowed=None, allocator: str = "ilp") -> Allocation:
    if allocator == "ilp":
        return allocate_ilp(loss, budgets, allowed)
    if allocator == "greedy":
        return allocate_greedy(loss, budgets, allowed)
    raise AllocationError(f"allocator {allocator!r} is not one of {', '.join(ALLOCATORS)}")


# --- from sensitivity to plan --------------------------------------------------------------


def normalised_loss(sens, content_weight: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(weighted normalised loss (L, C) for the objective, unweighted normalised loss (L, C)),
    rows in `sens.layers` order; see the module docstring."""
    if not 0 <= content_weight <= 1:
        raise AllocationError(f"content weight must be in [0, 1], got {content_weight}")
    layers = sens.layers
    fam = np.array([sens.family[n] == "content" for n in layers])

    def normalise(raw: np.ndarray) -> np.ndarray:
        out = np.zeros_like(raw)
        for mask in (fam, ~fam):
            if mask.any():
                scale = raw[mask].max(axis=1).sum()
                out[mask] = raw[mask] / scale if scale > 0 else 0.0
        return out

    if sens.group_loss:
        G = len(next(iter(sens.group_loss.values())))
        per_group = [normalise(np.array([sens.group_loss[n][g] for n in layers], np.float64))
                     for g in range(G)]
        norm = np.max(per_group, axis=0)
    else:
        norm = normalise(np.array([sens.loss[n] for n in layers], np.float64))
    weights = np.where(fam, content_weight, 1 - content_weight)[:, None]
    return norm * weights, norm


def _weight_bytes_table(sens) -> np.ndarray:
    from .balance import smoothing_alphas
    from .cost import layer_weight_bytes

    smoothed = set(smoothing_alphas(sens.techniques, sens.layers))
    return np.array([[layer_weight_bytes(tuple(sens.weight_shape[n]), e,
                                         n in smoothed and e.a_bits < 16, sens.target)
                      for e in sens.effective[n]] for n in sens.layers], np.float64)


def budgets_for(sens, weight_bits: float | None = None, weight_mb: float | None = None,
                act_bits: float | None = None) -> list[Budget]:
    """The budget constraints of the module docstring for `sens`'s layers and candidates."""
    if (weight_bits is None) == (weight_mb is None):
        raise AllocationError("give exactly one weight budget: weight bits or weight MB")
    layers = sens.layers
    params = np.array([sens.params[n] for n in layers], np.float64)[:, None]
    out = []
    if weight_bits is not None:
        wbits = np.array([[e.w_bits for e in sens.effective[n]] for n in layers], np.float64)
        out.append(Budget(f"weight bits {weight_bits:g}", params * wbits, weight_bits * params.sum(),
                          params.sum()))
    else:
        # Bytes of the allocatable layers; the rest of the model is a constant.
        out.append(Budget(f"weight MB {weight_mb:g}", _weight_bytes_table(sens),
                          weight_mb * 1e6 - sens.other_weight_bytes, 1e6, sens.other_weight_bytes))
    if act_bits is not None:
        elems = np.array([sens.act_elems[n] for n in layers], np.float64)[:, None]
        abits = np.array([[e.a_bits for e in sens.effective[n]] for n in layers], np.float64)
        out.append(Budget(f"activation bits {act_bits:g}", elems * abits, act_bits * elems.sum(),
                          elems.sum()))
    return out


def uniform_act_bits(sens) -> float:
    """The activation bits, as run, of the uniform plan at the lowest weight bits and lowest
    activation bits among the candidates (W4A8 with the default ones): the default budget."""
    base = min(range(len(sens.candidates)),
               key=lambda c: (sens.candidates[c].w_bits, sens.candidates[c].a_bits))
    elems = np.array([sens.act_elems[n] for n in sens.layers], np.float64)
    bits = np.array([sens.effective[n][base].a_bits for n in sens.layers], np.float64)
    return float((elems * bits).sum() / elems.sum())


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def achieved(sens, choice: Sequence[int]) -> dict[str, Any]:
    """Average weight bits, planned and effective activation bits, weight MB of a choice."""
    layers = sens.layers
    params = np.array([sens.params[n] for n in layers], np.float64)
    elems = np.array([sens.act_elems[n] for n in layers], np.float64)
    eff = [sens.effective[n][c] for n, c in zip(layers, choice)]
    planned = [sens.candidates[c] for c in choice]
    wbytes = _weight_bytes_table(sens)
    return {
        "weight_bits": round(float((params * [e.w_bits for e in eff]).sum() / params.sum()), 4),
        "act_bits_planned": round(float((elems * [p.a_bits for p in planned]).sum() / elems.sum()), 4),
        "act_bits_effective": round(float((elems * [e.a_bits for e in eff]).sum() / elems.sum()), 4),
        "weight_mb": round((sens.other_weight_bytes + sum(wbytes[l, c] for l, c in enumerate(choice))) / 1e6, 4),
    }


def mixed_precision_plan(sens, *, weight_bits: float | None = None, weight_mb: float | None = None,
                         act_bits: float | None = None, content_weight: float = 0.5,
                         allocator: str = "ilp", all_modules: Sequence[str] | None = None,
                         command: str | None = None) -> tuple[dict[str, Any], Allocation]:
    """A plan document (effgen.plan/1) whose `layers` map gives every allocatable layer the
    candidate the allocator chose (and every other module in `all_modules`, those no candidate
    fits, FP), with the sensitivity's techniques, the budget and the provenance (achieved
    averages, scores, solver status, allocator, command). `act_bits` None:
    `uniform_act_bits(sens)`."""
    if act_bits is None:
        act_bits = uniform_act_bits(sens)
    weighted, norm = normalised_loss(sens, content_weight)
    budgets = budgets_for(sens, weight_bits, weight_mb, act_bits)
    result = allocate(weighted, budgets, None, allocator)
    layers = {n: sens.candidates[c].to_json() for n, c in zip(sens.layers, result.choice)}
    for n in all_modules or ():
        layers.setdefault(n, {"w_bits": 16, "a_bits": 16, "w_granularity": "per_channel",
                              "a_granularity": "per_tensor"})
    labels = [_label(p) for p in sens.candidates]
    budget = {k: v for k, v in (("weight_bits", weight_bits), ("weight_mb", weight_mb),
                                ("act_bits", act_bits)) if v is not None}
    metric = sens.meta.get("metric", "decoupled")  # sensitivities made before `metric` existed
    provenance = {
        "source": f"effgen plan: per-layer sensitivity ({metric} "
                  "metric) + " + ("integer program (scipy milp / HiGHS)" if allocator == "ilp"
                                  else "greedy allocation"),
        **({"command": command} if command else {}),
        "allocator": allocator, "solver_status": result.status,
        "objective": round(result.objective, 8),
        "achieved": achieved(sens, result.choice),
        "content_weight": content_weight,
        "normalisation": "loss / (sum over the layer's family of each layer's worst-candidate "
                         "loss); content: " + _LOSS[sens.meta.get("content_metric", "ssim")]
                         + ", quality: " + _LOSS[sens.meta.get("quality_metric", "sqnr")]
                         + "; score = 1 - normalised loss"
                         + ("; per timestep group, worst group" if sens.group_loss else ""),
        "sensitivity": {"key": sens.meta.get("key"), "weights": sens.meta.get("weights"),
                        "metric": metric,
                        "content_metric": sens.meta.get("content_metric"),
                        "quality_metric": sens.meta.get("quality_metric", "sqnr"),
                        "n_prompts": sens.meta.get("n_prompts"),
                        "steps": sens.meta.get("steps"), "content_rules": sens.meta.get("content_rules"),
                        "per_timestep": bool(sens.group_loss)},
        "candidates": labels,
        "scores": {n: {"family": sens.family[n], "chosen": labels[c],
                       "score": [round(1 - float(x), 6) for x in norm[l]],
                       "metric": [_finite(round(float(m), 6)) for m in sens.metric[n]]}
                   for l, (n, c) in enumerate(zip(sens.layers, result.choice))},
    }
    plan = {"format": FORMAT, "model": sens.model, "target": sens.target, "layers": layers,
            "techniques": sens.techniques, "budget": budget, "provenance": provenance}
    return plan, result


_LOSS = {"ssim": "1 - SSIM of the final images",
         "final_sqnr": "noise/signal power of the final samples",
         "sqnr": "noise/signal power of the denoiser output (one call)"}


def _label(p: LayerPrecision) -> str:
    from .quantizers import describe

    return describe(p)


# Techniques of samples/plans/w4a8.json (smoothing alpha 0.8 on the block Linears whose
# activations the target quantizes, min-max activation scales, MSE-searched weight scales,
# GPTQ weight rounding, 2 timestep groups) plus w8a8.json's activation shift on the FFN output
# layers and MixDQ's BOS-aware text embedding. A constant here because the installed package
# does not ship samples/.
DEFAULT_TECHNIQUES: dict[str, Any] = {
    "smoothing": {"alpha": 0.8,
                  "layers": [r"(\.attn\d\.to_[qkv]|\.attn\.qkv)$", r"(\.attn\d\.to_out\.0|\.attn\.proj)$",
                             r"(\.ff\.net\.(0\.proj|2)|\.mlp\.fc[12])$"]},  # PixArt/DiT | ECAR
    "act_shift": {"layers": [r"(\.ff\.net\.2|\.mlp\.fc2)$"]},  # GELU outputs, as w8a8.json
    "act_scale": {"method": "minmax"},
    "weight_scale": {"method": "mse"},
    "weight_rounding": {"method": "gptq", "damp": 0.01},
    "timestep_grouping": {"k": 2},
    "bos_aware": True,
}


def plan_model(denoiser, *, weight_bits: float | None = None, weight_mb: float | None = None,
               act_bits: float | None = None, content_weight: float = 0.5, allocator: str = "ilp",
               techniques: dict[str, Any] | None = None, target: str = "trt",
               per_timestep: bool = False, command: str | None = None, progress: bool = True,
               log=None, **sensitivity_options) -> tuple[dict[str, Any], Any, Allocation]:
    """Measure (or load cached) sensitivities of `denoiser` and allocate: returns
    (plan document, Sensitivity, Allocation). `sensitivity_options` go to
    `sensitivity.measure_sensitivity` (metric, content_rules, n_prompts, steps, n_calib, ...)."""
    from .sensitivity import DEFAULT_CANDIDATES, measure_sensitivity
    from .stats import quantizable_modules

    if allocator not in ALLOCATORS:
        raise AllocationError(f"allocator {allocator!r} is not one of {', '.join(ALLOCATORS)}")
    if (weight_bits is None) == (weight_mb is None):
        raise AllocationError("give exactly one weight budget: weight bits or weight MB")
    candidates = sensitivity_options.get("candidates", DEFAULT_CANDIDATES)
    least = min(w for w, _ in candidates)
    if weight_bits is not None and weight_bits < least:  # known before measuring anything
        raise AllocationError(f"budget weight bits {weight_bits:g} is infeasible: the cheapest "
                              f"allowed candidates need {least:g}")
    techniques = dict(DEFAULT_TECHNIQUES if techniques is None else techniques)
    sens = measure_sensitivity(denoiser, techniques, target, per_timestep=per_timestep,
                               progress=progress, log=log, **sensitivity_options)
    plan, result = mixed_precision_plan(sens, weight_bits=weight_bits, weight_mb=weight_mb,
                                        act_bits=act_bits, content_weight=content_weight,
                                        allocator=allocator,
                                        all_modules=list(quantizable_modules(denoiser)),
                                        command=command)
    return plan, sens, result
