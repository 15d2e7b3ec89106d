"""Train the reference models that ship with effgen (pixart-ref, dit-ref) on the procedural
captioned data set of models/refdata.py.

    python samples/train_reference.py pixart-ref --minutes 55
    python samples/train_reference.py dit-ref --device cuda --batch 256 --minutes 8

The shipped weights come from three GPU runs on one H200; dit-ref's then from one CPU run, a
fourth GPU run and distillations from pixart-ref (GPU, then CPU; last on its own samples). First both models and the
three ECAR models (samples/train_ecar.py) trained side by side for 8 minutes each:

    --device cuda --batch 256 --lr 6e-4 --ema 0.999 --data-size 80000 --data-workers 3 --minutes 8

(pixart-ref 11,018 steps, dit-ref 12,533; pixart-ref with --caption-states, since that
machine had no MiniLM); pixart-ref then continued with the same arguments plus --resume for
4.4 minutes, two models on the GPU (20,352 steps). Then pixart-ref and dit-ref continued side
by side for 8.1 minutes at eight times the batch (at batch 256 a step is bound by kernel
launches: 26 ms alone, about 2 ms of it arithmetic):

    --resume --device cuda --batch 2048 --lr 1e-3 --ema 0.999 --data-size 600000 --data-workers 7 --minutes 8.1

(pixart-ref 20,352 -> 26,036 steps, 0.086 s/step; dit-ref 12,533 -> 19,834, 0.067 s/step;
drawing the 600,000 pictures took 63 s). This run took pixart-ref's attr_acc from 0.54 to
0.96 and dit-ref's class accuracy from 0.36 to 0.53 (`effgen eval`, 256 images). dit-ref then
continued on the 2-core CPU with its label dropout drawn once per sample (below), 75 minutes,
19,834 -> 34,176 steps:

    --resume --threads 2 --batch 64 --lr 2e-4 --ema 0.999 --data-size 100000 --minutes 75

(class accuracy 0.60 over 1024 images at the new default guidance 2.0, against 0.52 at the
old default 1.5, with the lower fd; in a control pair of 2,800 steps, the extra steps bring the
accuracy on either dropout, and the mended one keeps strong guidance from spoiling the
pictures, fd 534 against 702 at guidance 3.0: README). Last, dit-ref alone on the H200 for 3
minutes (34,176 -> 39,391 steps, 0.035 s/step; 3.7 minutes with the 600,000 pictures, drawn
in 33 s by 12 workers), class accuracy 0.64 -> 0.70 over 256 images at guidance 2.0:

    --resume --device cuda --batch 2048 --lr 4e-4 --ema 0.999 --data-size 600000 --data-workers 12 --minutes 3

(the same run at --lr 1e-3 went NaN after 3,100 steps; the training loop now stops at the
first non-finite loss and keeps the checkpoint it resumed from). Then the distillation below,
4 minutes on the H200 in fp32 (39,391 -> 42,500 steps) and 70 on the 2-core CPU (-> 48,469):

    --resume --device cuda --precision fp32 --batch 256 --distill-batch 256 --lr 2e-4 --ema 0.999 --data-size 600000 --data-workers 7 --distill-from pixart-ref --distill-t-max 500 --caption-states all-captions.safetensors
    --resume --threads 2 --batch 64 --distill-batch 64 --lr 1e-4 --ema 0.999 --data-size 100000 --distill-from pixart-ref --distill-t-max 500 --minutes 70

(effgen eval, 1024 images at the default sampler: class_acc 0.725 -> 0.814, fd 240 -> 286).
Last, five rounds of the distillation on dit-ref's own samples (OwnSampleDistillation,
below) on the 2-core CPU, each drawing its pool from the weights the round before left: two
of a scratch version of it (README, Reference models), 48,469 -> 51,104 steps, class_acc
0.814 -> 0.850 -> 0.880, then 18 minutes of

    --resume --threads 2 --batch 32 --distill-batch 32 --lr 2e-4 --ema 0.999 --data-size 100000 --distill-from pixart-ref --distill-on own-samples --own-samples 1024 --distill-t-max 500 --distill-guided 1 --seed 9 --minutes 18

(-> 52,021 steps, class_acc 0.885, fd 334), and the same with --own-samples 2048 and
--seed 10 --minutes 24 (-> 53,231: 0.918 / 338), then --seed 11 --minutes 20 (-> 54,150:
0.914 / 322, the shipped weights).

On the 2-core development machine, at batch 48 with --threads 1, a step takes ~0.8 s
(pixart-ref) and ~0.65 s (dit-ref): ~4,500 steps an hour; dit-ref at batch 64 with --threads 2,
0.27 s on an otherwise idle machine.

`--loss-by-noise N` trains nothing: it prints the checkpoint's conditional training loss on N
training pictures in ten ranges of timesteps. On the 39,391-step weights (N = 512) dit-ref's loss
is 1.4-2.0x pixart-ref's below t 500 (where the picture shows the shape and the model draws
its detail) and 9-41x above t 700, where its class label leaves position, size and
background open and the best prediction is their mean. It also prints the model's implicit
shape classifier: how often the picture's own shape, of the four asked for in turn, gives the
least error, and the shape effect: the mean squared change of the prediction when another
shape is asked for. Where the shape is decided the classifier reads 0.67 (t 200-299) and 0.47
(t 400-499) for dit-ref against 0.97 and 0.85 for pixart-ref, and the effect is 0.0016 against
0.017 (t 200-299): dit-ref's prediction hardly depends on the shape its class asks for, and
guidance can only amplify that dependence (the distilled 48,469-step weights: effect 0.0086).

`--distill-from pixart-ref` (dit-ref) teaches that dependence from pixart-ref, which has it:
dit-ref's prediction for a shape's class is regressed on pixart-ref's for the picture's caption
with that shape word (ShapeSwapDistillation). Measured on this CPU from the 39,391-step weights,
50 minutes of a scratch version that drew no null condition, then 40 of this one (`--resume
--threads 1 --batch 32 --lr 2e-4 --ema 0.999 --data-size 100000 --distill-from pixart-ref
--distill-t-max 500`, 9,389 steps): `effgen eval`, 1024 images at the default sampler,
class_acc 0.725 -> 0.813 and fd 240 -> 305; stronger guidance on those weights gives
0.774 / 282 and 0.793 / 324. Not shipped then: see the README, Reference models.

On an H200 the same distillation under bf16 autocast broke the model (the loss rose from 0.10
to 0.12 over 3,441 steps at lr 1e-4 and to 1.6 at 4e-4; effgen eval: class_acc 0.646, fd 379),
and in fp32 it did not. `--loss-by-noise` also prints the largest attention logit (|q.k| /
sqrt(d)) of each block's self-attention over its table (blocks counted from 0): on the
39,391-step weights 91 in block 2 and 14,952 in block 3 against 3-16 in the others; after the
bf16 run 4.8 million and 1.5 million. Side by side on the H200 in fp32 (--precision fp32,
6.5 minutes each):

    --resume --device cuda --precision fp32 --batch 2048 --distill-batch 1024 --lr 1e-4 --ema 0.999 --data-size 600000 --data-workers 7 --distill-from pixart-ref --distill-t-max 500 --caption-states all-captions.safetensors --minutes 6.5
    the same at --batch 256 --distill-batch 256 --lr 2e-4

the first (the failed run's batch and learning rate; 2,273 steps, 0.17 s a step) held its loss
at 0.097-0.101, effgen eval 0.801 / 307; the second (7,120 steps, 0.055 s a step) read 0.811 /
295 at its 4-minute checkpoint and 0.836 at the end (PyTorch sampler, 1024 images; the
39,391-step weights 0.735 on the same), and 3.2 minutes of it alone 0.804 / 307. So dit-ref
trains in fp32 on CUDA by default (--precision; pixart-ref and the ECAR models keep bf16).
Its 4-minute checkpoint, continued on the CPU, gave the 48,469-step weights that the rounds on
dit-ref's own samples started from (above). The next GPU session runs more of those rounds,
and the second run above with --cuda-graph (not yet measured; README).

Seeded and reproducible for a given --steps (a --minutes budget stops at a step count that
depends on the machine; the step count reached is stored in the checkpoint's metadata,
`safe_open(path, "pt").metadata()`).

DDPM on the linear beta schedule of PixArt-alpha and DiT with v-prediction (the spec's
scheduler says which), pixels in [-1, 1], 10% condition dropout for classifier-free guidance
(for dit-ref one draw per sample for the whole network, models/training.label_dropout_by_caller;
the GPU runs above, to step 19,834, had diffusers' own draw in each block),
DiT's initialisation for fresh runs (models/training.dit_init); the pictures, AdamW with
warm-up and cosine decay over the budget, EMA weights and bf16 autocast on CUDA come from
models/training.py, shared with samples/train_ecar.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from effgen.models.training import (TrainConfig, TrainingDiverged, add_training_arguments,
                                    attention_logit_max, checkpoint_steps, dit_init,
                                    label_dropout_by_caller, min_snr_weight, resume_problem, train,
                                    training_pictures)


def ddpm_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(DDPM_LINEAR["beta_start"], DDPM_LINEAR["beta_end"],
                           DDPM_LINEAR["num_train_timesteps"], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def caption_table(attrs_pool: list[refdata.Attributes], cache: Path | None = None):
    """MiniLM states for every distinct caption, plus the empty prompt (the CFG null).

    The states are rounded to float16 (the cache's format: 12 MB for the 973 captions, small
    enough to travel to a GPU machine that lacks the encoder); `cache`, when given, is read if
    it exists and written otherwise."""
    from safetensors.torch import load_file

    captions = sorted({a.caption for a in attrs_pool}) + [""]
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if json.loads(f.metadata()["captions"]) != captions:
                raise SystemExit(f"{cache}: its captions are not this data set's; delete it")
        tensors = load_file(cache)
        states, mask = tensors["states"], tensors["mask"]
    else:
        from effgen.models.text_encoder import encode

        states, mask = encode(captions)
        states = states.half()
        if cache is not None:
            save_file({"states": states, "mask": mask}, str(cache),
                      metadata={"captions": json.dumps(captions)})
    return {c: i for i, c in enumerate(captions)}, states.float(), mask


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
              eps: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process: `x0` noised with `eps` to timestep `t`."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def noised_loss(model, spec, alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                eps: torch.Tensor, cond: tuple) -> torch.Tensor:
    """The training loss of each sample: the model's squared error on its target (v or
    epsilon, as the spec's scheduler says) for `x0` noised with `eps` to timestep `t`.
    `cond`: the model's conditioning inputs after the noisy picture and the timestep."""
    pred = model(add_noise(alphas_cumprod, x0, t, eps), t.float(), *cond)
    target = training_target(spec, alphas_cumprod, x0, t, eps)
    return (pred[:, :spec.in_channels].float() - target).square().mean(dim=(1, 2, 3))


