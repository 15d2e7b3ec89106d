"""The PyTorch sampler: the FP reference the exported bundles are compared with, and the
loop calibration hooks into.

It uses diffusers' own schedulers (the runtime's numpy ones are tested against them) and the
same conventions as `effgen.runtime`: classifier-free guidance as a batch of two
(conditional first), guidance on the first `in_channels` output channels only (a learned sigma
is dropped), steps outside a guidance interval run the conditional rows alone, pixels or
latents in [-1, 1] scale.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .denoiser import Denoiser
from ..runtime.images import to_uint8  # noqa: F401  (one conversion for both paths)
from ..runtime.pipeline import guidance_scale_at


def diffusers_scheduler(config: dict):
    """The diffusers scheduler that `effgen.runtime.schedulers.make_scheduler(config)` mirrors."""
    import diffusers

    cfg = {k: v for k, v in config.items() if k != "name"}
    name = config["name"]
    if name == "ddim":
        return diffusers.DDIMScheduler(**cfg)
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                     **cfg)
    if name == "flow-euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    raise ValueError(f"unknown scheduler '{name}'")


@torch.no_grad()
def sample(denoiser: Denoiser, noise: np.ndarray, cond: torch.Tensor, uncond: torch.Tensor,
           scheduler_config: dict, steps: int, guidance: float,
           cond_mask: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None,
           on_step: Callable[[int, int], None] | None = None,
           guidance_interval: tuple[float, float] | None = None,
           on_state: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise `noise` (N, C, H, W) to samples. `cond`/`uncond` are per-image conditions
    (class labels or text states, first dimension N); `on_step(i, t)` runs before each
    denoiser call (calibration uses it to know the timestep); `guidance_interval` (lo, hi
    timesteps, None = every step) limits guidance as `runtime.pipeline.guidance_scale_at`
    does; `on_state(t, x)` sees the state each step's denoiser call is given (training on the
    sampler's own states, samples/train_reference.py). Runs on the device of `cond`."""
    sched = diffusers_scheduler(scheduler_config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(np.asarray(noise, np.float32)).clone().to(cond.device)
    n, c = x.shape[:2]
    both = torch.cat([cond, uncond])
    both_mask = None if cond_mask is None else torch.cat([cond_mask, uncond_mask])
    for i, t in enumerate(sched.timesteps):
        if on_step is not None:
            on_step(i, int(t))
        if on_state is not None:
            on_state(int(t), x)
        g = guidance_scale_at(float(t), guidance, guidance_interval)
        if g == 1.0:
            tt = torch.full((n,), float(t), device=x.device)
            eps = denoiser(x, tt, cond, cond_mask)[:, :c]
        else:
            tt = torch.full((2 * n,), float(t), device=x.device)
            out = denoiser(torch.cat([x, x]), tt, both, both_mask)[:, :c]
            eps_c, eps_u = out[:n], out[n:]
            eps = eps_u + g * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample
    return x
