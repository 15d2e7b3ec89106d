"""Named model configurations: the real PixArt and DiT architectures, tiny ones for tests,
and the small reference models that ship trained with effgen.

A spec says everything downstream stages need to know about a model without loading it:
the diffusers transformer config, what conditions it, how its output is read, and the sampler
the runtime should use by default. The real architectures get random weights unless the user
names a local diffusers folder with `--checkpoint`; nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

# DDPM training schedule of PixArt-alpha and DiT (and of the reference models).
DDPM_LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
               "beta_schedule": "linear", "prediction_type": "epsilon"}


REF_SCHEDULER = {"name": "dpm++2m", **DDPM_LINEAR, "prediction_type": "v_prediction",
                 "timestep_spacing": "linspace"}


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """How a text-conditioned model is conditioned."""

    encoder: str  # "t5-v1_1-xxl" (states must be precomputed) or "minilm" (ships with effgen)
    max_length: int  # tokens, fixed so the ONNX graph has fixed shapes
    dim: int  # caption_channels


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "pixart" | "dit"
    transformer: dict[str, Any]  # kwargs of the diffusers transformer class
    text: TextSpec | None = None
    num_classes: int | None = None  # class-conditional models; label num_classes = "no class"
    latent_space: bool = True  # False: the model denoises pixels (reference models), no VAE
    vae_scale_factor: int = 8
    scheduler: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"name": "dpm++2m", **DDPM_LINEAR, "timestep_spacing": "linspace"})
    steps: int = 20
    guidance: float = 4.5
    # Timesteps (lo, hi) where guidance applies, None = every step
    # (runtime.pipeline.guidance_scale_at)
    guidance_interval: tuple[float, float] | None = None
    weights: str | None = None  # file under models/weights/ with trained weights

    @property
    def in_channels(self) -> int:
        return self.transformer["in_channels"]

    @property
    def learned_sigma(self) -> bool:
        out = self.transformer.get("out_channels") or self.in_channels
        return out == 2 * self.in_channels

    @property
    def sample_size(self) -> int:
        return self.transformer["sample_size"]

    @property
    def resolution(self) -> int:
        return self.sample_size * (self.vae_scale_factor if self.latent_space else 1)

    def with_sample_size(self, sample_size: int) -> "ModelSpec":
        return dataclasses.replace(self, transformer={**self.transformer, "sample_size": sample_size})


def _pixart(layers: int, heads: int, head_dim: int, sample_size: int, caption_channels: int,
            **extra: Any) -> dict[str, Any]:
    return {
        "num_attention_heads": heads, "attention_head_dim": head_dim, "in_channels": 4,
        "out_channels": 8, "num_layers": layers, "cross_attention_dim": heads * head_dim,
        "attention_bias": True, "sample_size": sample_size, "patch_size": 2,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
        "caption_channels": caption_channels, **extra,
    }


def _dit(layers: int, heads: int, head_dim: int, sample_size: int, num_classes: int,
         **extra: Any) -> dict[str, Any]:
    return {
        "num_attention_heads": heads, "attention_head_dim": head_dim, "in_channels": 4,
        "out_channels": 8, "num_layers": layers, "attention_bias": True,
        "sample_size": sample_size, "patch_size": 2, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": num_classes, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": 1e-5, **extra,
    }


def _ecar(**extra: Any) -> dict[str, Any]:
    """The fields of models/ecar.py's ECARConfig (the reference ECAR plus `extra`)."""
    return {
        "sample_size": 32, "in_channels": 3, "patch_size": 4, "stages": (1, 2, 4, 8),
        "num_classes": 20, "width": 128, "depth": 6, "heads": 4, "mlp_ratio": 4.0,
        "head_type": "transformer", "head_width": 128, "head_depth": 2, "head_heads": 4,
        "head_mlp_ratio": 2.0, "schedule": "pyramid", "boundaries": (0.0, 0.25, 0.5, 0.75),
        "gamma": 1 / 3, "stage_steps": (4, 4, 4, 4), "cfg_scale": 3.0, "class_dropout": 0.1,
        **extra,
    }


def _ecar_specs() -> list[ModelSpec]:
    """ECAR (models/ecar.py): `transformer` holds the ECARConfig fields; steps is the head's
    total over the stages. The reference ECAR and its two baselines (same network sizes):
    FlowAR-style (every stage denoised fully from noise) and single-stage (plain flow matching
    at full resolution, the head steps of all stages in one)."""
    sched = {"name": "ecar-multistage-euler"}
    specs = []
    for name, t in [
        ("ecar-ref", _ecar()),
        ("ecar-flowar-ref", _ecar(schedule="flowar", boundaries=(0.0, 0.0, 0.0, 0.0))),
        ("ecar-single-stage-ref", _ecar(stages=(8,), boundaries=(0.0,), stage_steps=(16,))),
    ]:
        specs.append(ModelSpec(name, "ecar", t, num_classes=20, latent_space=False,
                               scheduler=dict(sched), steps=sum(t["stage_steps"]),
                               guidance=t["cfg_scale"], weights=f"{name}.safetensors"))
    # Tiny, random weights: tests.
    tiny = _ecar(sample_size=16, stages=(1, 2, 4), num_classes=10, width=32, depth=2, heads=2,
                 head_width=32, head_heads=2, boundaries=(0.0, 1 / 3, 2 / 3), stage_steps=(2, 2, 2),
                 cfg_scale=2.0)
    specs.append(ModelSpec("ecar-tiny", "ecar", tiny, num_classes=10, latent_space=False,
                           scheduler=dict(sched), steps=6, guidance=2.0))
    return specs