def training_target(spec, alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor) -> torch.Tensor:
    """What the model predicts for `x0` noised with `eps` to `t`: v or epsilon, as the spec's
    scheduler says."""
    if spec.scheduler["prediction_type"] == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    return eps


@torch.no_grad()
def loss_by_noise(model, spec, alphas_cumprod: torch.Tensor, x0: torch.Tensor,
                  shape_conds: list[tuple], shape: torch.Tensor, bins: int = 10, seed: int = 0,
                  batch: int = 256, distill: "ShapeSwapDistillation | None" = None) -> list[dict]:
    """The conditional training loss of the pictures `x0` in each of `bins` equal ranges of
    timesteps (each picture at a seeded timestep of the range, with seeded noise): which noise
    levels a model has learned. At high noise the loss holds the spread of what the condition
    leaves open (with a class label alone: the position, size and background), which the
    picture does not yet show and no model can predict; at low noise the picture shows it, and
    the loss is how well the model draws the detail.

    `shape_conds[k]`: the model's conditioning inputs (after the noisy picture and the
    timestep) with every picture's shape replaced by shape k, its other attributes kept;
    `shape`: each picture's own shape, whose entry is its own condition and gives the loss.
    `shape_acc` is the model's implicit shape classifier: the fraction of pictures whose own
    shape's condition gives the least squared error; `shape_effect`, the mean squared difference
    between the prediction for another shape and for the picture's own: both say how much the
    prediction depends on the shape the condition asks for. With `distill` (built on the same
    pictures), `distill` is its loss on the same noisy pictures, averaged over its conditions:
    how near the model has come to its teacher."""
    g = torch.Generator(x0.device).manual_seed(seed)
    edges = torch.linspace(0, len(alphas_cumprod), bins + 1).round().long().tolist()
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = torch.randint(lo, hi, (len(x0),), generator=g, device=x0.device)
        eps = torch.randn(x0.shape, generator=g, device=x0.device)
        xt = add_noise(alphas_cumprod, x0, t, eps)
        pred = torch.stack([  # [pictures, shapes, channels, height, width]
            torch.cat([model(xt[i:i + batch], t[i:i + batch].float(),
                             *(c[i:i + batch] for c in cond))[:, :spec.in_channels].float()
                       for i in range(0, len(x0), batch)])
            for cond in shape_conds], dim=1)
        err = (pred - training_target(spec, alphas_cumprod, x0, t, eps)[:, None]).square().mean(dim=(2, 3, 4))
        own = pred[torch.arange(len(x0), device=x0.device), shape]
        effect = (pred - own[:, None]).square().mean(dim=(2, 3, 4)).sum(1) / (len(shape_conds) - 1)
        rows.append({"t_from": lo, "t_to": hi - 1,
                     "loss": float(err.gather(1, shape[:, None]).mean()),
                     "shape_acc": float((err.argmin(1) == shape).float().mean()),
                     "shape_effect": float(effect.mean())})
        if distill is not None:  # under each of its conditions in turn, on the same draws
            total = 0.0
            for i in range(0, len(x0), batch):
                picture = torch.arange(i, min(i + batch, len(x0)), device=x0.device)
                for r in range(distill.rows):
                    total += len(picture) * float(distill.loss(
                        model, xt[picture], t[picture], picture, torch.full_like(picture, r)))
            rows[-1]["distill"] = total / (distill.rows * len(x0))
    return rows


