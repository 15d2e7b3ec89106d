"""Mixed-precision plans (`effgen.plan/1`): what precision each layer runs at.

Written by the calibrator, editable by hand, validated on load (DESIGN §2). `layers` — module
path -> precision — is the source of truth; `default`, `rules` and `fp_layers` are input
conveniences that `resolve_plan` turns into `layers` for a concrete model. Every problem is a
`PlanError` with one line that names the field and, for module names, the closest real ones.

Pure Python: the exporter and `effgen check` read plans without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any, Iterable

FORMAT = "effgen.plan/1"
BITS = (4, 8, 16)  # 16 = keep floating point
W_GRANULARITIES = ("per_channel", "block32", "block64", "block128")
A_GRANULARITIES = ("per_tensor", "per_token")  # per_token: ViDiT-Q's dynamic simulation mode
TARGETS = ("ort-cpu", "trt", "trt-orin")


class PlanError(ValueError):
    """A plan that cannot be used; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "per_channel"
    a_granularity: str = "per_tensor"

    @property
    def is_fp(self) -> bool:
        return self.w_bits == 16 and self.a_bits == 16

    @property
    def block_size(self) -> int | None:
        return int(self.w_granularity[5:]) if self.w_granularity.startswith("block") else None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FP = LayerPrecision(16, 16, "per_channel", "per_tensor")


def _precision(obj: Any, where: str, base: LayerPrecision | None = None) -> LayerPrecision:
    if not isinstance(obj, dict):
        raise PlanError(f"{where}: expected an object with w_bits/a_bits, got {obj!r}")
    known = {f.name for f in dataclasses.fields(LayerPrecision)}
    extra = set(obj) - known - {"match", "optional"}
    if extra:
        raise PlanError(f"{where}: unknown key '{sorted(extra)[0]}' (allowed: {', '.join(sorted(known))})")
    merged = {**dataclasses.asdict(base or LayerPrecision()), **{k: obj[k] for k in known & set(obj)}}
    for key in ("w_bits", "a_bits"):
        if merged[key] not in BITS or isinstance(merged[key], bool):
            raise PlanError(f"{where}.{key}: {merged[key]!r} is not an allowed bit width "
                            f"(allowed: {', '.join(map(str, BITS))})")
    if merged["w_granularity"] not in W_GRANULARITIES:
        raise PlanError(f"{where}.w_granularity: {merged['w_granularity']!r} is not one of "
                        f"{', '.join(W_GRANULARITIES)}")
    if merged["a_granularity"] not in A_GRANULARITIES:
        raise PlanError(f"{where}.a_granularity: {merged['a_granularity']!r} is not one of "
                        f"{', '.join(A_GRANULARITIES)}")
    return LayerPrecision(**merged)


