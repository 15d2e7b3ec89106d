"""Bit allocation (calib/allocate.py): the integer program is exact, greedy is not, budgets
and normalisation do what the plan's provenance says."""

import numpy as np
import pytest

from effgen.calib.allocate import (AllocationError, Budget, achieved, allocate_brute_force,
                                   allocate_greedy, allocate_ilp, budgets_for, mixed_precision_plan,
                                   normalised_loss)
from effgen.calib.plan import LayerPrecision, resolve_plan
from effgen.calib.sensitivity import Sensitivity, candidate_precision


def _random_instance(rng, layers, choices, n_budgets):
    loss = rng.random((layers, choices))
    allowed = rng.random((layers, choices)) < 0.85
    allowed[np.arange(layers), rng.integers(0, choices, layers)] = True
    budgets = []
    for k in range(n_budgets):
        cost = rng.integers(1, 10, (layers, choices)).astype(float)
        least = np.where(allowed, cost, np.inf).min(axis=1).sum()
        most = np.where(allowed, cost, -np.inf).max(axis=1).sum()
        budgets.append(Budget(f"b{k}", cost, least + rng.random() * (most - least)))
    return loss, budgets, allowed


@pytest.mark.parametrize("seed", range(12))
def test_ilp_equals_brute_force_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    loss, budgets, allowed = _random_instance(rng, 6, 2 + seed % 2, 1 + seed % 2)
    try:
        expected = allocate_brute_force(loss, budgets, allowed)
    except AllocationError:  # the two budgets together can be infeasible: so must the ILP be
        with pytest.raises(AllocationError):
            allocate_ilp(loss, budgets, allowed)
        return
    got = allocate_ilp(loss, budgets, allowed)
    assert got.status == "optimal"
    assert got.objective == pytest.approx(expected.objective, abs=1e-9)
    for b in budgets:
        assert sum(b.cost[l, c] for l, c in enumerate(got.choice)) <= b.limit + 1e-9
    assert all(allowed[l, c] for l, c in enumerate(got.choice))


