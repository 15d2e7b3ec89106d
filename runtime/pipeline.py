"""The denoising loop for PixArt and DiT bundles, in numpy around the bundle's components.

Conventions shared with the PyTorch sampler (`effgen.models.sampling`): noise for image i is
drawn from `default_rng(seed + i)`, so an image does not depend on how many are generated
with it; classifier-free guidance runs as a batch of two, conditional rows first; guidance and
the scheduler see only the first `in_channels` output channels (a learned sigma is dropped);
a guidance interval (`guidance_scale_at`) leaves the steps outside it unguided, running the
conditional rows alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backends import Component, load_component, run_in_batches
from .bundle import Bundle, BundleError
from .images import to_uint8
from .schedulers import make_scheduler

StepCallback = Callable[[int, int], None]


@dataclass
class Conditioning:
    """Per-image conditional and unconditional inputs of the denoiser (first dim = images)."""

    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]


EVERY_STEP = (0.0, math.inf)  # the guidance interval of a bundle that names none


def in_guidance_interval(t: float, interval: Sequence[float] | None) -> bool:
    return interval is None or interval[0] <= t <= interval[1]


def guidance_scale_at(t: float, guidance: float, interval: Sequence[float] | None) -> float:
    """The classifier-free guidance scale of the step at timestep `t`: `guidance` where `t` lies
    in `interval` (lo, hi in training timesteps, both included; None = every step), 1.0 (the
    conditional prediction alone) elsewhere. Guidance on a limited interval is Kynkaanniemi et
    al. 2024: strong guidance at high noise pulls samples toward a few modes and costs fidelity
    (fd), while what the condition decides late, e.g. dit-ref's shapes, needs it at low noise."""
    return guidance if in_guidance_interval(t, interval) else 1.0


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """`interval` as a (lo, hi) pair of timesteps, or None; a ValueError for anything else."""
    if interval is None:
        return None
    try:
        if isinstance(interval, (str, bytes)):
            raise TypeError
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be two timesteps [lo, hi], "
                         f"not {interval!r}") from None
    if not 0 <= lo <= hi:  # also false for NaN
        raise ValueError(f"guidance interval [{lo:g}, {hi:g}] must satisfy 0 <= lo <= hi")
    return lo, hi


def initial_noise(shape: Sequence[int], seed: int, n: int) -> np.ndarray:
    return np.stack([np.random.default_rng(seed + i).standard_normal(tuple(shape), dtype=np.float32)
                     for i in range(n)])