def swapped_classes(attrs: list[refdata.Attributes], num_classes: int) -> torch.Tensor:
    """dit-ref's condition for every picture asking for each shape in turn, [5, pictures]: row
    k < 4 the class of shape k in the picture's colour, row 4 the null class."""
    return torch.tensor([[refdata.class_id(s, a.colour) for a in attrs] for s in refdata.SHAPES]
                        + [[num_classes] * len(attrs)])


def swapped_captions(attrs: list[refdata.Attributes], cache: Path | None = None):
    """pixart-ref's condition for every picture asking for each shape in turn: (rows [5,
    pictures] of indices into states/mask, states, mask, the caption of each index); row k < 4
    the picture's caption with shape k, row 4 the empty caption. All 1,080 captions the data
    set can write are encoded (caption_table; `cache` as there)."""
    index, states, mask = caption_table(refdata.all_combinations(), cache)
    rows = torch.tensor([[index[dataclasses.replace(a, shape=s).caption] for a in attrs]
                         for s in refdata.SHAPES] + [[index[""]] * len(attrs)])
    return rows, states, mask, list(index)


def shape_swapped_conds(spec, attrs: list[refdata.Attributes], device) -> list[tuple]:
    """loss_by_noise's `shape_conds`: each picture's condition asking for each shape in turn."""
    shapes = range(len(refdata.SHAPES))
    if spec.family == "dit":
        labels = swapped_classes(attrs, spec.num_classes).to(device)
        return [(labels[k],) for k in shapes]
    rows, states, mask, _ = swapped_captions(attrs)
    return [(states[rows[k]].to(device), mask[rows[k]].to(device)) for k in shapes]


