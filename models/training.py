"""The training loop shared by the reference-model scripts (samples/train_reference.py for
pixart-ref and dit-ref, samples/train_ecar.py for ecar-ref): AdamW, linear warm-up then cosine
decay over the step or time budget, gradient clipping, EMA weights, periodic checkpoints.

The scripts own the loss; this owns everything that must be the same for a fair comparison
of the models they train: the pictures, the optimiser, the schedule, the EMA. On a CUDA device
the step runs under bf16 autocast (fp32 weights, optimiser and EMA) unless the config asks for
fp32, and the loss is read back only when it is printed, so the GPU is never waited on inside
the loop; with `cuda_graph` the step is one CUDA graph's replay.
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import refdata

SHARD_SIZE = 10_000  # pictures per independently seeded shard of the training set


@dataclass
class TrainConfig:
    lr: float = 4e-4
    steps: int = 100_000        # upper bound on optimizer steps (absolute, resumed runs included)
    minutes: float | None = None  # wall-time budget; the LR decays over whichever ends first
    ema: float = 0.995
    warmup: int = 300
    final_lr_fraction: float = 0.1
    save_every: int = 500
    clip_grad_norm: float = 1.0
    bf16: bool = True  # on CUDA, bf16 autocast; False: fp32 throughout, as on the CPU
    # On CUDA, run each step (loss, backward, clipping, optimiser) as the replay of one CUDA
    # graph, captured after GRAPH_WARMUP eager steps: at dit-ref's batch 256 a step is bound by
    # kernel launches. The loss must not wait on the GPU (no boolean-mask indexing, no .item())
    # and must draw its randomness from the generators given to train().
    cuda_graph: bool = False


GRAPH_WARMUP = 3  # eager steps before the capture: they create the optimiser's state


def learning_rate(cfg: TrainConfig, done_steps: int, budget_steps: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak at the end of the
    budget (steps or minutes, whichever is nearer): the low-LR tail is what turns blobs into
    clean shapes."""
    if done_steps < cfg.warmup:
        return cfg.lr * (done_steps + 1) / cfg.warmup
    frac = done_steps / max(1, budget_steps)
    if cfg.minutes is not None:
        frac = max(frac, elapsed_s / (cfg.minutes * 60))
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class TrainingDiverged(RuntimeError):
    """The loss or the EMA weights went non-finite; the last good checkpoint is left as it was."""


