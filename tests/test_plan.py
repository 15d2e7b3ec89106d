"""Plans load, resolve and fail with one line naming the field."""

from __future__ import annotations

import pytest

from effgen.calib.plan import FP, FORMAT, LayerPrecision, PlanError, check_timestep_groups, resolve_plan

MODULES = [f"transformer.transformer_blocks.{i}.{m}" for i in range(2)
           for m in ("attn1.to_q", "attn1.to_k", "attn2.to_k", "ff.net.2")] + ["transformer.proj_out"]
DEFAULT_FP = [r"transformer\.proj_out"]


def plan(**kw):
    return {"format": FORMAT, "model": "pixart-ref", **kw}


def test_rules_fp_layers_and_explicit_layers_resolve_in_order():
    p = resolve_plan(plan(default={"w_bits": 8, "a_bits": 8},
                          rules=[{"match": r"\.ff\.", "w_bits": 4, "w_granularity": "block32"},
                                 {"match": r"blocks\.1\.ff", "w_bits": 8}],
                          fp_layers=[r".*attn2\.to_k"],
                          layers={"transformer.transformer_blocks.0.attn1.to_q": {"a_bits": 16}}),
                     MODULES, DEFAULT_FP)
    L = p.layers
    assert L["transformer.transformer_blocks.0.ff.net.2"] == LayerPrecision(4, 8, "block32")
    assert L["transformer.transformer_blocks.0.ff.net.2"].block_size == 32
    assert L["transformer.transformer_blocks.1.ff.net.2"].w_bits == 8  # later rule wins
    assert L["transformer.transformer_blocks.1.attn2.to_k"] == FP
    assert L["transformer.transformer_blocks.0.attn1.to_q"] == LayerPrecision(8, 16)
    assert L["transformer.proj_out"] == FP  # the family's FP default
    assert set(p.quantized()) == set(MODULES) - {"transformer.proj_out",
                                                 "transformer.transformer_blocks.0.attn2.to_k",
                                                 "transformer.transformer_blocks.1.attn2.to_k"}
    again = resolve_plan(p.to_json(), MODULES, DEFAULT_FP)
    assert again.layers == p.layers  # the resolved form round-trips


def test_an_optional_rule_may_match_nothing_and_still_applies_where_it_matches():
    """One plan for several families: a rule for PixArt's adaln_single resolves on DiT too."""
    rules = [{"match": r"adaln_single\.linear$", "w_bits": 8, "optional": True},
             {"match": r"\.ff\.net\.2$", "w_bits": 4, "w_granularity": "block32", "optional": True}]
    p = resolve_plan(plan(default={"w_bits": 8, "a_bits": 8}, rules=rules), MODULES, DEFAULT_FP)
    assert p.layers["transformer.transformer_blocks.0.ff.net.2"] == LayerPrecision(4, 8, "block32")
    assert p.layers["transformer.transformer_blocks.0.attn1.to_q"] == LayerPrecision(8, 8)
    assert resolve_plan(p.to_json(), MODULES, DEFAULT_FP).layers == p.layers


@pytest.mark.parametrize("raw, message", [
    (plan(layers={"transformer.transformer_blocks.0.attn1.to_qq": {}}),
     "layers: 'transformer.transformer_blocks.0.attn1.to_qq' is not a quantizable module of this "
     "model; closest: transformer.transformer_blocks.0.attn1.to_q"),
    (plan(default={"w_bits": 6}), "default.w_bits: 6 is not an allowed bit width (allowed: 4, 8, 16)"),
    (plan(rules=[{"match": "ff", "a_bits": 2}]), "rules[0].a_bits: 2 is not an allowed bit width"),
    (plan(rules=[{"match": "nothing_here"}]), "rules[0].match: 'nothing_here' is not a quantizable module"),
    (plan(rules=[{"match": "("}]), "rules[0].match: invalid regular expression"),
    (plan(rules=[{"match": "ff", "optional": "yes"}]), "rules[0].optional: expected true or false"),
    (plan(default={"w_granularity": "block48"}), "default.w_granularity: 'block48' is not one of"),
    (plan(timestep_groups=[[0, 600], [500, 999]]), "timestep_groups: [0, 600] and [500, 999] overlap"),
    (plan(timestep_groups=[[0, 400], [500, 999]]), "timestep_groups: timesteps 401..499 are in no group"),
    (plan(timestep_groups=[[0, 900]]), "timestep_groups: groups must cover 0..999"),
    (plan(target="jetson"), "target: 'jetson' is not one of ort-cpu, trt, trt-orin"),
    ({"format": "effgen.plan/0"}, "format: 'effgen.plan/0' is not a known plan format"),
    (plan(default={"w_bit": 4}), "default: unknown key 'w_bit'"),
])
def test_bad_plans_give_one_line_errors(raw, message):
    with pytest.raises(PlanError) as e:
        resolve_plan(raw, MODULES, DEFAULT_FP)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_timestep_groups_are_sorted_and_inclusive():
    assert check_timestep_groups([[500, 999], [0, 499]]) == [(0, 499), (500, 999)]
    assert check_timestep_groups(None) == [(0, 999)]