def load_teacher(name: str, device):
    """The shipped weights of `name`, frozen, as a distillation's teacher."""
    from safetensors.torch import load_file

    spec = get_spec(name)
    model = build_denoiser(spec).eval().requires_grad_(False)
    model.transformer.load_state_dict(load_file(WEIGHTS_DIR / spec.weights))
    return model.to(device)


class ShapeSwapDistillation:
    """dit-ref's distillation from pixart-ref (--distill-from): pixart-ref's prediction for a
    noised training picture, asked for by its caption with the shape word swapped, is the
    target of dit-ref's prediction for that shape's class in the picture's colour; the empty
    caption's is the target of the null class's.

    It teaches what denoising on the pictures teaches slowly: how the prediction changes with
    the shape asked for. Measured (`--loss-by-noise 512`'s shape effect) at t < 300, the
    prediction changed 0.0015-0.0029 with the shape asked for on dit-ref's 39,391-step
    weights, which it started from, 0.0086-0.018 on the 48,469-step weights it made, and
    0.017-0.036 on pixart-ref (README, Reference models)."""

    def __init__(self, teacher: str, attrs: list[refdata.Attributes], num_classes: int, device,
                 caption_states: Path | None = None):
        self.teacher = load_teacher(teacher, device)
        # Row k < 4: every picture asking for shape k; row 4: the null condition.
        captions, states, mask, self.caption_text = swapped_captions(attrs, caption_states)
        self.captions, self.states, self.mask = captions.to(device), states.to(device), mask.to(device)
        self.labels = swapped_classes(attrs, num_classes).to(device)

    @property
    def rows(self) -> int:
        return len(self.labels)

    def loss(self, student, xt: torch.Tensor, t: torch.Tensor, picture: torch.Tensor,
             row: torch.Tensor) -> torch.Tensor:
        """The mean squared difference of the predictions for the noisy pictures `xt` (drawn
        from the training pictures `picture`) at timesteps `t`, both asked for the
        condition `row`."""
        c = self.captions[row, picture]
        with torch.no_grad():
            target = self.teacher(xt, t.float(), self.states[c], self.mask[c])
        pred = student(xt, t.float(), self.labels[row, picture])
        k = xt.shape[1]  # the prediction's channels, without a learned variance
        return (pred[:, :k].float() - target[:, :k].float()).square().mean()