class DenoisePipeline:
    """Generate images from a PixArt or DiT bundle."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "ort", threads: int = 0):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.model = self.bundle.model
        if self.model["family"] not in ("pixart", "dit"):
            raise BundleError(f"{self.bundle.root}: DenoisePipeline runs pixart and dit bundles, "
                              f"not {self.model['family']}")
        comps = self.bundle.components
        self.denoiser: Component = load_component(self.bundle, "denoiser", backend, threads)
        self.text_encoder = (load_component(self.bundle, "text_encoder", backend, threads)
                             if "text_encoder" in comps else None)
        self.vae_decoder = (load_component(self.bundle, "vae_decoder", backend, threads)
                            if "vae_decoder" in comps else None)
        self._tokenizer = None

    # -- conditioning ---------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token states and float mask for prompts, through the bundle's text encoder."""
        if self.text_encoder is None:
            raise BundleError(f"{self.bundle.root} has no text_encoder component: pass "
                              "precomputed text states instead of a prompt (prompt_embeds=, "
                              "--prompt-embeds: a file from `effgen encode-prompts`)")
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            entry = self.bundle.component("text_encoder")
            self._tokenizer = Tokenizer.from_file(str(self.bundle.path(entry["tokenizer"])))
        from .text import encode_batch

        max_length = self.bundle.component("text_encoder")["max_length"]
        ids, mask = encode_batch(self._tokenizer, list(prompts), max_length)
        states = run_in_batches(self.text_encoder, {"input_ids": ids, "attention_mask": mask})
        return states["encoder_hidden_states"], mask.astype(np.float32)

    def conditioning(self, n: int, prompt: str | Sequence[str] | None = None,
                     negative_prompt: str = "",
                     prompt_embeds: dict[str, np.ndarray] | str | Path | None = None,
                     class_label: int | Sequence[int] | None = None) -> Conditioning:
        def per_image(x):
            x = [x] * n if isinstance(x, (str, int, np.integer)) else list(x)
            if len(x) != n:
                raise ValueError(f"got {len(x)} prompts/labels for {n} images")
            return x

        if self.model["family"] == "dit":
            if class_label is None:
                raise ValueError("this is a class-conditional bundle: give a class label")
            labels = np.asarray(per_image(class_label), np.int64)
            k = self.model["num_classes"]
            if labels.min() < 0 or labels.max() >= k:
                raise ValueError(f"class labels must be in 0..{k - 1}")
            return Conditioning({"class_labels": labels},
                                {"class_labels": np.full(n, k, np.int64)})  # k = "no class"
        if prompt is not None:
            states, mask = self.encode_prompts(per_image(prompt) + [negative_prompt])
            return Conditioning(
                {"encoder_hidden_states": states[:n], "encoder_attention_mask": mask[:n]},
                {"encoder_hidden_states": np.repeat(states[n:], n, 0),
                 "encoder_attention_mask": np.repeat(mask[n:], n, 0)})
        if isinstance(prompt_embeds, (str, Path)):  # a text states file
            from .text import read_text_states

            prompt_embeds = read_text_states(prompt_embeds)
        if prompt_embeds is not None:
            return self._from_embeddings(prompt_embeds, n)
        raise ValueError("this is a text-conditioned bundle: give a prompt or prompt embeddings")

    def _from_embeddings(self, e: dict[str, np.ndarray], n: int) -> Conditioning:
        """Precomputed text states (runtime.text.text_state_rows): `prompt_embeds` (L, D) or
        (1, L, D) or (n, L, D), optional `prompt_attention_mask`, `negative_prompt_embeds`,
        `negative_prompt_attention_mask`."""
        from .text import text_state_rows

        text = self.model["text"]
        cond, cmask, unc, umask = text_state_rows(e, text["max_length"], text["dim"], n)
        return Conditioning({"encoder_hidden_states": cond, "encoder_attention_mask": cmask},
                            {"encoder_hidden_states": unc, "encoder_attention_mask": umask})

    # -- sampling -------------------------------------------------------------------------

    def denoise(self, noise: np.ndarray, cond: Conditioning, steps: int, guidance: float,
                on_step: StepCallback | None = None,
                guidance_interval: Sequence[float] | None = None) -> np.ndarray:
        """Run the sampler from `noise` (N, C, H, W); returns the final latents/pixels."""
        n, c = noise.shape[:2]

        def scheduler():
            sched = make_scheduler(self.bundle.manifest["scheduler"])
            sched.set_timesteps(steps)
            return sched

        scales = [guidance_scale_at(float(t), guidance, guidance_interval)
                  for t in scheduler().timesteps]
        batch = self.denoiser.batch
        if batch < 2 and any(g != 1.0 for g in scales):
            raise BundleError("the denoiser was exported with batch 1: guidance needs batch 2")
        # Chunks of as many images as the graph has rows: a guided step runs their conditional
        # and unconditional rows in two calls, an unguided step the conditional rows in one.
        out = np.empty_like(noise)
        total = steps * -(-n // batch)
        done = 0
        for start in range(0, n, batch):
            k = min(batch, n - start)
            sl = slice(start, start + k)
            sched = scheduler()  # multistep schedulers keep state: a fresh one per chunk
            x = noise[sl]
            for t, g in zip(sched.timesteps, scales):
                cfg = g != 1.0
                feeds = {name: v[sl] for name, v in cond.cond.items()}
                if cfg:
                    feeds = {name: np.concatenate([v, cond.uncond[name][sl]])
                             for name, v in feeds.items()}
                feeds["sample"] = np.concatenate([x, x]) if cfg else x
                feeds["timestep"] = np.full(len(feeds["sample"]), t, np.float32)
                pred = run_in_batches(self.denoiser, feeds, float(t))["model_output"][:, :c]
                if cfg:
                    eps = pred[k:] + g * (pred[:k] - pred[k:])
                else:
                    eps = pred
                x = sched.step(eps, t, x)
                done += 1
                if on_step is not None:
                    on_step(done, total)
            out[sl] = x
        return out

    def decode(self, x: np.ndarray) -> np.ndarray:
        if self.model["latent_space"]:
            if self.vae_decoder is None:
                raise BundleError(f"{self.bundle.root} denoises latents but has no vae_decoder "
                                  "component (export with a --checkpoint that has a vae/)")
            x = run_in_batches(self.vae_decoder, {"latent": x})["image"]
        return to_uint8(x)

    def sampling_defaults(self, steps: int | None = None, guidance: float | None = None,
                          guidance_interval: Sequence[float] | None = None
                          ) -> tuple[int, float, tuple[float, float]]:
        """(steps, guidance, guidance interval): the arguments given, the bundle's for those
        that are None. A bundle without a `guidance_interval` guides every step (EVERY_STEP)."""
        sampling = self.bundle.manifest["sampling"]
        steps = int(sampling["steps"] if steps is None else steps)
        guidance = float(sampling["guidance"] if guidance is None else guidance)
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if guidance_interval is not None:
            return steps, guidance, check_guidance_interval(guidance_interval)
        try:
            interval = check_guidance_interval(sampling.get("guidance_interval"))
        except ValueError as e:
            raise BundleError(f"{self.bundle.root}: sampling: {e}") from None
        return steps, guidance, interval or EVERY_STEP

    def generate(self, num_images: int = 1, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, on_step: StepCallback | None = None,
                 output: str = "images", guidance_interval: Sequence[float] | None = None,
                 **conditioning) -> np.ndarray:
        """Images as uint8 (N, H, W, 3), or with `output="latents"` the denoised latents
        (N, C, h, w) float32 before the VAE. Conditioning: `prompt=`, `prompt_embeds=` or
        `class_label=` (one for all images or one per image), `negative_prompt=`. Steps,
        guidance and the guidance interval ((lo, hi) timesteps, see `guidance_scale_at`;
        (0, inf) guides every step) default to the bundle's."""
        if output not in ("images", "latents"):
            raise ValueError("output must be 'images' or 'latents'")
        steps, guidance, guidance_interval = self.sampling_defaults(steps, guidance,
                                                                    guidance_interval)
        m = self.model
        noise = initial_noise((m["in_channels"], m["sample_size"], m["sample_size"]), seed, num_images)
        cond = self.conditioning(num_images, **conditioning)
        x = self.denoise(noise, cond, steps, guidance, on_step, guidance_interval)
        return x if output == "latents" else self.decode(x)
