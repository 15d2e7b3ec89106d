"""Train the reference ECAR (ecar-ref) or one of its baselines on the procedural data set of
models/refdata.py, the same data and recipe as dit-ref (samples/train_reference.py):

    python samples/train_ecar.py ecar-ref --minutes 35 --threads 2
    python samples/train_ecar.py ecar-single-stage-ref --device cuda --batch 256 --minutes 8

The shipped ecar-ref, ecar-flowar-ref and ecar-single-stage-ref come from the same 8-minute
H200 run as pixart-ref and dit-ref, with the same arguments (samples/train_reference.py's
docstring): 7,280, 7,411 and 11,980 steps.

Data: models/training.training_pictures (the pictures dit-ref trains on), pixels in [-1, 1],
class = shape x colour (20 classes), 10% of labels replaced by the null class for
classifier-free guidance. Loss: the multistage flow-matching loss of models/ecar.py
(`ECAR.loss`: every stage at once, teacher forced). Training: the loop of models/training.py,
as for dit-ref: AdamW (betas 0.9/0.99, no weight decay), warm-up over 300 steps then cosine
decay over the budget, gradient clipping at 1, EMA (--ema). The EMA weights are saved
atomically every 500 steps and at the end, with metadata (steps reached, batch, seed, loss,
minutes, the ECAR config).

Seeded and reproducible for a given --steps (a --minutes budget stops at a step count that
depends on the machine; it is stored in the checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from effgen.models.configs import get_spec
from effgen.models.denoiser import WEIGHTS_DIR
from effgen.models.ecar import ECAR, config_of, load_checkpoint, save_checkpoint
from effgen.models.training import (TrainConfig, TrainingDiverged, add_training_arguments,
                                    checkpoint_steps, resume_problem, train, training_pictures)

MODELS = ("ecar-ref", "ecar-flowar-ref", "ecar-single-stage-ref", "ecar-tiny")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=MODELS)
    add_training_arguments(p, batch=48, lr=5e-4)
    p.add_argument("--save-every", type=int, default=500)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_spec(args.model)
    cfg = config_of(spec)
    out = args.out or WEIGHTS_DIR / f"{args.model}.safetensors"
    if args.resume and (problem := resume_problem(out, args.steps)):
        p.error(problem)

    t0 = time.time()
    dev = torch.device(args.device)
    images, attrs = training_pictures(args.data_size, args.seed, res=cfg.sample_size,
                                      workers=args.data_workers)
    x_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).to(dev)
    labels = torch.tensor([a.class_id % cfg.num_classes for a in attrs], device=dev)
    print(f"data: {len(attrs)} pictures in {time.time() - t0:.0f}s", flush=True)

    torch.manual_seed(args.seed)
    first_step = 0
    if args.resume:
        model = load_checkpoint(out, cfg).train().to(dev)
        first_step = checkpoint_steps(out)
        print(f"resuming from {out} at step {first_step}", flush=True)
    else:
        model = ECAR(cfg).train().to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters (ar {sum(p.numel() for p in model.ar.parameters()) / 1e6:.2f}M, "
          f"head {sum(p.numel() for p in model.head.parameters()) / 1e6:.2f}M), stages {cfg.stages}, "
          f"{cfg.schedule}, ranges {[(round(a, 3), round(b, 3)) for a, b in cfg.stage_ranges()]}",
          flush=True)
    g = torch.Generator(dev).manual_seed(args.seed + first_step)

    def save(step: int, loss: float):
        save_checkpoint(ema, out, {"model": args.model, "steps": step, "batch": args.batch,
                                   "seed": args.seed, "lr": args.lr, "loss": f"{loss:.5f}",
                                   "ema": str(args.ema), "train_minutes": f"{(time.time() - t0) / 60:.1f}"})

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g, device=dev)
        lab = labels[idx].clone()
        lab[torch.rand(args.batch, generator=g, device=dev) < cfg.class_dropout] = cfg.num_classes
        return model.loss(x_all[idx], lab, g)

    train_cfg = TrainConfig(lr=args.lr, steps=args.steps, minutes=args.minutes, ema=args.ema,
                            save_every=args.save_every, bf16=args.precision != "fp32")
    try:
        step, _ = train(model, ema, model, loss_fn, train_cfg, save, first_step)
    except TrainingDiverged as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"model": args.model, "steps": step, "out": str(out),
                      "minutes": round((time.time() - t0) / 60, 1)}))


if __name__ == "__main__":
    sys.exit(main())
