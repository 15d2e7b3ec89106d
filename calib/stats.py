"""Activation statistics of the FP model along its own sampling trajectories (DESIGN §6).

The FP sampler (models/sampling.py) runs over calibration prompts or labels; a forward
pre-hook on every quantizable Linear/Conv records, per sampler step:
  - the absmax of every input channel (exact, over all images, tokens and both CFG halves),
    and its signed maximum and minimum (activation shifting centres a one-sided range);
  - a uniform random subsample of whole input rows (tokens; pixels for a Conv), at most
    `budget` values per layer and step, for the percentile and MSE searches. Whole rows, not
    single values, so the searches can run on the activation exactly as it will be quantized:
    divided by a smoothing vector and rotated;
  - the TOP_ROWS rows of largest L2 norm per step: a rotation mixes channels, so the
    per-channel absmax no longer gives the max of the rotated activation, and the uniform
    sample misses its extremes (on dit-ref by ~30%); the extreme rows of the rotated tensor
    are among the rows of largest norm.
For the layers that read the text-token sequence (calib/bos.py) the same three statistics
are recorded a second time over tokens 1.. only: MixDQ's BOS-aware quantization keeps token 0
out of their activation scale (with it, the [CLS] outlier would still set the scale).
Statistics are the expensive part and are cached by model (name + weights hash), data and
sampler (scheduler config, steps, guidance) under $EFFGEN_CACHE or ~/.cache/effgen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..models import refdata
from ..models.configs import ModelSpec
from .bos import TOKEN_AXIS, text_token_layers

STATS_FORMAT = "effgen.stats/3"
TOP_ROWS = 8  # largest-norm rows kept per layer and step
DEFAULT_BUDGET = 2048  # sampled activation values per layer per step
CALIB_SEED = 999  # calibration prompts and noise; evaluation uses other seeds
QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv2d)


def quantizable_modules(denoiser: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d, by module path (`transformer.<diffusers path>`)."""
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, QUANTIZABLE)}


def module_kind(m: torch.nn.Module) -> str:
    return "conv" if isinstance(m, torch.nn.Conv2d) else "linear"


def in_features(m: torch.nn.Module) -> int:
    return m.in_features if isinstance(m, torch.nn.Linear) else m.in_channels


def cache_dir() -> Path:
    return Path(os.environ.get("EFFGEN_CACHE") or Path.home() / ".cache" / "effgen")


def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- calibration data --------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class TextStates:
    """One calibration condition given as precomputed text-encoder states: a row of a text
    states file (runtime.text; `effgen encode-prompts` writes them from a PixArt checkpoint's
    own T5). `key` (the file's sha256 and the row) stands for it in cache keys."""

    states: np.ndarray  # (L, D)
    mask: np.ndarray  # (L,)
    negative_states: np.ndarray  # (L, D): the unconditional branch
    negative_mask: np.ndarray  # (L,)
    key: str

    def __str__(self) -> str:
        return f"text-states:{self.key}"


STATES_SUFFIXES = (".safetensors", ".npy")


def text_states_items(spec: ModelSpec, path: str | Path, n: int | None = None) -> list[TextStates]:
    """The first `n` rows (all with n None or 0) of a text states file, checked against the
    model's text length and width."""
    from ..runtime.text import read_text_states, text_state_rows

    path = Path(path)
    if spec.text is None:
        raise ValueError(f"{path}: {spec.name} is class-conditional; text states condition "
                         "text models (give class labels, one per line, in a .txt file)")
    arrays = read_text_states(path)  # its errors name the file
    try:
        cond, cmask, unc, umask = text_state_rows(arrays, spec.text.max_length, spec.text.dim)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    k = min(n, len(cond)) if n else len(cond)
    return [TextStates(cond[i].copy(), cmask[i].copy(), unc[i].copy(), umask[i].copy(),
                       f"{digest}:{i}") for i in range(k)]


def prompt_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a prompt file, stripped; a one-line error for a missing or empty
    file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    return lines


