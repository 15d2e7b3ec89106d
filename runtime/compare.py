"""Compare two backends on the same inputs, component by component (polygraphy-style).

The inputs are the real ones: the reference backend generates an image and every component
call it makes (text encoder, each denoiser step, VAE decoder, ECAR's stage and head calls) is
recorded with its feeds and outputs; the candidate backend then runs exactly those feeds.
Errors are reported per component and variant (timestep group), so a bad engine for one
group is not averaged away by the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .backends import load_component, variant_index
from .bundle import Bundle


@dataclass
class RecordedCall:
    component: str
    timestep: float | None
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


class RecordingComponent:
    """Wraps a component: passes every call through and keeps its feeds and outputs."""

    def __init__(self, inner, log: list[RecordedCall]):
        self._inner = inner
        self._log = log

    def __getattr__(self, name: str) -> Any:  # batch, input_names, variants, ...
        return getattr(self._inner, name)

    def run(self, feeds: dict[str, np.ndarray], timestep: float | None = None) -> dict[str, np.ndarray]:
        outputs = self._inner.run(feeds, timestep)
        self._log.append(RecordedCall(self._inner.name, timestep,
                                      {k: np.array(v, copy=True) for k, v in feeds.items()},
                                      {k: np.array(v, copy=True) for k, v in outputs.items()}))
        return outputs


def record_calls(pipeline, **generate_kwargs) -> list[RecordedCall]:
    """Every component call one `pipeline.generate(**generate_kwargs)` makes, in order."""
    log: list[RecordedCall] = []
    names = set(pipeline.bundle.manifest["components"])
    for attr, value in list(vars(pipeline).items()):
        if getattr(value, "name", None) in names and hasattr(value, "run"):
            setattr(pipeline, attr, RecordingComponent(value, log))
    pipeline.generate(**generate_kwargs)
    return log


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `candidate` against `reference` (inf if equal)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((candidate.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


@dataclass
class ComponentError:
    component: str
    variant: int
    output: str
    calls: int
    max_abs_error: float
    sqnr_db: float  # over all calls of this variant together
    per_call_sqnr_db: list[float] = field(default_factory=list)


def compare_calls(calls: list[RecordedCall], candidates: dict[str, Any]) -> list[ComponentError]:
    """Re-run each recorded call on the candidate component of the same name and measure the
    error of every output, grouped by (component, variant, output)."""
    groups: dict[tuple[str, int, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for call in calls:
        comp = candidates[call.component]
        got = comp.run(call.feeds, call.timestep)
        v = variant_index(comp.variants, call.timestep)
        for name, ref in call.outputs.items():
            groups.setdefault((call.component, v, name), []).append((ref, got[name]))
    rows = []
    for (comp, v, out), pairs in groups.items():
        ref = np.concatenate([r.ravel() for r, _ in pairs])
        got = np.concatenate([g.ravel() for _, g in pairs])
        rows.append(ComponentError(comp, v, out, len(pairs),
                                   float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0,
                                   sqnr_db(ref, got), [sqnr_db(r, g) for r, g in pairs]))
    return rows


def default_conditioning(bundle: Bundle) -> dict[str, Any]:
    """A prompt for text bundles, class 0 otherwise (the inputs only need to be realistic)."""
    model = bundle.model
    if model.get("text") and "text_encoder" in bundle.manifest["components"]:
        return {"prompt": ["a large red circle at the top left on a grey background"]}
    if model.get("text"):
        raise ValueError(f"{bundle.root} has no text_encoder component: comparing it needs "
                         "prompt embeddings (use runtime.compare.compare_backends with "
                         "prompt_embeds=)")
    return {"class_label": [0]}


def compare_backends(bundle: Bundle | str, reference: str = "ort-reference", candidate: str = "trt",
                     steps: int | None = None, seed: int = 0, threads: int = 0,
                     **conditioning) -> list[ComponentError]:
    """Generate one image on `reference`, replay every component call on `candidate`."""
    from . import load_pipeline

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    pipe = load_pipeline(bundle, backend=reference, threads=threads)
    calls = record_calls(pipe, num_images=1, seed=seed, steps=steps,
                         **(conditioning or default_conditioning(bundle)))
    candidates = {name: load_component(bundle, name, candidate, threads)
                  for name in {c.component for c in calls}}
    return compare_calls(calls, candidates)


def rows_as_dicts(rows: list[ComponentError]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
