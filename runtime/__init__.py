"""effgen's runtime: generate images from a bundle without PyTorch or diffusers.

    from effgen import runtime
    images = runtime.generate("build/pixart", prompt="a large red circle at the top left on a grey background")

Only numpy, ONNX Runtime (or TensorRT), tokenizers and Pillow are needed here; a test proves
that this package imports with torch and diffusers unavailable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError
from .pipeline import DenoisePipeline
from .stage_pipeline import StagePipeline

__all__ = ["Bundle", "BundleError", "DenoisePipeline", "StagePipeline", "generate", "load_pipeline"]


def load_pipeline(bundle: str | Path | Bundle, backend: str = "ort", threads: int = 0):
    """Load a bundle once and generate many times with `pipeline.generate(...)`: a
    DenoisePipeline (PixArt, DiT) or, for ECAR bundles, a StagePipeline."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if bundle.model.get("family") == "ecar":
        return StagePipeline(bundle, backend=backend, threads=threads)
    return DenoisePipeline(bundle, backend=backend, threads=threads)


def generate(bundle: str | Path | Bundle, *, prompt=None, prompt_embeds=None, class_label=None,
             negative_prompt: str = "", num_images: int = 1, seed: int = 0,
             steps: int | None = None, guidance: float | None = None,
             guidance_interval: tuple[float, float] | None = None, backend: str = "ort",
             threads: int = 0, on_step=None, output: str = "images") -> np.ndarray:
    """Generate `num_images` images as uint8 (N, H, W, 3).

    Text-conditioned bundles take `prompt` (str or one per image; needs the bundle's
    text_encoder) or `prompt_embeds` (a text states file from `effgen encode-prompts`, or the
    dict of its arrays: 'prompt_embeds' and optional masks and negatives, see
    runtime.text.text_state_rows); class-conditional bundles take `class_label`. Steps,
    guidance and the guidance interval ((lo, hi): the timesteps where guidance applies, the
    others run unguided; (0, inf) = every step) default to the bundle's sampling settings.
    Image i uses noise seeded `seed + i`.
    `output="latents"` returns the denoised latents instead (a bundle without a VAE decoder).
    ECAR bundles take `class_label`; their `steps` is the head's total over the stages (split
    in proportion to the bundle's per-stage counts) or a list with one count per stage.
    """
    pipe = load_pipeline(bundle, backend=backend, threads=threads)
    cond = {k: v for k, v in (("prompt", prompt), ("prompt_embeds", prompt_embeds),
                              ("class_label", class_label)) if v is not None}
    if prompt is not None:
        cond["negative_prompt"] = negative_prompt
    return pipe.generate(num_images=num_images, seed=seed, steps=steps, guidance=guidance,
                         guidance_interval=guidance_interval, on_step=on_step, output=output,
                         **cond)
