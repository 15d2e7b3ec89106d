"""Train the reference models that ship with effgen (pixart-ref, dit-ref) on the procedural
captioned data set of models/refdata.py.

    python samples/train_reference.py pixart-ref --minutes 55
    python samples/train_reference.py dit-ref --minutes 40

Seeded and reproducible for a given --steps (a --minutes budget stops at a step count that
depends on the machine; the step count reached is stored in the checkpoint's metadata).
Time on the 2-core development machine, both models training side by side with
--threads 1 at batch 48: pixart-ref ~0.8 s/step, dit-ref ~0.65 s/step (1.0-1.4 s/step while
other work shares the cores), i.e. ~4,500 steps an hour. The shipped checkpoints were
trained for the step counts in their metadata (`safe_open(path, "pt").metadata()`).

DDPM on the linear beta schedule of PixArt-alpha and DiT with v-prediction (the spec's
scheduler says which), pixels in [-1, 1], 10% condition dropout for classifier-free guidance,
DiT's initialisation for fresh runs (models/training.dit_init), AdamW with warm-up and cosine
decay over the budget, EMA weights saved (models/training.py, shared with
samples/train_ecar.py). The shipped weights: three runs, the last two with --resume
(--minutes 75, then 85), ~3.8 hours each; the last run's low-learning-rate tail is what
turned scattered 4x4 patches into one blob per image.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from effgen.models import refdata
from effgen.models.configs import DDPM_LINEAR, get_spec
from effgen.models.denoiser import WEIGHTS_DIR, build_denoiser
from effgen.models.training import TrainConfig, dit_init, train


def ddpm_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(DDPM_LINEAR["beta_start"], DDPM_LINEAR["beta_end"],
                           DDPM_LINEAR["num_train_timesteps"], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def caption_table(attrs_pool: list[refdata.Attributes]):
    """MiniLM states for every distinct caption, plus the empty prompt (the CFG null)."""
    from effgen.models.text_encoder import encode

    captions = sorted({a.caption for a in attrs_pool}) + [""]
    states, mask = encode(captions)
    return {c: i for i, c in enumerate(captions)}, states, mask


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["pixart-ref", "dit-ref"])
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps (upper bound)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--data-size", type=int, default=30_000, help="pictures drawn for training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ema", type=float, default=0.995,
                   help="EMA decay of the saved weights (0.995: a ~200-step window, which suits "
                   "runs of a few thousand steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the EMA weights in --out (fresh optimizer state; the step "
                   "count continues from the checkpoint's metadata)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or WEIGHTS_DIR / f"{args.model}.safetensors"
    spec = get_spec(args.model)
    if args.resume and not out.is_file():
        p.error(f"--resume: {out} does not exist")

    t0 = time.time()
    images, attrs = refdata.make_dataset(args.data_size, "train", seed=args.seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if spec.family == "pixart":
        index, states, mask = caption_table(refdata.split("train"))
        cond_idx = torch.tensor([index[a.caption] for a in attrs])
        null_idx = index[""]
    else:
        labels = torch.tensor([a.class_id for a in attrs])
    print(f"data: {len(attrs)} pictures in {time.time() - t0:.0f}s", flush=True)

    model = build_denoiser(spec, seed=args.seed).train()
    dit_init(model.transformer)  # measured: dit-ref loss 0.126 vs 0.147 after 900 steps
    first_step = 0
    if args.resume:
        from safetensors import safe_open
        from safetensors.torch import load_file

        model.transformer.load_state_dict(load_file(out))
        with safe_open(str(out), "pt") as f:
            first_step = int(f.metadata()["steps"])
        print(f"resuming from {out} at step {first_step}", flush=True)
    ema = copy.deepcopy(model.transformer).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters", flush=True)
    acp = ddpm_alphas_cumprod()
    v_prediction = spec.scheduler["prediction_type"] == "v_prediction"
    g = torch.Generator().manual_seed(args.seed + first_step)

    def save(step: int, loss: float):
        meta = {"model": args.model, "steps": str(step), "batch": str(args.batch),
                "seed": str(args.seed), "loss": f"{loss:.5f}", "ema": str(args.ema),
                "lr": str(args.lr), "train_minutes": f"{(time.time() - t0) / 60:.1f}"}
        tmp = out.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp), metadata=meta)
        os.replace(tmp, out)

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
        x0 = x_all[idx]
        t = torch.randint(0, len(acp), (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        if spec.family == "pixart":
            ci = cond_idx[idx].clone()
            ci[torch.rand(args.batch, generator=g) < 0.1] = null_idx
            pred = model(xt, t.float(), states[ci], mask[ci])
        else:
            # diffusers' DiT label embedding drops 10% of labels to the null class itself
            # while training.
            pred = model(xt, t.float(), labels[idx])
        if v_prediction:  # v = sqrt(abar) eps - sqrt(1 - abar) x0
            target = a.sqrt() * eps - (1 - a).sqrt() * x0
        else:
            target = eps
        return torch.nn.functional.mse_loss(pred[:, :spec.in_channels], target)

    cfg = TrainConfig(lr=args.lr, steps=args.steps, minutes=args.minutes, ema=args.ema)
    step, _ = train(model, ema, model.transformer, loss_fn, cfg, save, first_step)
    print(json.dumps({"model": args.model, "steps": step, "out": str(out),
                      "minutes": round((time.time() - t0) / 60, 1)}))


if __name__ == "__main__":
    sys.exit(main())