def train(model: torch.nn.Module, ema_model: torch.nn.Module, ema_of: torch.nn.Module,
          loss_fn: Callable[[], torch.Tensor | dict[str, torch.Tensor]], cfg: TrainConfig,
          save: Callable[[int, float], None], first_step: int = 0,
          generators: Sequence[torch.Generator] = ()) -> tuple[int, float]:
    """Optimise `model` with `loss_fn()` (one fresh batch per call) until the budget ends;
    `ema_model` tracks the EMA of `ema_of`'s parameters (the part of `model` that is saved).
    `loss_fn` returns the loss, or a dict of named terms whose sum is the loss: each term's
    mean is then printed beside the loss's, so a run shows which of them moves.
    `save(step, mean_recent_loss)` writes a checkpoint every `save_every` steps and at the end.
    A non-finite loss (checked whenever it is printed) or non-finite EMA weights (checked
    before each save) raise TrainingDiverged instead of writing a checkpoint: a resumed run
    saves over the checkpoint it started from, and one NaN step would turn every weight of it
    into NaN (measured on an H200: dit-ref at lr 1e-3, batch 2048, 3,100 steps into a resumed
    run). `generators`: the CUDA generators `loss_fn` draws from, which a CUDA graph
    (`cfg.cuda_graph`) advances on each replay. Returns the final step and the mean loss of the
    last 500 steps."""
    if cfg.steps <= first_step:  # the scripts say so before drawing data (resume_problem)
        raise ValueError(f"nothing to train: the budget of {cfg.steps} steps is already reached "
                         f"at step {first_step}")
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    if cfg.cuda_graph and not on_cuda:
        raise ValueError(f"cuda_graph: the model is on {device}, not on a CUDA device")
    # a graph reads the learning rate from a tensor that each step overwrites
    lr = torch.tensor(cfg.lr, device=device) if cfg.cuda_graph else cfg.lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99),
                            fused=on_cuda, capturable=cfg.cuda_graph)
    ema_params, model_params = list(ema_model.parameters()), list(ema_of.parameters())
    losses: list[torch.Tensor] = []  # kept on the device; read back when printed
    terms: list[torch.Tensor] = []  # the named terms of the last 100 steps, when there are any
    step, start = first_step, time.time()
    saved_step = first_step if first_step else None  # what is on disk now

    def diverged(at_step: int) -> TrainingDiverged:
        kept = (f"the checkpoint of step {saved_step} is kept" if saved_step is not None
                else "nothing was saved")
        return TrainingDiverged(f"training diverged by step {at_step} (non-finite loss or "
                                f"weights at lr {lr_now:.1e}); {kept}: "
                                f"resume with a lower --lr")

    def checked_save(at_step: int):
        nonlocal saved_step
        loss = _mean(losses)  # the last 500 steps; the print-time check saw the earlier ones
        if not math.isfinite(loss) or not _all_finite(ema_params):
            raise diverged(at_step)
        save(at_step, loss)
        saved_step = at_step

    def optimise():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda and cfg.bf16):
            out = loss_fn()
        loss = sum(out.values()) if isinstance(out, dict) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        opt.step()
        return loss, out

    run_step = _graphed(optimise, opt, generators, device) if cfg.cuda_graph else optimise
    while step < cfg.steps:
        lr_now = learning_rate(cfg, step - first_step, cfg.steps - first_step, time.time() - start)
        for group in opt.param_groups:
            if cfg.cuda_graph:
                group["lr"].fill_(lr_now)
            else:
                group["lr"] = lr_now
        loss, out = run_step()
        step += 1
        done = step - first_step
        decay = min(cfg.ema, (1 + done) / (10 + done))  # short EMA window while it is young
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        losses.append(loss.detach().clone())  # a graph's replays overwrite its outputs
        losses = losses[-500:]
        if isinstance(out, dict):
            terms = [*terms[-99:], torch.stack([v.detach().float() for v in out.values()])]
        elapsed = time.time() - start
        if step % 100 == 0:
            recent = _mean(losses[-100:])
            if not math.isfinite(recent):
                raise diverged(step)
            parts = ""
            if isinstance(out, dict):
                means = torch.stack(terms).mean(0).tolist()
                parts = " (" + ", ".join(f"{k} {m:.4f}" for k, m in zip(out, means)) + ")"
            print(f"step {step} loss {recent:.4f}{parts} lr {lr_now:.2e} "
                  f"{elapsed / done:.3f}s/step {elapsed / 60:.1f}min", flush=True)
        if step % cfg.save_every == 0:
            checked_save(step)
        if cfg.minutes is not None and elapsed > cfg.minutes * 60:
            break
    checked_save(step)
    return step, _mean(losses)


def _graphed(optimise: Callable, opt: torch.optim.Optimizer,
             generators: Sequence[torch.Generator], device: torch.device) -> Callable:
    """`optimise` (one training step: loss, backward, optimiser) as a function that runs it
    eagerly on a side stream for its first GRAPH_WARMUP calls, then captures it as a CUDA
    graph and replays that (PyTorch's whole-network capture: the gradients and the step's
    outputs live in the graph's memory; each replay draws new numbers from `generators`)."""
    calls, graph, outputs = 0, None, None
    side = torch.cuda.Stream(device)

    def run():
        nonlocal calls, graph, outputs
        calls += 1
        if calls <= GRAPH_WARMUP:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                result = optimise()
            torch.cuda.synchronize(device)  # its tensors are used on the main stream
            return result
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            for generator in generators:
                graph.register_generator_state(generator)
            opt.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph
            with torch.cuda.graph(graph):
                outputs = optimise()
        graph.replay()
        return outputs

    return run