def calibration_items(spec: ModelSpec, n: int, prompt_file: str | Path | None = None,
                      seed: int = CALIB_SEED) -> list:
    """Captions (text-conditioned models) or class labels (class-conditional ones), or
    TextStates from a text states file (.safetensors / .npy).

    Default: `refdata.eval_prompts(n, seed=999)`, a held-out set drawn with another seed than
    evaluation (its captions, or its class ids for the reference models; other
    class-conditional models get `n` distinct classes drawn with the seed). A prompt file has
    one caption (or, for a class-conditional model, one integer label) per line; the first
    `n` lines (rows of a states file) are used."""
    class_conditional = spec.family in ("dit", "ecar")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"calibration prompt file {path} does not exist")
        if path.suffix in STATES_SUFFIXES:
            return text_states_items(spec, path, n)
        lines = prompt_lines(path)
        lines = lines[:n] if n else lines
        if class_conditional:
            try:
                labels = [int(x) for x in lines]
            except ValueError:
                raise ValueError(f"{path}: {spec.name} is class-conditional, the prompt file "
                                 "must hold one integer class label per line") from None
            bad = [x for x in labels if not 0 <= x < spec.num_classes]
            if bad:
                raise ValueError(f"{path}: class label {bad[0]} is not in 0..{spec.num_classes - 1}")
            return labels
        return lines
    if class_conditional and spec.num_classes != refdata.NUM_CLASSES:
        # Not a reference model (DiT-XL's 1000 ImageNet classes): as many distinct classes as
        # there are items, drawn with the seed, rather than the reference data's 20.
        order = np.random.default_rng(seed).permutation(spec.num_classes)
        return [int(order[i % spec.num_classes]) for i in range(n)]
    attrs = refdata.eval_prompts(n, seed=seed)
    if class_conditional:
        return [a.class_id for a in attrs]
    return [a.caption for a in attrs]


def model_calibration_items(model, n: int, prompt_file: str | Path | None = None) -> list:
    """`calibration_items` for a loaded model, refusing captions where they would become
    random states: a checkpoint's trained weights, conditioned by a text encoder effgen does
    not run (T5), are calibrated on that encoder's real states or not at all."""
    spec = model.spec
    items = calibration_items(spec, n, prompt_file)
    if (getattr(model, "checkpoint", None) is not None and spec.text is not None
            and spec.text.encoder != "minilm" and not all(isinstance(x, TextStates) for x in items)):
        raise ValueError(f"{spec.name} from {model.checkpoint} is conditioned by {spec.text.encoder} "
                         "states, which effgen does not compute: write them for your calibration "
                         f"prompts with `effgen encode-prompts {spec.name} --checkpoint "
                         f"{model.checkpoint} --prompts PROMPTS.txt --out STATES.safetensors` and "
                         "pass --prompts STATES.safetensors")
    return items


def _seeded_states(text: str, length: int, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return torch.randn(length, dim, generator=torch.Generator().manual_seed(seed))


def encode_conditions(spec: ModelSpec, items: Sequence) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor | None, torch.Tensor | None]:
    """(cond, uncond, cond_mask, uncond_mask) for `sample()`, with the runtime's conventions:
    class label `num_classes` is "no class"; the unconditional text is the empty prompt.

    TextStates items give their states as they are. Captions for text models whose encoder
    effgen does not ship (T5: the tiny and real PixArt architectures) get seeded Gaussian
    states per caption and zero states behind one valid token for the unconditional branch
    (the runtime's convention without a negative prompt); that is only meaningful for
    random-weight test models (model_calibration_items refuses it for a checkpoint)."""
    n = len(items)
    if spec.family == "dit":
        cond = torch.tensor([int(x) for x in items], dtype=torch.long)
        return cond, torch.full((n,), spec.num_classes, dtype=torch.long), None, None
    states = [x for x in items if isinstance(x, TextStates)]
    if states:
        if len(states) != n:
            raise ValueError("calibration items mix captions and text states")

        def stack(field):
            return torch.from_numpy(np.stack([getattr(x, field) for x in states])).float()

        return stack("states"), stack("negative_states"), stack("mask"), stack("negative_mask")
    if spec.text.encoder == "minilm":
        from ..models.text_encoder import encode

        states, mask = encode(list(items) + [""], max_length=spec.text.max_length)
        return (states[:n], states[n:].expand(n, -1, -1).clone(), mask[:n],
                mask[n:].expand(n, -1).clone())
    L, D = spec.text.max_length, spec.text.dim
    cond = torch.stack([_seeded_states(str(x), L, D) for x in items])
    umask = torch.zeros(n, L)
    umask[:, 0] = 1
    return cond, torch.zeros(n, L, D), torch.ones(n, L), umask