def _unknown_module(name: str, modules: list[str], where: str) -> PlanError:
    close = difflib.get_close_matches(name, modules, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return PlanError(f"{where}: '{name}' is not a quantizable module of this model{hint}")


def _regex(pattern: Any, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise PlanError(f"{where}: expected a regular expression string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PlanError(f"{where}: invalid regular expression {pattern!r} ({e})") from None


def check_timestep_groups(groups: Any, num_train_timesteps: int = 1000) -> list[tuple[int, int]]:
    """Inclusive [lo, hi] ranges, sorted, that do not overlap and cover every timestep."""
    where = "timestep_groups"
    if groups is None:
        return [(0, num_train_timesteps - 1)]
    if not isinstance(groups, list) or not groups:
        raise PlanError(f"{where}: expected a non-empty list of [first, last] timestep ranges")
    ranges = []
    for i, g in enumerate(groups):
        if (not isinstance(g, list) or len(g) != 2 or not all(isinstance(x, int) for x in g)
                or g[0] > g[1]):
            raise PlanError(f"{where}[{i}]: expected [first, last] integers with first <= last, got {g!r}")
        ranges.append((g[0], g[1]))
    ranges.sort()
    for (a_lo, a_hi), (b_lo, b_hi) in zip(ranges, ranges[1:]):
        if b_lo <= a_hi:
            raise PlanError(f"{where}: [{a_lo}, {a_hi}] and [{b_lo}, {b_hi}] overlap")
        if b_lo != a_hi + 1:
            raise PlanError(f"{where}: timesteps {a_hi + 1}..{b_lo - 1} are in no group")
    if ranges[0][0] != 0 or ranges[-1][1] != num_train_timesteps - 1:
        raise PlanError(f"{where}: groups must cover 0..{num_train_timesteps - 1}, "
                        f"they cover {ranges[0][0]}..{ranges[-1][1]}")
    return ranges


@dataclasses.dataclass
class Plan:
    model: str
    target: str
    layers: dict[str, LayerPrecision]
    timestep_groups: list[tuple[int, int]]
    techniques: dict[str, Any] = dataclasses.field(default_factory=dict)
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "model": self.model, "target": self.target,
            "layers": {k: v.to_json() for k, v in sorted(self.layers.items())},
            "timestep_groups": [list(g) for g in self.timestep_groups],
            "techniques": self.techniques, "budget": self.budget, "provenance": self.provenance,
        }

    def quantized(self) -> dict[str, LayerPrecision]:
        return {k: v for k, v in self.layers.items() if not v.is_fp}


def resolve_plan(raw: dict[str, Any], modules: Iterable[str], default_fp: Iterable[str] = (),
                 num_train_timesteps: int = 1000) -> Plan:
    """Validate a plan document against a model's quantizable modules and resolve it.

    Precedence, lowest first: `default` for every module; the model family's `default_fp`
    patterns (embedders, final layer); `rules` in order (the last matching rule wins);
    `fp_layers`; explicit `layers` entries. A rule (like every other pattern) must match
    some module, which catches typos, unless it says `"optional": true`: a rule for one
    model family in a plan written for several (PixArt's `adaln_single.linear`).
    """
    if not isinstance(raw, dict):
        raise PlanError("a plan must be a JSON object")
    if raw.get("format") != FORMAT:
        raise PlanError(f"format: {raw.get('format')!r} is not a known plan format (expected {FORMAT!r})")
    target = raw.get("target", "trt")
    if target not in TARGETS:
        raise PlanError(f"target: {target!r} is not one of {', '.join(TARGETS)}")
    modules = list(modules)
    default = _precision(raw.get("default", {}), "default")
    layers = {m: default for m in modules}
    for pattern in default_fp:
        rx = re.compile(pattern)
        layers.update({m: FP for m in modules if rx.fullmatch(m)})
    rules = raw.get("rules", [])
    if not isinstance(rules, list):
        raise PlanError("rules: expected a list of {match, w_bits, a_bits, ...} objects")
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict) or "match" not in rule:
            raise PlanError(f"{where}: each rule needs a 'match' regular expression")
        rx = _regex(rule["match"], f"{where}.match")
        optional = rule.get("optional", False)
        if not isinstance(optional, bool):
            raise PlanError(f"{where}.optional: expected true or false, got {optional!r}")
        hits = [m for m in modules if rx.search(m)]
        if not hits and not optional:
            raise _unknown_module(rule["match"], modules, f"{where}.match")
        precision = _precision(rule, where, default)
        layers.update({m: precision for m in hits})
    fp_layers = raw.get("fp_layers", [])
    if not isinstance(fp_layers, list):
        raise PlanError("fp_layers: expected a list of module names or regular expressions")
    for i, pattern in enumerate(fp_layers):
        rx = _regex(pattern, f"fp_layers[{i}]")
        hits = [m for m in modules if rx.fullmatch(m)]
        if not hits:
            raise _unknown_module(pattern, modules, f"fp_layers[{i}]")
        layers.update({m: FP for m in hits})
    explicit = raw.get("layers", {})
    if not isinstance(explicit, dict):
        raise PlanError("layers: expected an object mapping module paths to precisions")
    for name, prec in explicit.items():
        if name not in layers:
            raise _unknown_module(name, modules, "layers")
        layers[name] = _precision(prec, f"layers.{name}", default)
    for key in ("techniques", "budget", "provenance"):
        if not isinstance(raw.get(key, {}), dict):
            raise PlanError(f"{key}: expected an object")
    techniques = raw.get("techniques", {})
    for key in ("smoothing", "rotation", "act_shift"):
        for i, pattern in enumerate((techniques.get(key) or {}).get("layers", [])):
            rx = _regex(pattern, f"techniques.{key}.layers[{i}]")
            if not any(rx.search(m) for m in modules):
                raise _unknown_module(pattern, modules, f"techniques.{key}.layers[{i}]")
    from .bos import bos_aware  # (bos.py imports this module)

    bos_aware(techniques)
    return Plan(model=str(raw.get("model", "")), target=target, layers=layers,
                timestep_groups=check_timestep_groups(raw.get("timestep_groups"), num_train_timesteps),
                techniques=techniques, budget=raw.get("budget", {}),
                provenance=raw.get("provenance", {}))


def read_plan_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path} is not valid JSON ({getattr(e, 'msg', e)})") from None
