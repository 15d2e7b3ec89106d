"""Shared fixtures: tiny diffusers checkpoints (transformer + VAE + scheduler written with
diffusers' own save_pretrained) and the bundles exported from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_SCHEDULERS = {
    # DiT checkpoints ship DDIM-style configs; PixArt ships DPM-Solver++.
    "dit-tiny": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True,
                                   "timestep_spacing": "leading", "steps_offset": 0}),
    "pixart-tiny": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                    "timestep_spacing": "linspace"}),
}


def make_tiny_checkpoint(root: Path, name: str) -> Path:
    """A local diffusers folder like the real ones: transformer/, vae/, scheduler/."""
    import diffusers
    from diffusers import AutoencoderKL

    from effgen.models.configs import DDPM_LINEAR, get_spec
    from effgen.models.denoiser import build_denoiser

    build_denoiser(get_spec(name), seed=1).transformer.save_pretrained(root / "transformer")
    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, sample_size=16)
    vae.save_pretrained(root / "vae")
    cls_name, extra = TINY_SCHEDULERS[name]
    cfg = {k: v for k, v in DDPM_LINEAR.items()}
    getattr(diffusers, cls_name)(**cfg, **extra).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("checkpoints")
    return {name: make_tiny_checkpoint(base / name, name) for name in TINY_SCHEDULERS}


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_checkpoints) -> dict[str, Path]:
    from effgen.exporter.export import export_bundle

    base = tmp_path_factory.mktemp("bundles")
    return {name: export_bundle(name, base / name, checkpoint=ckpt, log=lambda _: None)
            for name, ckpt in tiny_checkpoints.items()}