def test_greedy_is_suboptimal_where_one_big_sensitive_layer_blocks_two_smaller_ones():
    # Layer 0 (2 units more at 8 bits) saves 3; layers 1 and 2 (1 unit each) save 2 each.
    # Greedy upgrades the most sensitive layer (0) and has no budget left: loss 4 + 0.
    # The ILP upgrades 1 and 2: loss 3, the optimum.
    loss = np.array([[3.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    cost = np.array([[2.0, 4.0], [1.0, 2.0], [1.0, 2.0]])
    budgets = [Budget("weight", cost, 4.0 + 2.0)]
    greedy = allocate_greedy(loss, budgets)
    ilp = allocate_ilp(loss, budgets)
    assert greedy.choice == [1, 0, 0] and greedy.objective == 4.0
    assert ilp.choice == [0, 1, 1] and ilp.objective == 3.0
    assert allocate_brute_force(loss, budgets).objective == 3.0


def test_infeasible_budget_names_the_budget():
    loss = np.zeros((2, 2))
    budgets = [Budget("weight bits 3", np.array([[4.0, 8.0], [4.0, 8.0]]), 6.0, per=2)]
    for fn in (allocate_ilp, allocate_greedy, allocate_brute_force):
        with pytest.raises(AllocationError, match="weight bits 3 is infeasible: the cheapest "
                                                  "allowed candidates need 4$"):
            fn(loss, budgets)


def _toy_sensitivity(per_timestep=False):
    """Four 'layers' with known losses: two content, two quality, candidates W4A8/W8A8."""
    layers = ["transformer.transformer_blocks.0.attn1.to_q", "transformer.transformer_blocks.0.attn2.to_q",
              "transformer.transformer_blocks.0.ff.net.2", "transformer.transformer_blocks.0.attn1.to_k"]
    family = {layers[0]: "quality", layers[1]: "content", layers[2]: "content", layers[3]: "quality"}
    cands = [candidate_precision(4, 8), candidate_precision(8, 8)]
    eff = [LayerPrecision(4, 16, "block32"), LayerPrecision(8, 8)]
    loss = {layers[0]: [1e-3, 1e-5], layers[1]: [0.02, 0.001], layers[2]: [0.05, 0.002],
            layers[3]: [3e-3, 2e-5]}
    group_loss = {n: [[v * 2 for v in loss[n]], [v / 2 for v in loss[n]]] for n in layers} if per_timestep else None
    return Sensitivity(
        model="toy", target="trt", candidates=cands, layers=layers, family=family, loss=loss,
        metric={n: [0.0, 0.0] for n in layers}, effective={n: list(eff) for n in layers},
        params={n: 128 * 128 for n in layers}, weight_shape={n: [128, 128] for n in layers},
        act_elems={n: 64 * 128 for n in layers}, kind={n: "linear" for n in layers},
        other_weight_bytes=1000, techniques={}, timestep_groups=[(0, 999)], group_loss=group_loss,
        meta={"content_metric": "ssim"})


def test_normalisation_each_family_sums_to_one_at_its_worst():
    sens = _toy_sensitivity()
    weighted, norm = normalised_loss(sens, content_weight=0.25)
    content = [i for i, n in enumerate(sens.layers) if sens.family[n] == "content"]
    quality = [i for i, n in enumerate(sens.layers) if sens.family[n] == "quality"]
    assert norm[content].max(axis=1).sum() == pytest.approx(1.0)
    assert norm[quality].max(axis=1).sum() == pytest.approx(1.0)
    assert norm[quality[0], 0] == pytest.approx(1e-3 / 4e-3)
    assert weighted[content] == pytest.approx(0.25 * norm[content])
    assert weighted[quality] == pytest.approx(0.75 * norm[quality])
    with pytest.raises(AllocationError, match="content weight"):
        normalised_loss(sens, 1.5)


def test_per_timestep_takes_the_worst_group():
    per_group = _toy_sensitivity(per_timestep=True)
    _, norm = normalised_loss(per_group)
    _, plain = normalised_loss(_toy_sensitivity())
    # Group losses are the overall ones scaled by 2 and 1/2: after per-group normalisation
    # both groups equal the overall normalised loss.
    assert norm == pytest.approx(plain)


def test_plan_meets_the_weight_bit_budget_and_resolves():
    sens = _toy_sensitivity()
    plan, result = mixed_precision_plan(sens, weight_bits=6.0)
    # Half the parameters can be W8: the two most sensitive by normalised loss.
    assert plan["provenance"]["achieved"]["weight_bits"] == pytest.approx(6.0)
    chosen = {n: plan["layers"][n]["w_bits"] for n in sens.layers}
    assert sorted(chosen.values()) == [4, 4, 8, 8]
    resolved = resolve_plan(plan, sens.layers)
    assert {n: p.w_bits for n, p in resolved.layers.items()} == chosen
    assert plan["provenance"]["solver_status"] == "optimal"
    assert set(plan["provenance"]["scores"]) == set(sens.layers)


def test_weight_mb_budget_counts_bytes_like_calib_cost():
    sens = _toy_sensitivity()
    # all W4 block32 on trt: 128*128/2 bytes + 128*4 fp16 scales per layer
    w4 = 128 * 128 // 2 + 128 * 4 * 2
    w8 = 128 * 128 + 128 * 2 + 128 * 2  # W8A8 per channel, smoothing absent: no vector
    limit = (1000 + 3 * w4 + w8) / 1e6
    plan, _ = mixed_precision_plan(sens, weight_mb=limit, act_bits=None)
    got = achieved(sens, [sens.candidates.index(LayerPrecision(**plan["layers"][n])) for n in sens.layers])
    assert got["weight_mb"] <= limit + 1e-9
    assert sorted(plan["layers"][n]["w_bits"] for n in sens.layers) == [4, 4, 4, 8]
    with pytest.raises(AllocationError, match="exactly one weight budget"):
        budgets_for(sens, weight_bits=4.5, weight_mb=1.0)


def test_activation_budget_counts_bits_as_run_and_defaults_to_uniform_w4a8():
    import dataclasses

    toy = _toy_sensitivity()
    # On TensorRT W4A8 runs as W4A16, W8A16 as weight-only INT8; W8A16 is the more accurate W8.
    cands = [candidate_precision(4, 8), candidate_precision(8, 8), candidate_precision(8, 16)]
    eff = [LayerPrecision(4, 16, "block32"), LayerPrecision(8, 8), LayerPrecision(8, 16)]
    sens = dataclasses.replace(
        toy, candidates=cands, effective={n: list(eff) for n in toy.layers},
        loss={n: [l4, l8, l8 / 2] for n, (l4, l8) in toy.loss.items()},
        metric={n: [0.0] * 3 for n in toy.layers})
    plan, _ = mixed_precision_plan(sens, weight_bits=6.0)
    assert plan["budget"]["act_bits"] == 16.0  # uniform W4A8 as run
    assert sorted((plan["layers"][n]["w_bits"], plan["layers"][n]["a_bits"]) for n in sens.layers) == [
        (4, 8), (4, 8), (8, 16), (8, 16)]
    # 8 bits as run: only W8A8 runs 8-bit activations
    plan8, _ = mixed_precision_plan(sens, weight_bits=8.0, act_bits=8)
    assert {(p["w_bits"], p["a_bits"]) for p in plan8["layers"].values()} == {(8, 8)}
    with pytest.raises(AllocationError, match="activation bits 8"):
        mixed_precision_plan(sens, weight_bits=4.0, act_bits=8)