def add_training_arguments(p: argparse.ArgumentParser, *, batch: int, lr: float) -> None:
    """The options every training script takes, with the script's own default batch and
    learning rate: the budget, the optimiser, the pictures, the device and the checkpoint."""
    p.add_argument("--steps", type=int, default=100_000,
                   help="optimizer steps in all, a resumed checkpoint's included (upper bound)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--data-size", type=int, default=30_000, help="pictures drawn for training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:1, ... (CUDA: see --precision)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="on CUDA, bf16 autocast or fp32 throughout (the CPU always trains in "
                   "fp32); default: bf16, but fp32 for dit-ref, whose attention logits ran away "
                   "under bf16 (models/training.attention_logit_max)")
    p.add_argument("--data-workers", type=int, default=1,
                   help="processes drawing the pictures (the same pictures for any number)")
    p.add_argument("--ema", type=float, default=0.995,
                   help="EMA decay of the saved weights (0.995: a ~200-step window, which suits "
                   "runs of a few thousand steps)")
    p.add_argument("--out", type=Path, default=None,
                   help="the checkpoint (default: the shipped weights, models/weights/MODEL.safetensors)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the EMA weights in --out (fresh optimizer state; the step "
                   "count continues from the checkpoint's metadata)")


@contextmanager
def attention_logit_max(transformer: torch.nn.Module) -> Iterator[list[float]]:
    """While the context is open, record the largest |q.k| / sqrt(d) that the self-attention
    (`attn1`) of each of `transformer`'s blocks computes, over every forward pass: a list with
    an entry per block, updated in place.

    Logits in the thousands (dit-ref's block 3 in the shipped weights) make their softmax rows
    nearly argmaxes; on an H200 they ran away under bf16 autocast (block 2: 91 to 4.8 million
    in 3,441 steps) and not in fp32, which is why dit-ref trains in fp32 on CUDA (README,
    Reference models)."""
    from diffusers.models.attention_processor import Attention

    blocks = list(transformer.transformer_blocks)
    found = [0.0] * len(blocks)
    hooks = []
    for i, block in enumerate(blocks):
        attn = block.attn1
        if not isinstance(attn, Attention):
            raise ValueError(f"attention_logit_max: block {i}'s attn1 is not a diffusers Attention")
        seen: dict[str, torch.Tensor] = {}  # to_q's and to_k's outputs of the current call

        def keep(name, seen=seen):
            return lambda module, args, out: seen.__setitem__(name, out.detach().float())

        def logits(module, args, out, i=i, seen=seen):
            q, k = seen.pop("q"), seen.pop("k")
            b, h = q.shape[0], module.heads
            q = q.view(b, -1, h, q.shape[-1] // h).transpose(1, 2)  # [batch, heads, tokens, d]
            k = k.view(b, -1, h, k.shape[-1] // h).transpose(1, 2)
            q = q if module.norm_q is None else module.norm_q(q)
            k = k if module.norm_k is None else module.norm_k(k)
            found[i] = max(found[i], float((q @ k.transpose(-1, -2)).abs().max()) * module.scale)

        hooks += [attn.to_q.register_forward_hook(keep("q")),
                  attn.to_k.register_forward_hook(keep("k")),
                  attn.register_forward_hook(logits)]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _mean(losses: list[torch.Tensor]) -> float:
    return float(torch.stack(losses).float().mean()) if losses else float("nan")


def resume_problem(path, steps: int) -> str | None:
    """Why `--resume` from the checkpoint at `path` cannot train up to `steps` optimizer steps
    in all, or None when it can. `--steps` counts from the start of training: a checkpoint
    already there would leave the loop nothing to do (and nothing to save but NaN losses)."""
    if not Path(path).is_file():
        return f"--resume: {path} does not exist"
    done = checkpoint_steps(path)
    if done >= steps:
        return (f"--resume: {path} is at step {done:,}, not below --steps {steps:,} (--steps "
                f"counts from the start of training, the checkpoint's steps included)")
    return None


def checkpoint_steps(path) -> int:
    """The optimizer steps a checkpoint of the training scripts was saved at (its metadata):
    where a resumed run counts on from."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {})["steps"])


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the samples' alpha_bar: the x0-space
    error weighted by min(SNR, gamma), expressed for the network's target, so
    min(SNR, gamma) / (SNR + 1) on a v loss and min(SNR, gamma) / SNR on an epsilon loss."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / (snr + 1 if v_prediction else snr)


def training_pictures(n: int, seed: int = 0, res: int = refdata.RESOLUTION,
                      workers: int = 1) -> tuple[np.ndarray, list[refdata.Attributes]]:
    """`n` pictures of the training split, drawn as shards of SHARD_SIZE (shard k is
    `refdata.make_dataset(size, "train", seed=seed * 1000 + k)`), so that `workers` processes
    can draw them in parallel and the pictures are the same for any number of workers."""
    sizes = [min(SHARD_SIZE, n - start) for start in range(0, n, SHARD_SIZE)]
    jobs = [(size, "train", seed * 1000 + k, res) for k, size in enumerate(sizes)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the parent holds torch's thread pools, which do not survive a fork
        with ProcessPoolExecutor(min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            shards = list(pool.map(_draw, jobs))
    else:
        shards = [_draw(job) for job in jobs]
    return np.concatenate([images for images, _ in shards]), [a for _, attrs in shards for a in attrs]


def _draw(job: tuple[int, str, int, int]):
    size, split, seed, res = job
    return refdata.make_dataset(size, split, seed=seed, res=res)


def label_dropout_by_caller(transformer: torch.nn.Module) -> None:
    """Turn off the label dropout inside a diffusers DiT, so that the training loss drops a
    sample's label once, for the whole network (label `num_classes`, the null class).

    diffusers' DiT gives each block its own label embedding, and the output layer calls block
    0's once more; each call drops 10% of the labels to the null class on its own draw while
    training. On dit-ref (6 blocks) that is seven independent draws: some blocks are told the
    class while others are not on half the samples, and the input classifier-free guidance
    asks for at sampling, null in every block, comes up on 0.1^7 of them, so it is never
    trained. (DiT's own code has one shared label embedder.)"""
    from diffusers.models.embeddings import LabelEmbedding

    found = False
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # the null row of the table stays: it is sized at init
            found = True
    if not found:
        raise ValueError("label_dropout_by_caller: the model has no diffusers LabelEmbedding")


def dit_init(transformer: torch.nn.Module) -> None:
    """Re-initialise a diffusers DiT or PixArt transformer the way their papers train from
    scratch: Xavier-uniform linears with zero biases, N(0, 0.02) timestep, class and caption
    embedders and PixArt's shared adaLN, and zero on DiT's adaLN modulation (every DiT block
    starts as the identity), on PixArt's cross-attention output and on the output layer.
    diffusers builds these models with PyTorch's default init (they are meant to be loaded),
    on which dit-ref learned slower: loss 0.147 against 0.126 after 900 steps, same seed."""
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    patch = transformer.pos_embed.proj  # the patchify conv, initialised like a linear
    torch.nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    torch.nn.init.zeros_(patch.bias)
    zero: list[torch.nn.Module] = []
    for name, module in transformer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("timestep_embedder", "caption_projection") or name.endswith("adaln_single.linear"):
            for p in module.parameters():
                if p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.02)
        elif leaf == "embedding_table":
            torch.nn.init.normal_(module.weight, std=0.02)
        elif name.endswith("norm1.linear") or name.endswith("attn2.to_out.0") or leaf in (
                "proj_out_1", "proj_out_2", "proj_out"):
            zero.append(module)
    for module in zero:
        for p in module.parameters():
            torch.nn.init.zeros_(p)