def model_conditions(model, items: Sequence) -> tuple:
    """`encode_conditions` of `items`, on the device of `model`'s weights."""
    device = next(model.parameters()).device
    return tuple(None if x is None else x.to(device) for x in encode_conditions(model.spec, items))


@contextlib.contextmanager
def on_device(model, device: str | None):
    """`model` on the torch `device` for a sampler pass (statistics, GPTQ Hessians) and back
    on the CPU after it, where the rest of calibration runs. The caches do not key on the
    device: a GPU pass gives the CPU's statistics up to float rounding (a test checks it where
    there is a GPU)."""
    from ..models.denoiser import torch_device

    if device is None or str(device) == "cpu":
        yield
        return
    if model.spec.family == "ecar":
        raise ValueError(f"{model.spec.name}: ECAR models calibrate on the CPU")
    model.to(torch_device(device))
    try:
        yield
    finally:
        model.to("cpu")


# --- statistics --------------------------------------------------------------------------


@dataclasses.dataclass
class Statistics:
    """Per layer: `absmax` (T, C_in) per step and input channel; `rows` (T, R, C_in), a
    uniform sample of input rows per step; `top` (T, TOP_ROWS, C_in), the rows of largest
    L2 norm per step. `timesteps`: the sampler's timesteps in order. The `*_after_first`
    dicts hold the same over tokens 1.. only, for the layers that read text tokens.
    `maximum` / `minimum` (T, C_in): the signed extremes per step and input channel."""

    timesteps: list[int]
    absmax: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    top: dict[str, torch.Tensor]
    meta: dict = dataclasses.field(default_factory=dict)
    absmax_after_first: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    rows_after_first: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    top_after_first: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    maximum: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    minimum: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def of_layer(self, name: str, skip_first_token: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(absmax, rows, top) of a layer, over all its input rows or over tokens 1.. only."""
        if not skip_first_token:
            return self.absmax[name], self.rows[name], self.top[name]
        if name not in self.absmax_after_first:
            raise ValueError(f"no statistics without the first token for {name}: it does not "
                             "read the text-token sequence, or the statistics predate BOS-aware "
                             "support (collect them again)")
        return self.absmax_after_first[name], self.rows_after_first[name], self.top_after_first[name]

    def layer_ranges(self, layers: Sequence[str] | None = None) -> np.ndarray:
        """(T, L) tensor absmax per step and layer."""
        layers = list(self.absmax) if layers is None else list(layers)
        return np.stack([self.absmax[n].amax(dim=1).numpy() for n in layers], axis=1)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from .scales import _atomic_write_bytes

        tensors = {}
        for n in self.absmax:
            tensors[f"{n}::absmax"] = self.absmax[n].contiguous()
            tensors[f"{n}::rows"] = self.rows[n].contiguous()
            tensors[f"{n}::top"] = self.top[n].contiguous()
            tensors[f"{n}::maximum"] = self.maximum[n].contiguous()
            tensors[f"{n}::minimum"] = self.minimum[n].contiguous()
        for n in self.absmax_after_first:
            tensors[f"{n}::absmax_after_first"] = self.absmax_after_first[n].contiguous()
            tensors[f"{n}::rows_after_first"] = self.rows_after_first[n].contiguous()
            tensors[f"{n}::top_after_first"] = self.top_after_first[n].contiguous()
        meta = {"format": STATS_FORMAT, "timesteps": json.dumps(self.timesteps),
                "meta": json.dumps(self.meta, sort_keys=True)}
        _atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Path) -> "Statistics":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{path}: not an {STATS_FORMAT} file")
        tensors = load_file(str(path))
        parts: dict[str, dict] = {w + s: {} for w in ("absmax", "rows", "top") for s in ("", "_after_first")}
        parts.update(maximum={}, minimum={})
        for k, v in tensors.items():
            name, _, what = k.rpartition("::")
            parts[what][name] = v
        return cls(json.loads(meta["timesteps"]), parts["absmax"], parts["rows"], parts["top"],
                   json.loads(meta["meta"]), parts["absmax_after_first"], parts["rows_after_first"],
                   parts["top_after_first"], parts["maximum"], parts["minimum"])


class _RowStats:
    """Per-step absmax, signed maximum and minimum, bottom-k row sample and largest-norm rows
    of a set of layers."""

    def __init__(self, modules: dict[str, torch.nn.Module], steps: int, budget: int, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.absmax = {n: [None] * steps for n in modules}
        self.maximum = {n: [None] * steps for n in modules}
        self.minimum = {n: [None] * steps for n in modules}
        self.rows = {n: [None] * steps for n in modules}
        self.top = {n: [None] * steps for n in modules}
        self.keys = {n: [None] * steps for n in modules}
        self.cap = {n: max(1, budget // in_features(m)) for n, m in modules.items()}

    def add(self, name: str, i: int, flat: torch.Tensor) -> None:
        """Merge the rows `flat` (N, C_in) seen by layer `name` at step `i`. `flat` may live on
        a GPU: what is kept is reduced there and moved to the CPU (the random keys are drawn
        on the CPU, so the sample is the same on any device)."""
        cpu = torch.device("cpu")
        amax = flat.abs().amax(dim=0).to(cpu)
        prev = self.absmax[name][i]
        self.absmax[name][i] = amax if prev is None else torch.maximum(prev, amax)
        hi, lo = flat.amax(dim=0).to(cpu), flat.amin(dim=0).to(cpu)
        prev_hi, prev_lo = self.maximum[name][i], self.minimum[name][i]
        self.maximum[name][i] = hi if prev_hi is None else torch.maximum(prev_hi, hi)
        self.minimum[name][i] = lo if prev_lo is None else torch.minimum(prev_lo, lo)
        # Bottom-k by random keys over everything seen: a uniform sample without
        # replacement of all rows of this layer at this step, whatever the chunking.
        keys = torch.rand(flat.shape[0], generator=self.gen)
        k = min(self.cap[name], flat.shape[0])
        sel = torch.topk(keys, k, largest=False).indices
        rows, keys = flat[sel.to(flat.device)].to(cpu), keys[sel]
        if self.rows[name][i] is not None:
            rows = torch.cat([self.rows[name][i], rows])
            keys = torch.cat([self.keys[name][i], keys])
            if len(keys) > self.cap[name]:
                sel = torch.topk(keys, self.cap[name], largest=False).indices
                rows, keys = rows[sel], keys[sel]
        self.rows[name][i], self.keys[name][i] = rows, keys
        # The largest-norm rows, merged the same way.
        top = flat[torch.topk(flat.norm(dim=1), min(TOP_ROWS, flat.shape[0])).indices].to(cpu)
        if self.top[name][i] is not None:
            top = torch.cat([self.top[name][i], top])
            top = top[torch.topk(top.norm(dim=1), min(TOP_ROWS, top.shape[0])).indices]
        self.top[name][i] = top

    def complete(self) -> list[str]:
        """The layers that were called at every step."""
        return [n for n, v in self.absmax.items() if all(a is not None for a in v)]

    def stacked(self, names: Sequence[str]) -> tuple[dict, dict, dict]:
        return ({n: torch.stack(self.absmax[n]) for n in names},
                {n: torch.stack(self._equal_samples(n)) for n in names},
                {n: torch.stack(self._equal_samples(n, self.top)) for n in names})

    def extremes(self, names: Sequence[str]) -> tuple[dict, dict]:
        return ({n: torch.stack(self.maximum[n]) for n in names},
                {n: torch.stack(self.minimum[n]) for n in names})

    def _equal_samples(self, name: str, source: dict | None = None) -> list[torch.Tensor]:
        """The per-step samples cut to one size: a step that saw fewer rows than the budget
        (ECAR's first stages, one token per image) sets it. Uniform rows keep their k lowest
        random keys (still a uniform sample); the largest-norm rows are sorted by norm."""
        per_step = (source or self.rows)[name]
        k = min(len(r) for r in per_step)
        if source is not None:
            return [r[:k] for r in per_step]
        return [r[torch.topk(keys, k, largest=False).indices]
                for r, keys in zip(per_step, self.keys[name])]


class _Recorder:
    """Forward pre-hooks that fill per-step statistics of every layer's input rows and, for
    the layers that read the text-token sequence, of its tokens 1.. (`after_first`; its own
    random generator, so the statistics of all rows are the same with or without it)."""

    def __init__(self, modules: dict[str, torch.nn.Module], steps: int, budget: int, seed: int):
        self.modules = modules
        self.step = 0
        self.all_rows = _RowStats(modules, steps, budget, seed)
        text = text_token_layers(modules)
        self.after_first = _RowStats({n: modules[n] for n in text}, steps, budget, seed + 1)
        self.handles = []

    def __enter__(self):
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_pre_hook(self._hook(name, module_kind(m))))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str, kind: str):
        after_first = name in self.after_first.absmax

        def hook(module, args):
            x = args[0].detach().float()
            flat = x.movedim(1, -1) if kind == "conv" else x
            self.all_rows.add(name, self.step, flat.reshape(-1, flat.shape[-1]))
            if after_first:
                rest = x.narrow(TOKEN_AXIS, 1, x.shape[TOKEN_AXIS] - 1)
                self.after_first.add(name, self.step, rest.reshape(-1, rest.shape[-1]))

        return hook


def sampler_config(model, steps: int | None = None, guidance: float | None = None,
                   scheduler: dict | None = None) -> dict:
    """What the calibration sampler runs (part of every cache key): a diffusion model's
    scheduler, steps, guidance and guidance interval (the spec's, as its bundles sample); an
    ECAR model's stage steps and guidance (its stages are the steps; `steps` must be None: ECAR
    calibrates along its own stage loop)."""
    spec = model.spec
    if spec.family == "ecar":
        cfg = model.cfg
        if steps is not None:
            raise ValueError(f"{spec.name}: ECAR calibrates along its own stage steps "
                             f"{list(cfg.stage_steps)} (no calibration steps)")
        return {"stage_steps": list(cfg.stage_steps),
                "guidance": float(cfg.cfg_scale if guidance is None else guidance)}
    return {"scheduler": dict(scheduler or spec.scheduler), "steps": int(steps or spec.steps),
            "guidance": float(spec.guidance if guidance is None else guidance),
            "guidance_interval": spec.guidance_interval}


def stats_key(model, items: Sequence, sampler: dict, seed: int, budget: int) -> tuple[str, dict]:
    doc = {"format": STATS_FORMAT, "model": model.spec.name, "weights": weights_hash(model),
           "data": list(items), "noise_seed": seed, **sampler, "budget": budget}
    if model.spec.family != "ecar":
        doc["sample_size"] = model.spec.sample_size
    text_layers = text_token_layers(quantizable_modules(model))
    if text_layers:  # statistics without token 0 too (calib/bos.py); older entries lack them
        doc["after_first_token"] = text_layers
    canonical = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest(), doc


def run_sampler(model, items: Sequence, sampler: dict, seed: int, on_step: Callable[[int], None],
                desc: str, progress: bool = True, batch: int = 16) -> list[int]:
    """Run the FP sampler over `items` in batches of `batch` (image i from the runtime's noise
    of seed + i), calling `on_step(i)` as step i starts, before its model calls: a diffusion
    model's sampler step, or an ECAR model's stage (AR once, then its head steps). Returns the
    timesteps of the steps (ECAR: the stage indices)."""
    from tqdm import tqdm

    spec, n = model.spec, len(items)
    if spec.family == "ecar":
        from ..models.ecar import sample as sample_ecar, stage_noise

        noise = stage_noise(model.cfg, seed, n)
        n_steps = len(sampler["stage_steps"])

        def run(sl, hook):
            sample_ecar(model, items[sl], [z[sl] for z in noise], cfg_scale=sampler["guidance"],
                        on_stage=hook)
    else:
        from ..models.sampling import sample
        from ..runtime.pipeline import initial_noise

        noise = initial_noise((spec.in_channels, spec.sample_size, spec.sample_size), seed, n)
        cond, uncond, cmask, umask = model_conditions(model, items)
        n_steps = sampler["steps"]

        def run(sl, hook):
            sample(model, noise[sl], cond[sl], uncond[sl], sampler["scheduler"], n_steps,
                   sampler["guidance"], None if cmask is None else cmask[sl],
                   None if umask is None else umask[sl], on_step=hook,
                   guidance_interval=sampler["guidance_interval"])
    timesteps: list[int] = []
    chunks = list(range(0, n, batch))
    with tqdm(total=n_steps * len(chunks), desc=desc, unit="step", file=sys.stderr,
              disable=not progress) as bar:
        for c, start in enumerate(chunks):
            def hook(i, t=None):
                if i > 0:
                    bar.update(1)
                on_step(i)
                if c == 0:
                    timesteps.append(int(i if t is None else t))

            run(slice(start, start + batch), hook)
            bar.update(1)
    return timesteps


def read_cache(path: Path, load: Callable[[Path], Any], what: str, use_cache: bool,
               log: Callable[[str], None] | None) -> Any | None:
    """`load(path)` of a cache entry, or None when caching is off, the entry is missing, or
    it cannot be read (a damaged entry is recomputed, not fatal)."""
    if not (use_cache and path.is_file()):
        return None
    try:
        value = load(path)
    except Exception as e:
        if log:
            log(f"ignoring unreadable {what} cache {path}: {e}")
        return None
    if log:
        log(f"{what} from cache {path}")
    return value


def collect_statistics(model, items: Sequence | None = None, n_calib: int = 32,
                       steps: int | None = None, guidance: float | None = None,
                       scheduler: dict | None = None, seed: int = CALIB_SEED,
                       budget: int = DEFAULT_BUDGET, batch: int = 16, use_cache: bool = True,
                       cache: str | Path | None = None, progress: bool = True,
                       log=None, device: str | None = None) -> Statistics:
    """Statistics of every quantizable layer over the FP sampler, from the cache when this
    model (weights), data and sampler were seen before; the sampler runs on the torch
    `device` (default: where the model is). `model`: a Denoiser, or an ECAR
    model from `load_ecar`, whose step s merges stage s's AR pass and all its head steps
    (the activations the stage's graphs see): its timestep groups are stage groups."""
    spec = model.spec
    items = list(items) if items is not None else calibration_items(spec, n_calib, seed=seed)
    sampler = sampler_config(model, steps, guidance, scheduler)
    key, doc = stats_key(model, items, sampler, seed, budget)
    path = Path(cache or cache_dir()) / "stats" / f"{spec.name}-{key[:24]}.safetensors"
    cached = read_cache(path, Statistics.load, "statistics", use_cache, log)
    if cached is not None:
        return cached

    n_steps = len(sampler["stage_steps"]) if spec.family == "ecar" else sampler["steps"]
    rec = _Recorder(quantizable_modules(model), n_steps, budget, seed)
    with on_device(model, device), rec:
        timesteps = run_sampler(model, items, sampler, seed, lambda i: setattr(rec, "step", i),
                                f"calibration statistics ({spec.name})", progress, batch)
    complete = rec.all_rows.complete()
    absmax, rows, top = rec.all_rows.stacked(complete)
    stats = Statistics(timesteps, absmax, rows, top,
                       {**{k: v for k, v in doc.items() if k != "data"}, "n_items": len(items),
                        "key": key},
                       *rec.after_first.stacked(rec.after_first.complete()),
                       *rec.all_rows.extremes(complete))
    if use_cache:
        stats.save(path)
        if log:
            log(f"statistics cached in {path}")
    return stats