T5 = TextSpec("t5-v1_1-xxl", 120, 4096)
T5_SIGMA = TextSpec("t5-v1_1-xxl", 300, 4096)
MINILM = TextSpec("minilm", 16, 384)  # reference captions are 14 tokens with [CLS]/[SEP]

_SPECS = [
    # Real architectures (PixArt-alpha/Sigma and DiT-XL/2 as published).
    ModelSpec("pixart-alpha-256", "pixart", _pixart(28, 16, 72, 32, 4096), text=T5),
    ModelSpec("pixart-alpha-512", "pixart", _pixart(28, 16, 72, 64, 4096), text=T5),
    ModelSpec("pixart-alpha-1024", "pixart",
              _pixart(28, 16, 72, 128, 4096, interpolation_scale=2), text=T5),
    ModelSpec("pixart-sigma-1024", "pixart",
              _pixart(28, 16, 72, 128, 4096, interpolation_scale=2,
                      use_additional_conditions=False), text=T5_SIGMA),
    ModelSpec("dit-xl-2-256", "dit", _dit(28, 16, 72, 32, 1000), num_classes=1000,
              steps=50, guidance=4.0),
    ModelSpec("dit-xl-2-512", "dit", _dit(28, 16, 72, 64, 1000), num_classes=1000,
              steps=50, guidance=4.0),
    # Tiny versions of both architectures for tests: same code paths, seconds to export;
    # width 64, so that INT4 blocks of 64 fit every block linear as in the real models.
    ModelSpec("pixart-tiny", "pixart", _pixart(2, 2, 32, 8, 32), text=TextSpec("t5-v1_1-xxl", 8, 32),
              steps=4),
    ModelSpec("dit-tiny", "dit", _dit(2, 2, 32, 8, 10), num_classes=10, steps=4),
    # Reference models: trained by samples/train_reference.py on models/refdata.py, in pixel
    # space (32x32 RGB, no VAE), and shipped with effgen.
    # They predict v, not epsilon: at the first step of a sampler (alpha_bar ~ 4e-5) an
    # epsilon model's x0 estimate divides its error by sqrt(alpha_bar) ~ 0.006, which a small,
    # briefly trained model cannot afford (measured: x0 estimates of +-200 from pure noise).
    # Guidance: the setting of least fd (samples/guidance_sweep.py; README, Reference models).
    # pixart-ref at 2.0 on the steps at t <= 450 and unguided above: fd 55.5, attr_acc 0.952
    # over 1024 images, against 63.8 and 0.956 at 2.0 on every step (t <= 300: 57.6 / 0.944,
    # t <= 600: 56.9 / 0.954; 1.5 and 2.5-3.0 higher fd at every interval). dit-ref at 3.0 on
    # the steps at t <= 450 and unguided above, chosen on its earlier (39,391-step) weights:
    # fd 240, class_acc 0.725 over 1024 images there, against 274 and 0.663 at 2.0 on every
    # step, the least fd without an interval (3.0 on every step: 361 and 0.785); on the
    # 48,469-step weights fd 286 and 0.814 (2.5: 286 / 0.804; t <= 400: 274 / 0.806); on the
    # shipped 54,150-step weights fd 322 and 0.914.
    # ECAR's fd is least at 3.0.
    ModelSpec("pixart-ref", "pixart",
              {**_pixart(6, 4, 32, 32, 384), "in_channels": 3, "out_channels": 3, "patch_size": 4},
              text=MINILM, latent_space=False, guidance=2.0, guidance_interval=(0, 450),
              weights="pixart-ref.safetensors",
              scheduler=REF_SCHEDULER),
    ModelSpec("dit-ref", "dit",
              {**_dit(6, 4, 32, 32, 20), "in_channels": 3, "out_channels": 3, "patch_size": 4},
              num_classes=20, latent_space=False, guidance=3.0, guidance_interval=(0, 450),
              weights="dit-ref.safetensors", scheduler=REF_SCHEDULER),
] + _ecar_specs()
MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
# What `effgen-export pixart` / `effgen-export dit` / `effgen-export ecar` mean: the shipped,
# trained reference models.
ALIASES = {"pixart": "pixart-ref", "dit": "dit-ref", "ecar": "ecar-ref"}


def get_spec(name: str) -> ModelSpec:
    name = ALIASES.get(name, name)
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS) + list(ALIASES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model '{name}'{hint} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]
