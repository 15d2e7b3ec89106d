"""The sampling loop of ECAR bundles in numpy around the bundle's `ar` and `head` components
(DESIGN §7): one AR pass per stage, the head's Euler steps inside the stage, upsample + renoise
between stages. It reproduces `effgen.models.ecar.sample` from the same noise.

Conventions shared with the PyTorch sampler: the white draws of image i come from
`default_rng(seed + i)`, stage by stage (`stage_noise`), so an image does not depend on how many
are generated with it; classifier-free guidance runs as a batch of two, conditional rows first,
and is applied to the head's velocity; label `num_classes` is the null class.

The schedule is read from the manifest (`model.ecar`): every stage's time range, and for the
pyramid schedule the jump S_s = data_scale * up(E_{s-1}) + noise_scale * block_noise(z) with
block_noise(z) = (z - blockmean z) + mean_noise_scale * blockmean z (see models/ecar.py for the
derivation; with gamma = 1/3 mean_noise_scale is 0 and the fresh noise sums to zero over every
2x2 block). Component variants are keyed by stage: the backend picks graph s with
`timestep=s`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backends import Component, load_component
from .bundle import Bundle, BundleError
from .images import to_uint8

StepCallback = Callable[[int, int], None]


def stage_noise(shapes: Sequence[tuple[int, ...]], seed: int, n: int) -> list[np.ndarray]:
    """White draws for n images, one array (n, *shape) per stage: image i from
    default_rng(seed + i), its stages drawn in order."""
    per_image = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        per_image.append([rng.standard_normal(tuple(s), dtype=np.float32) for s in shapes])
    return [np.stack([img[s] for img in per_image]) for s in range(len(shapes))]


# numpy twins of models/ecar.py's map operations


def upsample(x: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)


def block_mean(z: np.ndarray) -> np.ndarray:
    n, c, h, w = z.shape
    return upsample(z.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5), dtype=np.float32))


def block_noise(z: np.ndarray, mean_noise_scale: float) -> np.ndarray:
    mean = block_mean(z)
    out = z - mean
    return out + np.float32(mean_noise_scale) * mean if mean_noise_scale > 0 else out


def patchify(x: np.ndarray, p: int) -> np.ndarray:
    n, c, h, w = x.shape
    k = h // p
    return x.reshape(n, c, k, p, k, p).transpose(0, 2, 4, 3, 5, 1).reshape(n, k * k, p * p * c)


def unpatchify(t: np.ndarray, p: int, c: int) -> np.ndarray:
    n, length, _ = t.shape
    k = int(round(length ** 0.5))
    return t.reshape(n, k, k, p, p, c).transpose(0, 5, 1, 3, 2, 4).reshape(n, c, k * p, k * p)


def split_steps(total: int, default: Sequence[int]) -> list[int]:
    """`total` head steps over the stages in proportion to the default per-stage counts
    (largest remainder, at least one per stage)."""
    default = [int(d) for d in default]
    if total < len(default):
        raise ValueError(f"steps must be at least {len(default)} (one per stage)")
    if total == sum(default):
        return default
    raw = np.asarray(default, np.float64) * total / sum(default)
    steps = np.maximum(1, np.floor(raw)).astype(int)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    i = 0
    while steps.sum() < total:
        steps[order[i % len(steps)]] += 1
        i += 1
    while steps.sum() > total:
        j = int(np.argmax(steps))
        steps[j] -= 1
    return [int(s) for s in steps]


class StagePipeline:
    """Generate images from an ECAR bundle."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "ort", threads: int = 0):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.model = self.bundle.model
        if self.model["family"] != "ecar":
            raise BundleError(f"{self.bundle.root}: StagePipeline runs ecar bundles, not "
                              f"{self.model['family']}")
        self.ecar = self.model["ecar"]
        self.ar: Component = load_component(self.bundle, "ar", backend, threads)
        self.head: Component = load_component(self.bundle, "head", backend, threads)
        self._ar_inputs = [[i["name"] for i in v["inputs"]]
                           for v in self.bundle.component("ar")["variants"]]

    @property
    def num_stages(self) -> int:
        return len(self.ecar["stages"])

    def stage_shapes(self) -> list[tuple[int, int, int]]:
        c, p = self.model["in_channels"], self.ecar["patch_size"]
        return [(c, n * p, n * p) for n in self.ecar["stages"]]

    def labels(self, n: int, class_label) -> tuple[np.ndarray, np.ndarray]:
        if class_label is None:
            raise ValueError("this is a class-conditional bundle: give a class label")
        labels = [class_label] * n if isinstance(class_label, (int, np.integer)) else list(class_label)
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} images")
        labels = np.asarray(labels, np.int64)
        k = self.model["num_classes"]
        if labels.min() < 0 or labels.max() >= k:
            raise ValueError(f"class labels must be in 0..{k - 1}")
        return labels, np.full(n, k, np.int64)  # k = "no class"

    def resolve_steps(self, steps: int | Sequence[int] | None) -> list[int]:
        default = self.bundle.manifest["sampling"]["stage_steps"]
        if steps is None:
            return list(default)
        if isinstance(steps, (int, np.integer)):
            return split_steps(int(steps), default)
        steps = [int(s) for s in steps]
        if len(steps) != self.num_stages or min(steps) < 1:
            raise ValueError(f"give one positive step count per stage ({self.num_stages})")
        return steps

    def denoise(self, noise: Sequence[np.ndarray], labels: np.ndarray, null: np.ndarray,
                stage_steps: Sequence[int], guidance: float,
                on_step: StepCallback | None = None) -> np.ndarray:
        """All stages for the images of `labels` from their white draws `noise` (per stage)."""
        e = self.ecar
        p, c = e["patch_size"], self.model["in_channels"]
        n = len(labels)
        cfg = guidance != 1.0
        per_call = self.ar.batch // 2 if cfg else self.ar.batch
        if per_call < 1:
            raise BundleError("the ECAR graphs were exported with batch 1: guidance needs batch 2")
        out = np.empty((n, c, e["stages"][-1] * p, e["stages"][-1] * p), np.float32)
        total = sum(stage_steps) * -(-n // per_call)
        done = 0
        for start in range(0, n, per_call):
            sl = slice(start, min(n, start + per_call))
            k = sl.stop - sl.start
            lab = np.concatenate([labels[sl], null[sl]]) if cfg else labels[sl]
            ends: list[np.ndarray] = []
            for s, (t0, t1) in enumerate(e["stage_ranges"]):
                zs = noise[s][sl]
                if s == 0:
                    x = zs
                elif e["schedule"] == "flowar":
                    x = zs
                else:
                    r = e["renoise"][s]
                    x = (np.float32(r["data_scale"]) * upsample(ends[-1])
                         + np.float32(r["noise_scale"]) * block_noise(zs, r["mean_noise_scale"]))
                feeds = {"class_labels": lab}
                if s > 0:
                    prefix = np.concatenate([patchify(upsample(m), p) for m in ends], axis=1)
                    feeds["prefix_tokens"] = np.concatenate([prefix, prefix]) if cfg else prefix
                feeds = _pad_rows({k_: v for k_, v in feeds.items() if k_ in self._ar_inputs[s]},
                                  self.ar.batch)
                z = self.ar.run(feeds, s)["z"]
                tok = patchify(x, p).astype(np.float32)
                dt = (t1 - t0) / stage_steps[s]
                rows = 2 * k if cfg else k
                for j in range(stage_steps[s]):
                    xin = np.concatenate([tok, tok]) if cfg else tok
                    hf = _pad_rows({"x_t": xin, "t": np.full(rows, t0 + j * dt, np.float32),
                                    "z": z[:rows]}, self.head.batch)
                    v = self.head.run(hf, s)["velocity"]
                    v = v[k:2 * k] + np.float32(guidance) * (v[:k] - v[k:2 * k]) if cfg else v[:k]
                    tok = tok + np.float32(dt) * v
                    done += 1
                    if on_step is not None:
                        on_step(done, total)
                ends.append(unpatchify(tok, p, c))
            out[sl] = ends[-1]
        return out

    def generate(self, num_images: int = 1, seed: int = 0,
                 steps: int | Sequence[int] | None = None, guidance: float | None = None,
                 on_step: StepCallback | None = None, output: str = "images",
                 class_label=None, prompt=None, prompt_embeds=None, guidance_interval=None,
                 **_unused) -> np.ndarray:
        """Images as uint8 (N, H, W, 3), or with `output="latents"` the final maps (N, C, H, W)
        float32. `steps`: None (the bundle's per-stage counts), a list (one per stage) or an
        int (a total, split over the stages in proportion to the defaults)."""
        if prompt is not None or prompt_embeds is not None:
            raise ValueError("this is a class-conditional ECAR bundle: give --class-label, not a prompt")
        if guidance_interval is not None:
            raise ValueError("an ECAR bundle guides every head step of every stage: it takes no "
                             "guidance interval")
        if output not in ("images", "latents"):
            raise ValueError("output must be 'images' or 'latents'")
        sampling = self.bundle.manifest["sampling"]
        guidance = float(sampling["guidance"] if guidance is None else guidance)
        stage_steps = self.resolve_steps(steps)
        labels, null = self.labels(num_images, class_label)
        noise = stage_noise(self.stage_shapes(), seed, num_images)
        x = self.denoise(noise, labels, null, stage_steps, guidance, on_step)
        return x if output == "latents" else to_uint8(x)


def _pad_rows(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    n = len(next(iter(feeds.values())))
    if n == batch:
        return feeds
    return {k: np.concatenate([v, np.repeat(v[-1:], batch - n, 0)]) for k, v in feeds.items()}