class OwnSampleDistillation:
    """dit-ref's distillation from pixart-ref on dit-ref's own samples (--distill-on
    own-samples): on the states dit-ref's sampler passes through, pixart-ref's predictions are
    the targets of dit-ref's.

    Why there: from dit-ref's own states at its first step at t <= 450, pixart-ref (asked for the
    class's shape and colour, and the size, position and background dit-ref drew) finishes 96% of
    the pictures with the asked shape (0.93 unguided), where dit-ref finishes 85% (scratch
    measurement, README). The shape is still open on those states, and dit-ref goes wrong on
    them: blobs that its training pictures, noised, do not show, and ShapeSwapDistillation
    teaches only on those.

    The pool, drawn once from the student as given: `n` pictures (the classes in turn, noise of
    `seed`) at the spec's default sampler; the state of every step at t < `t_max`; each final
    picture's size, position and background as the metric classifier reads them; pixart-ref's
    prediction at each state for the caption of each of the four shapes in the asked colour
    with those attributes, and for the empty caption."""

    def __init__(self, student, teacher: str, n: int, seed: int, t_max: int, device,
                 caption_states: Path | None = None, batch: int = 256):
        from effgen.models.classifier import predict
        from effgen.models.sampling import sample
        from effgen.runtime.images import to_uint8

        spec = student.spec
        self.guidance = spec.guidance
        labels = torch.arange(n) % spec.num_classes
        noise = torch.randn(n, spec.in_channels, spec.sample_size, spec.sample_size,
                            generator=torch.Generator().manual_seed(seed)).numpy()
        states, finals, was_training = [], [], student.training
        for i in range(0, n, batch):
            kept, times = [], []

            def keep(t: int, x: torch.Tensor):
                if t < t_max:
                    kept.append(x.clone())
                    times.append(t)

            lab = labels[i:i + batch].to(device)
            finals.append(sample(student.eval(), noise[i:i + batch], lab,
                                 torch.full_like(lab, spec.num_classes), spec.scheduler, spec.steps,
                                 spec.guidance, guidance_interval=spec.guidance_interval,
                                 on_state=keep).cpu())
            states.append(torch.stack(kept, 1))  # [pictures, steps, C, H, W]
        self.t = torch.tensor(times)  # the same steps for every batch
        student.train(was_training)
        read = predict(to_uint8(torch.cat(finals).numpy()))
        self.sample_shape_acc = float((read["shape"] == labels.numpy() // len(refdata.COLOURS)).mean())
        index, text, mask = caption_table(refdata.all_combinations(), caption_states)
        colours, sizes, backgrounds = list(refdata.COLOURS), list(refdata.SIZES), list(refdata.BACKGROUNDS)
        captions = torch.tensor([[index[refdata.Attributes(
            shape, colours[int(c) % len(colours)], sizes[read["size"][k]],
            refdata.ROWS[read["position"][k] // 3], refdata.COLS[read["position"][k] % 3],
            backgrounds[read["background"][k]]).caption] for shape in refdata.SHAPES] + [index[""]]
            for k, c in enumerate(labels)])  # [pictures, 5]

        steps = len(self.t)
        self.x = torch.cat(states).flatten(0, 1).to(device)  # state j: picture j // steps
        self.t = self.t.repeat(n).to(device)
        self.label = labels.repeat_interleave(steps).to(device)
        captions = captions.repeat_interleave(steps, 0)
        model = load_teacher(teacher, device)
        self.target = torch.empty(len(self.x), 5, *self.x.shape[1:], device=device)
        with torch.no_grad():
            for i in range(0, len(self.x), batch):
                c = captions[i:i + batch].to(device)
                for row in range(5):
                    self.target[i:i + batch, row] = model(
                        self.x[i:i + batch], self.t[i:i + batch].float(), text[c[:, row]].to(device),
                        mask[c[:, row]].to(device))[:, :spec.in_channels]
        self.num_classes = spec.num_classes

    def __len__(self) -> int:
        return len(self.x)

    def loss(self, student, state: torch.Tensor, other_shift: torch.Tensor,
             guided: float) -> torch.Tensor:
        """At the pool's states `state`, the mean squared error of the student's prediction
        under three conditions (the asked class, the null class, the class of another shape in
        the same colour: `other_shift` of 1-3 shapes on), plus `guided` times the squared
        error of the guided prediction at the spec's scale, which the sampler uses."""
        shape, colour = self.label[state] // len(refdata.COLOURS), self.label[state] % len(refdata.COLOURS)
        null = len(refdata.SHAPES)  # the targets' row of the empty caption
        rows = torch.cat([shape, torch.full_like(shape, null), (shape + other_shift) % null])
        state3 = state.repeat(3)
        labels = torch.where(rows == null, self.num_classes,
                             rows * len(refdata.COLOURS) + colour.repeat(3))
        pred = student(self.x[state3], self.t[state3].float(), labels)
        err = pred[:, :self.x.shape[1]].float() - self.target[state3, rows]
        asked, unconditional, _ = err.chunk(3)
        guided_err = unconditional + self.guidance * (asked - unconditional)
        return err.square().mean() + guided * guided_err.square().mean()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["pixart-ref", "dit-ref"])
    add_training_arguments(p, batch=64, lr=4e-4)
    p.add_argument("--caption-states", type=Path, default=None,
                   help="pixart-ref, and dit-ref with --distill-from: cache file of the "
                   "captions' MiniLM states (read if it exists, else written; one file for each, "
                   "they hold other captions): lets a machine without the encoder train")
    p.add_argument("--patch-size", type=int, default=None,
                   help="train at another patch size than the spec's (to ship the result, change "
                   "the spec in models/configs.py)")
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help="Min-SNR loss weighting (Hang et al. 2023): each sample's loss weighted by "
                   "min(SNR, gamma)/(SNR + 1) for v-prediction, min(SNR, gamma)/SNR for epsilon; "
                   "5 in the paper. Default: the plain, unweighted loss (measured on pixart-ref in one GPU "
                   "sweep: Min-SNR-5 read position right on 0.71 of the images after 6,612 steps, "
                   "the plain loss on 0.87-1.00 of them after 2,660-17,626; the weighting takes the "
                   "weight off the high-noise steps where position is decided)")
    p.add_argument("--distill-from", choices=["pixart-ref"], default=None,
                   help="dit-ref: add a distillation loss from the shipped pixart-ref on "
                   "--distill-batch more pictures a step: each noised, a shape (or none) drawn "
                   "for it, and dit-ref's prediction for that shape's class in the picture's "
                   "colour regressed on pixart-ref's for its caption with the shape word swapped "
                   "(the null class on the empty caption's)")
    p.add_argument("--distill-on", choices=["pictures", "own-samples"], default="pictures",
                   help="with --distill-from: noised training pictures (ShapeSwapDistillation), "
                   "or the states of dit-ref's own sampler (OwnSampleDistillation: a pool of "
                   "--own-samples pictures drawn at the start from the weights it resumes from, "
                   "seeded by --seed; --distill-batch states a step, each under the asked class, "
                   "the null class and another shape's)")
    p.add_argument("--own-samples", type=int, default=2048,
                   help="--distill-on own-samples: pictures in the pool, each with the states of "
                   "its steps at t < --distill-t-max (9 below 500); 2,048 gained 0.033 in a "
                   "round where 1,024 had gained 0.005 (README)")
    p.add_argument("--distill-guided", type=float, default=1.0,
                   help="--distill-on own-samples: weight of the guided prediction's error, at "
                   "dit-ref's default scale, beside the error under each condition")
    p.add_argument("--distill-batch", type=int, default=32)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--distill-t-max", type=int, default=1000,
                   help="distil on timesteps below this only")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on CUDA, capture each training step as one CUDA graph and replay it "
                   "(at batch 256 a step is bound by kernel launches)")
    p.add_argument("--loss-by-noise", type=int, default=None, metavar="N",
                   help="train nothing: print the conditional training loss of the checkpoint "
                   "(--out, else the shipped weights) on N training pictures in ten ranges of "
                   "timesteps, its implicit shape accuracy and its shape effect (with --distill-from, "
                   "also the distillation loss), and write them to --json "
                   "(`python samples/train_reference.py dit-ref --loss-by-noise 512`)")
    p.add_argument("--json", type=Path, default=None, help="with --loss-by-noise: write the table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or WEIGHTS_DIR / f"{args.model}.safetensors"
    spec = get_spec(args.model)
    if args.patch_size is not None:
        spec = dataclasses.replace(spec, transformer={**spec.transformer, "patch_size": args.patch_size})
    if args.resume and (problem := resume_problem(out, args.steps)):
        p.error(problem)
    if args.loss_by_noise is not None:
        if args.loss_by_noise < 1:
            p.error("--loss-by-noise: give a number of pictures, at least 1")
        if not out.is_file():
            p.error(f"--loss-by-noise: {out} does not exist")
        args.data_size = args.loss_by_noise
    elif args.json is not None:
        p.error("--json: only with --loss-by-noise (training writes only its checkpoint, to --out)")
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        p.error("--cuda-graph: only with a CUDA --device")
    if args.distill_from and spec.family != "dit":
        p.error("--distill-from: only dit-ref learns from pixart-ref")
    if args.distill_on == "own-samples" and not args.distill_from:
        p.error("--distill-on own-samples: give --distill-from")
    if args.distill_on == "own-samples" and (args.loss_by_noise is not None or args.own_samples < 1):
        p.error("--distill-on own-samples: not with --loss-by-noise; --own-samples at least 1")
    if args.distill_batch < 1 or not 1 <= args.distill_t_max <= DDPM_LINEAR["num_train_timesteps"]:
        p.error("--distill-batch: at least 1; --distill-t-max: a timestep from 1 to "
                f"{DDPM_LINEAR['num_train_timesteps']}")

    t0 = time.time()
    dev = torch.device(args.device)
    images, attrs = training_pictures(args.data_size, args.seed, workers=args.data_workers)
    x_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).to(dev)
    print(f"data: {len(attrs)} pictures in {time.time() - t0:.0f}s", flush=True)

    model = build_denoiser(spec, seed=args.seed).train()
    dit_init(model.transformer)  # measured: dit-ref loss 0.126 vs 0.147 after 900 steps
    first_step = 0
    if args.resume or args.loss_by_noise:
        from safetensors.torch import load_file

        model.transformer.load_state_dict(load_file(out))
        first_step = checkpoint_steps(out)
    distill = None
    if args.distill_from and args.distill_on == "pictures":
        distill = ShapeSwapDistillation(args.distill_from, attrs, spec.num_classes, dev,
                                        args.caption_states)
    elif args.distill_from:  # drawn from the weights resumed from, before training changes them
        t1 = time.time()
        distill = OwnSampleDistillation(model.to(dev), args.distill_from, args.own_samples,
                                        args.seed, args.distill_t_max, dev, args.caption_states)
        print(f"own samples: {args.own_samples} pictures, shape read right on "
              f"{distill.sample_shape_acc:.3f}; {len(distill)} states and their targets in "
              f"{time.time() - t1:.0f}s", flush=True)
    if args.loss_by_noise:
        model.to(dev).eval()
        shape = torch.tensor([refdata.SHAPES.index(a.shape) for a in attrs], device=dev)
        with attention_logit_max(model.transformer) as logit_max:
            rows = loss_by_noise(model, spec, ddpm_alphas_cumprod().to(dev), x_all,
                                 shape_swapped_conds(spec, attrs, dev), shape, seed=args.seed,
                                 distill=distill)
        print(f"{args.model} at step {first_step} ({out}), {len(x_all)} pictures:")
        print("  largest |attention logit| of each block's self-attention: "
              + ", ".join(f"{v:,.1f}" for v in logit_max))
        for r in rows:
            print(f"  t {r['t_from']:>3}-{r['t_to']:<3}  loss {r['loss']:.4f}  "
                  f"implicit shape accuracy {r['shape_acc']:.3f}  shape effect {r['shape_effect']:.4f}"
                  + (f"  distill {r['distill']:.4f}" if distill is not None else ""))
        if args.json is not None:
            args.json.write_text(json.dumps({"model": args.model, "checkpoint": str(out),
                                             "steps": first_step, "pictures": len(x_all),
                                             "attention_logit_max": logit_max,
                                             "bins": rows}, indent=2) + "\n")
        return
    if args.resume:
        print(f"resuming from {out} at step {first_step}", flush=True)
    if spec.family == "pixart":
        index, states, mask = caption_table(refdata.split("train"), args.caption_states)
        states, mask = states.to(dev), mask.to(dev)
        cond_idx = torch.tensor([index[a.caption] for a in attrs], device=dev)
        null_idx = index[""]
    else:
        labels = torch.tensor([a.class_id for a in attrs], device=dev)
        label_dropout_by_caller(model.transformer)
    model.to(dev)
    ema = copy.deepcopy(model.transformer).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters", flush=True)
    acp = ddpm_alphas_cumprod().to(dev)
    v_prediction = spec.scheduler["prediction_type"] == "v_prediction"
    g = torch.Generator(dev).manual_seed(args.seed + first_step)

    def save(step: int, loss: float):
        meta = {"model": args.model, "steps": str(step), "batch": str(args.batch),
                "seed": str(args.seed), "loss": f"{loss:.5f}", "ema": str(args.ema),
                "lr": str(args.lr), "patch_size": str(spec.transformer["patch_size"]),
                "min_snr_gamma": str(args.min_snr_gamma), "train_minutes": f"{(time.time() - t0) / 60:.1f}"}
        tmp = out.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  str(tmp), metadata=meta)
        os.replace(tmp, out)

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g, device=dev)
        x0 = x_all[idx]
        t = torch.randint(0, len(acp), (args.batch,), generator=g, device=dev)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        if spec.family == "pixart":
            # torch.where, not a boolean-mask assignment, which waits on the GPU (--cuda-graph)
            drop = torch.rand(args.batch, generator=g, device=dev) < 0.1
            ci = torch.where(drop, null_idx, cond_idx[idx])
            cond = (states[ci], mask[ci])
        else:  # 10% to the null class, in every block at once
            drop = torch.rand(args.batch, generator=g, device=dev) < 0.1
            cond = (torch.where(drop, spec.num_classes, labels[idx]),)
        err = noised_loss(model, spec, acp, x0, t, eps, cond)
        if args.min_snr_gamma is not None:
            err = err * min_snr_weight(acp[t], args.min_snr_gamma, v_prediction)
        if distill is None:
            return err.mean()
        n = args.distill_batch
        if isinstance(distill, OwnSampleDistillation):
            state = torch.randint(0, len(distill), (n,), generator=g, device=dev)
            other = torch.randint(1, len(refdata.SHAPES), (n,), generator=g, device=dev)
            return {"denoise": err.mean(), "distill": args.distill_weight * distill.loss(
                model, state, other, args.distill_guided)}
        idx = torch.randint(0, len(x_all), (n,), generator=g, device=dev)
        t = torch.randint(0, args.distill_t_max, (n,), generator=g, device=dev)
        row = torch.randint(0, distill.rows, (n,), generator=g, device=dev)
        x0 = x_all[idx]
        xt = add_noise(acp, x0, t, torch.randn(x0.shape, generator=g, device=dev))
        return {"denoise": err.mean(),
                "distill": args.distill_weight * distill.loss(model, xt, t, idx, row)}

    # dit-ref in fp32: its attention logits ran away under bf16 on an H200, not in fp32 (--help)
    precision = args.precision or ("fp32" if args.model == "dit-ref" else "bf16")
    cfg = TrainConfig(lr=args.lr, steps=args.steps, minutes=args.minutes, ema=args.ema,
                      bf16=precision == "bf16", cuda_graph=args.cuda_graph)
    try:
        step, _ = train(model, ema, model.transformer, loss_fn, cfg, save, first_step,
                        generators=[g])
    except TrainingDiverged as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"model": args.model, "steps": step, "out": str(out),
                      "minutes": round((time.time() - t0) / 60, 1)}))


if __name__ == "__main__":
    sys.exit(main())
