"""Timestep groups (DESIGN §4): adjacent sampler steps whose activation ranges agree share
one set of activation scales.

Groups are found over the sampler's steps (in sampling order) and written into the plan as
inclusive ranges of training timesteps that cover 0..num_train_timesteps-1, the boundary
between two groups halfway between their neighbouring sampler timesteps, so that
`check_timestep_groups` accepts them and any timestep (another step count) finds a group.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .plan import PlanError


def range_disagreement(ranges: np.ndarray) -> float:
    """How much the activation ranges of several timesteps disagree: per layer the relative
    spread (max - min) / max of its absmax over those timesteps, averaged over layers.
    `ranges`: (timesteps, layers)."""
    ranges = np.asarray(ranges, np.float64)
    hi, lo = ranges.max(axis=0), ranges.min(axis=0)
    rel = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1), 0.0)
    return float(rel.mean()) if rel.size else 0.0


def group_by_tolerance(ranges: np.ndarray, tolerance: float) -> list[list[int]]:
    """Greedy contiguous grouping of steps (rows of `ranges`, (T, L) per-layer absmax in
    sampling order): a step joins the current group while the group's ranges, with it, still
    disagree by at most `tolerance` (see `range_disagreement`)."""
    ranges = np.asarray(ranges, np.float64)
    if ranges.ndim != 2 or not len(ranges):
        raise ValueError("ranges must be (timesteps, layers) with at least one timestep")
    if tolerance < 0:
        raise PlanError(f"techniques.timestep_grouping.tolerance: must be >= 0, got {tolerance}")
    groups = [[0]]
    for i in range(1, len(ranges)):
        if range_disagreement(ranges[groups[-1] + [i]]) <= tolerance:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def group_fixed(n_steps: int, k: int) -> list[list[int]]:
    """`k` contiguous groups of (nearly) equal size over `n_steps` sampler steps."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PlanError(f"techniques.timestep_grouping.k: expected a positive integer, got {k!r}")
    if k > n_steps:
        raise PlanError(f"techniques.timestep_grouping.k: {k} groups for {n_steps} sampler steps")
    return [list(map(int, a)) for a in np.array_split(np.arange(n_steps), k)]


def groups_to_ranges(timesteps: Sequence[int], groups: list[list[int]],
                     num_train_timesteps: int = 1000) -> list[tuple[int, int]]:
    """Step groups (indices into `timesteps`, the sampler's timesteps) -> sorted inclusive
    [lo, hi] training-timestep ranges covering 0..num_train_timesteps-1."""
    spans = []
    for g in groups:
        ts = [int(timesteps[i]) for i in g]
        spans.append((min(ts), max(ts)))
    spans.sort()
    for (a_lo, a_hi), (b_lo, b_hi) in zip(spans, spans[1:]):
        if b_lo <= a_hi:
            raise ValueError("timestep groups must be contiguous in the sampler's order")
    ranges = []
    lo = 0
    for (a_lo, a_hi), nxt in zip(spans, spans[1:] + [None]):
        hi = num_train_timesteps - 1 if nxt is None else (a_hi + nxt[0]) // 2
        ranges.append((lo, hi))
        lo = hi + 1
    return ranges


def group_index(ranges: Sequence[tuple[int, int]], t: float) -> int:
    """The group whose range holds timestep `t` (rounded; clamped into the covered span)."""
    ti = int(round(float(t)))
    ti = min(max(ti, ranges[0][0]), ranges[-1][1])
    for g, (lo, hi) in enumerate(ranges):
        if lo <= ti <= hi:
            return g
    raise ValueError(f"timestep {t} is in no timestep group")
