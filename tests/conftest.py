"""Shared fixtures: tiny diffusers checkpoints (transformer + VAE + scheduler written with
diffusers' own save_pretrained) and the bundles exported from them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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


@pytest.fixture(scope="session")
def run_torch_free():
    """Run a Python snippet in a fresh interpreter where torch, diffusers and transformers
    cannot be imported (as on a bare device), then check none of them leaked in; the snippet
    passes by finishing."""
    blocked = ("torch", "diffusers", "transformers")

    def run(body: str) -> None:
        code = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
                + textwrap.dedent(body)
                + f"\nleaked = [m for m in {blocked!r} if sys.modules.get(m)]\n"
                  "assert not leaked, leaked\nprint('ok')\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "ok"

    return run


@pytest.fixture(scope="session")
def perturbed_ecar():
    """An ECAR model with every parameter nudged off its initialisation: adaLN-Zero starts
    as the identity, and a test should exercise every path."""
    from effgen.models import ecar as E

    def make(cfg, seed: int = 0):
        torch.manual_seed(seed)
        model = E.ECAR(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model

    return make


@pytest.fixture(scope="session")
def sample_script():
    """Loads a script of samples/ (not a package) as a module, for tests that run its main()
    as the README does."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "samples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
