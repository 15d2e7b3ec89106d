"""ECAR: multistage continuous autoregressive image generation (arXiv 2412.14170), our own
implementation. No public code or weights exist; everything the paper leaves open is a field
of `ECARConfig`.

Read top to bottom:

1. `ECARConfig`: stage sizes, time boundaries, gamma, steps per stage, head type, CFG scale,
   and the two baselines as settings of the same config (`baseline(cfg, ...)`).
2. The multistage flow (pure functions): down/up-sampling, patchify, block noise, the stage
   time ranges and the renoising between stages. The identities are derived right there and
   tested in tests/test_ecar.py.
3. The networks: `ARTransformer` (block-causal over the token maps of all stages,
   class-conditioned) and `FlowHead` (velocity for one stage's tokens, given the AR output),
   both built from nn.Linear so the shared plan machinery (calib/plan.py) addresses them by
   module path.
4. `ECAR` (both networks + the training loss) and `sample` (the PyTorch sampler that the
   torch-free runtime, runtime/stage_pipeline.py, reproduces from the same noise).

Conventions
-----------
Time runs from noise (t = 0) to data (t = 1). A "map" is an image at a stage's resolution,
(N, C, h, h) with h = stages[s] * patch_size; its tokens are its p x p patches, (N, n*n, p*p*C).
Stage s's data is the full image average-pooled to h_s (`downsample`); moving up a stage is a
nearest-neighbour x2 upsample (`upsample`), so `upsample(downsample_{s-1}(x))` is the 2x2
block mean of `downsample_s(x)`.

The multistage flow (Pyramid Flow's piecewise flow, ECAR's "multistage flow")
-----------------------------------------------------------------------------
Stage s owns the time slice [start_s, end_s] of one noise-to-data path. On its slice the state
moves on a straight line between two points that share the stage's white noise eps_s:

    start point   S_s = start_s * up(down_{s-1}(x)) + (1 - start_s) * eps_s
    end point     E_s = end_s   * down_s(x)         + (1 - end_s)   * eps_s
    x_t = S_s + (t - start_s) / (end_s - start_s) * (E_s - S_s),   velocity v = (E_s - S_s) / (end_s - start_s)

(stage 0 starts at t = 0 from pure noise; the last stage ends at t = 1 on the data). The start
point has no detail finer than the previous stage (its data term is the upsampled coarse map),
the end point has this stage's detail: a stage only denoises its own slice.

Between stages the end state of stage s-1 is upsampled and renoised into the start state of
stage s. Upsampling white noise does not give white noise: up(eps) is constant on each 2x2 block
(covariance J, the 4x4 all-ones matrix, per block). We add block noise m ~ N(0, Sigma_gamma),
Sigma_gamma = (1 + gamma) I - gamma J per 2x2 block (Pyramid Flow's correction), and ask that

    alpha * up(eps_{s-1}) + beta * m  ~  N(0, I)   (white again)

    => alpha^2 J + beta^2 ((1 + gamma) I - gamma J) = I
    => beta^2 = 1 / (1 + gamma),  alpha^2 = gamma / (1 + gamma).

With the orthogonal projections P_par = J / 4 (onto block-constant maps: the 2x2 block mean)
and P_perp = I - J / 4, Sigma_gamma = (1 + gamma) P_perp + (1 - 3 gamma) P_par, which is a
covariance for 0 < gamma <= 1/3, and beta * m can be drawn from white z as

    block_noise(z) = beta * m = P_perp z + sqrt((1 - 3 gamma) / (1 + gamma)) P_par z,

whose covariance is I - alpha^2 J. For gamma = 1/3: alpha = 1/2, beta = sqrt(3)/2 and
block_noise(z) = z - blockmean(z): the fresh noise of every 2x2 block sums to zero, so renoising
leaves the block means (what the previous stage decided) untouched and only adds detail noise.

The jump. Let tau = start_s and a = (1 - tau) * alpha. If stage s-1 ends at
end_{s-1} = tau / (tau + a), then

    S_s = (tau + a) * up(E_{s-1}) + (1 - tau) * block_noise(z)

because (tau + a) * end_{s-1} = tau (the data term) and (tau + a)(1 - end_{s-1}) = a, so the
noise is (1 - tau)(alpha up(eps_{s-1}) + block_noise(z)) = (1 - tau) eps_s with eps_s white.
For gamma = 1/3: end_{s-1} = 2 tau / (1 + tau) and S_s = (1 + tau)/2 up(E_{s-1})
+ (1 - tau)(z - blockmean z): Pyramid Flow's renoising rule. The path is continuous in
distribution across the jump: S_s built from E_{s-1} has exactly the marginal (mean
tau * up(down_{s-1} x), covariance (1 - tau)^2 I) that stage s is trained on, and with
gamma = 1/3 the block means keep the signal-to-noise ratio they had at the end of stage s-1
(a block mean of white noise has std 1/2, hence end = 2 tau / (1 + tau) > tau).

Training samples the noises as that same chain (eps_0 = z_0, eps_s = alpha up(eps_{s-1}) +
block_noise(z_s)), so the pair (AR input = up(E_{s-1}), stage-s path) is distributed exactly as
at sampling time.

Baselines, same code: `schedule="flowar"`: every stage runs from pure noise (t = 0) to its
clean map (t = 1), no renoising, the AR sees the clean previous stage (FlowAR); a config with a
single stage (`stages=(n,)`) is plain flow matching at full resolution with a once-run
conditioner (`baseline(cfg, "single-stage")`).

Quantization: every matmul is an nn.Linear with a stable module path (`ar.blocks.3.attn.qkv`,
`head.blocks.0.mlp.fc2`, ...), listed by `quantizable_modules`; the exported graphs keep these
paths in their node names. ECAR's "timesteps" for plans are stage indices: a plan's
`timestep_groups` for an ECAR model are ranges over 0..S-1 (`resolve_plan(...,
num_train_timesteps=cfg.num_timesteps)`); group [lo, hi] means stages lo..hi share activation
scales. A stage is the unit because the AR runs once per stage and every head step of a stage
runs the same per-stage graph (see exporter/ecar_export.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- 1. config ---------------------------------------------------------------------------

SCHEDULES = ("pyramid", "flowar")
HEAD_TYPES = ("mlp", "transformer")


@dataclasses.dataclass(frozen=True)
class ECARConfig:
    # image and tokens
    sample_size: int = 32  # pixels per side (the reference models work in pixel space)
    in_channels: int = 3
    patch_size: int = 4
    stages: tuple[int, ...] = (1, 2, 4, 8)  # tokens per side of each stage's map, x2 each stage
    num_classes: int = 20  # label num_classes is the null class (CFG)
    # AR transformer
    width: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    # flow head
    head_type: str = "transformer"  # "mlp": per-token MLP with adaLN (MAR); "transformer": over the stage's tokens
    head_width: int = 128
    head_depth: int = 2
    head_heads: int = 4
    head_mlp_ratio: float = 2.0
    # multistage flow
    schedule: str = "pyramid"  # "pyramid" (ECAR / Pyramid Flow) | "flowar" (full denoise per stage)
    boundaries: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)  # start time of each stage (pyramid)
    gamma: float = 1 / 3  # block-noise correlation; 1/3: fresh noise sums to zero per 2x2 block
    stage_steps: tuple[int, ...] = (4, 4, 4, 4)  # Euler steps of the head per stage
    cfg_scale: float = 3.0
    class_dropout: float = 0.1  # training: labels replaced by the null class

    def __post_init__(self):
        for name in ("stages", "boundaries", "stage_steps"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        S = len(self.stages)
        if S < 1:
            raise ValueError("ECARConfig.stages: need at least one stage")
        if any(b != 2 * a for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError(f"ECARConfig.stages: each stage must double the previous, got {self.stages}")
        if self.stages[-1] * self.patch_size != self.sample_size:
            raise ValueError(f"ECARConfig: last stage {self.stages[-1]} x patch {self.patch_size} "
                             f"!= sample_size {self.sample_size}")
        if len(self.stage_steps) != S or min(self.stage_steps) < 1:
            raise ValueError(f"ECARConfig.stage_steps: one positive count per stage, got {self.stage_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ECARConfig.schedule: {self.schedule!r} not in {SCHEDULES}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"ECARConfig.head_type: {self.head_type!r} not in {HEAD_TYPES}")
        b = self.boundaries
        if self.schedule == "pyramid" and (len(b) != S or b[0] != 0.0
                                           or any(y <= x for x, y in zip(b, b[1:])) or b[-1] >= 1):
            raise ValueError(f"ECARConfig.boundaries: {S} increasing start times from 0 below 1, got {b}")
        if not 0 < self.gamma <= 1 / 3 + 1e-12:
            raise ValueError(f"ECARConfig.gamma: must be in (0, 1/3], got {self.gamma}")
        if self.width % self.heads or self.head_width % self.head_heads:
            raise ValueError("ECARConfig: width must divide by heads (and head_width by head_heads)")

    # derived sizes
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_timesteps(self) -> int:
        """What a plan's timestep_groups range over for ECAR: the stage indices."""
        return len(self.stages)

    @property
    def token_dim(self) -> int:
        return self.patch_size ** 2 * self.in_channels

    def tokens(self, s: int) -> int:
        return self.stages[s] ** 2

    def offset(self, s: int) -> int:
        """Position of stage s's first token in the concatenated sequence."""
        return sum(n * n for n in self.stages[:s])

    @property
    def seq_len(self) -> int:
        return self.offset(self.num_stages)

    def pixels(self, s: int) -> int:
        return self.stages[s] * self.patch_size

    @property
    def alpha(self) -> float:
        """Weight of the upsampled old noise in the new white noise: sqrt(gamma / (1 + gamma))."""
        return math.sqrt(self.gamma / (1 + self.gamma))

    @property
    def mean_noise_scale(self) -> float:
        """Coefficient of the block-mean part of the fresh noise: sqrt((1 - 3g) / (1 + g))."""
        return math.sqrt(max(0.0, 1 - 3 * self.gamma) / (1 + self.gamma))

    def stage_ranges(self) -> list[tuple[float, float]]:
        """[start_s, end_s] of every stage. flowar: (0, 1) each. pyramid: start_s = boundaries[s],
        end_{s-1} = tau / (tau + (1 - tau) alpha) with tau = start_s, the last ends at 1."""
        S = self.num_stages
        if self.schedule == "flowar":
            return [(0.0, 1.0)] * S
        starts = list(self.boundaries)
        ends = [t / (t + (1 - t) * self.alpha) for t in starts[1:]] + [1.0]
        return list(zip(starts, ends))

    def renoise_coefficients(self, s: int) -> tuple[float, float]:
        """(data_scale, noise_scale) of the jump into stage s >= 1 (pyramid):
        S_s = data_scale * up(E_{s-1}) + noise_scale * block_noise(z)."""
        tau = self.boundaries[s]
        return tau + (1 - tau) * self.alpha, 1 - tau

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ECARConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def baseline(cfg: ECARConfig, kind: str) -> ECARConfig:
    """The comparison settings of the same model family.
    "flowar": each stage denoised fully from noise (t: 0 -> 1), AR conditioned on the clean
    previous map, no renoising. "single-stage": one stage at full resolution, plain flow
    matching (0 -> 1) with the head's steps summed over the stages."""
    if kind == "flowar":
        return dataclasses.replace(cfg, schedule="flowar", boundaries=(0.0,) * cfg.num_stages)
    if kind == "single-stage":
        return dataclasses.replace(cfg, stages=(cfg.stages[-1],), boundaries=(0.0,),
                                   stage_steps=(sum(cfg.stage_steps),), schedule="pyramid")
    raise ValueError(f"unknown baseline {kind!r}; choose flowar or single-stage")


# --- 2. the multistage flow (pure functions, numpy twins in runtime/stage_pipeline.py) ------


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x if factor == 1 else F.avg_pool2d(x, factor)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2."""
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def block_mean(z: torch.Tensor) -> torch.Tensor:
    """P_par z: every 2x2 block replaced by its mean."""
    return upsample(F.avg_pool2d(z, 2))


def block_noise(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """beta * m with m ~ N(0, Sigma_gamma), drawn from white z: covariance I - alpha^2 J per 2x2
    block. gamma = 1/3: z - blockmean(z), which sums to zero over every block."""
    mean = block_mean(z)
    c = math.sqrt(max(0.0, 1 - 3 * gamma) / (1 + gamma))
    return (z - mean) + c * mean if c > 0 else z - mean


def stage_maps(cfg: ECARConfig, x: torch.Tensor) -> list[torch.Tensor]:
    """down_s(x) for every stage."""
    S = cfg.num_stages
    return [downsample(x, 2 ** (S - 1 - s)) for s in range(S)]


def noise_chain(cfg: ECARConfig, z: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The stage noises eps_s from white draws z_s: pyramid: eps_0 = z_0,
    eps_s = alpha up(eps_{s-1}) + block_noise(z_s) (each white); flowar: eps_s = z_s."""
    if cfg.schedule == "flowar":
        return list(z)
    eps = [z[0]]
    for s in range(1, cfg.num_stages):
        eps.append(cfg.alpha * upsample(eps[-1]) + block_noise(z[s], cfg.gamma))
    return eps


def renoise(cfg: ECARConfig, s: int, end_prev: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Start state of stage s from the end state of stage s-1 (sampling time)."""
    if cfg.schedule == "flowar":
        return z  # FlowAR: each stage starts again from pure noise
    data_scale, noise_scale = cfg.renoise_coefficients(s)
    return data_scale * upsample(end_prev) + noise_scale * block_noise(z, cfg.gamma)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, n*p, n*p) -> (N, n*n, p*p*C), tokens row-major, each token (py, px, c)."""
    N, C, H, W = x.shape
    n = H // p
    return x.reshape(N, C, n, p, n, p).permute(0, 2, 4, 3, 5, 1).reshape(N, n * n, p * p * C)


def unpatchify(t: torch.Tensor, p: int, C: int) -> torch.Tensor:
    N, L, _ = t.shape
    n = int(round(math.sqrt(L)))
    return t.reshape(N, n, n, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, n * p, n * p)


# --- 3. networks -------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: bool, True = attend
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """DiT block: adaLN-Zero from a condition c, (B, 1, D) per sample or (B, L, D) per token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, mask=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), mask)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class ResBlock(nn.Module):
    """MAR's head block: a per-token MLP with adaLN from a per-token condition."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ada = nn.Linear(dim, 3 * dim)

    def forward(self, x, c, mask=None):
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> MLP (DiT's embedder)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = (1000.0 * t.float())[:, None] * self.freqs[None]
        return self.fc2(F.silu(self.fc1(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))))


def block_causal_mask(cfg: ECARConfig) -> torch.Tensor:
    """(L, L) bool, True = may attend: a token sees its own stage and all coarser ones."""
    stage_of = torch.cat([torch.full((cfg.tokens(s),), s) for s in range(cfg.num_stages)])
    return stage_of[:, None] >= stage_of[None, :]


class ARTransformer(nn.Module):
    """Block-causal transformer over the concatenated token maps of all stages.

    Inputs of stage 0 are start tokens (a learned vector plus the class embedding, one per
    position); inputs of stage s >= 1 are the tokens of up(E_{s-1}), the previous stage's end map
    upsampled to stage s. Every token gets a learned position embedding and its stage's
    embedding; every block is adaLN-conditioned on the class. The output at stage s's tokens
    (`z`) conditions the flow head of stage s.
    """

    def __init__(self, cfg: ECARConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.class_emb = nn.Embedding(cfg.num_classes + 1, D)
        self.start = nn.Parameter(torch.zeros(1, 1, D))
        self.token_in = nn.Linear(cfg.token_dim, D)
        self.pos = nn.Parameter(torch.randn(1, cfg.seq_len, D) * 0.02)
        self.stage_emb = nn.Parameter(torch.randn(cfg.num_stages, D) * 0.02)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(D, 2 * D)
        stage_of = torch.cat([torch.full((cfg.tokens(s),), s) for s in range(cfg.num_stages)])
        self.register_buffer("stage_of", stage_of, persistent=False)
        self.register_buffer("mask", block_causal_mask(cfg), persistent=False)

    def forward(self, prefix_tokens: torch.Tensor | None, class_labels: torch.Tensor,
                upto: int | None = None) -> torch.Tensor:
        """`prefix_tokens`: (B, L', token_dim), the input tokens of stages 1..upto (None for
        upto = 0). Returns z of stage `upto` only, (B, tokens(upto), width); with upto=None the
        input holds stages 1..S-1 and z of every token comes back (training, teacher forcing)."""
        cfg = self.cfg
        last = cfg.num_stages - 1 if upto is None else upto
        L = cfg.offset(last + 1)
        c = self.class_emb(class_labels)[:, None]  # (B, 1, D)
        B = c.shape[0]
        x = (self.start + c).expand(B, cfg.tokens(0), c.shape[-1])
        if last > 0:
            x = torch.cat([x, self.token_in(prefix_tokens)], dim=1)
        x = x + self.pos[:, :L] + self.stage_emb[self.stage_of[:L]][None]
        mask = self.mask[:L, :L]
        for block in self.blocks:
            x = block(x, c, mask)
        if upto is not None:
            x = x[:, cfg.offset(upto):]
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        return modulate(self.norm_out(x), shift, scale)


class FlowHead(nn.Module):
    """Velocity of one stage's tokens at time t, given the AR output z of those tokens.

    "transformer": the tokens (x_t projected, plus z projected) attend to each other within the
    stage; blocks are adaLN-conditioned on t. "mlp": every token on its own (MAR's head):
    residual MLP blocks adaLN-conditioned per token on t + z.
    """

    def __init__(self, cfg: ECARConfig):
        super().__init__()
        self.cfg = cfg
        Dh = cfg.head_width
        self.x_in = nn.Linear(cfg.token_dim, Dh)
        self.z_in = nn.Linear(cfg.width, Dh)
        self.t_emb = TimestepEmbedder(Dh)
        if cfg.head_type == "transformer":
            self.blocks = nn.ModuleList(Block(Dh, cfg.head_heads, cfg.head_mlp_ratio)
                                        for _ in range(cfg.head_depth))
        else:
            self.blocks = nn.ModuleList(ResBlock(Dh, cfg.head_mlp_ratio) for _ in range(cfg.head_depth))
        self.norm_out = nn.LayerNorm(Dh, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(Dh, 2 * Dh)
        self.out = nn.Linear(Dh, cfg.token_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_t: (B, N, token_dim), t: (B,), z: (B, N, width) -> velocity (B, N, token_dim)."""
        c = self.t_emb(t)[:, None]
        if self.cfg.head_type == "transformer":
            h = self.x_in(x_t) + self.z_in(z)
        else:
            h = self.x_in(x_t)
            c = c + self.z_in(z)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        return self.out(modulate(self.norm_out(h), shift, scale))


# --- 4. the model, its loss and its sampler ------------------------------------------------


class ECAR(nn.Module):
    def __init__(self, cfg: ECARConfig):
        super().__init__()
        self.cfg = cfg
        self.spec = None  # the ModelSpec it was loaded as (load_ecar); calibration reads it
        self.ar = ARTransformer(cfg)
        self.head = FlowHead(cfg)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.ar.class_emb.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the head predicts zero.
        for m in self.modules():
            if isinstance(m, (Block, ResBlock)):
                nn.init.zeros_(m.ada.weight)
                nn.init.zeros_(m.ada.bias)
        for ada in (self.ar.ada_out, self.head.ada_out, self.head.out):
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    def ar_inputs(self, ends: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """AR input tokens of stages 1..len(ends) from the end maps of stages 0..len(ends)-1."""
        if not ends:
            return None
        return torch.cat([patchify(upsample(e), self.cfg.patch_size) for e in ends], dim=1)

    def loss(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of every stage at once (teacher forcing): one AR pass over all
        stages, one head pass per stage at a random time on its slice; per-stage MSE averaged
        over stages. `labels` may hold the null class (CFG dropout is the caller's)."""
        cfg, B, p = self.cfg, x.shape[0], self.cfg.patch_size
        data = stage_maps(cfg, x)
        z = [torch.randn(d.shape, generator=generator, device=d.device) for d in data]
        eps = noise_chain(cfg, z)
        ranges = cfg.stage_ranges()
        ends = [e_t * d + (1 - e_t) * n for (_, e_t), d, n in zip(ranges, data, eps)]
        zs = self.ar(self.ar_inputs(ends[:-1]), labels)
        total = x.new_zeros(())
        for s, (t0, t1) in enumerate(ranges):
            coarse = upsample(data[s - 1]) if s > 0 else torch.zeros_like(data[0])
            start = t0 * coarse + (1 - t0) * eps[s]
            lam = torch.rand(B, generator=generator, device=x.device)
            xt = start + lam.view(-1, 1, 1, 1) * (ends[s] - start)
            target = (ends[s] - start) / (t1 - t0)
            t = t0 + lam * (t1 - t0)
            pred = self.head(patchify(xt, p), t, zs[:, cfg.offset(s):cfg.offset(s + 1)])
            total = total + F.mse_loss(pred, patchify(target, p))
        return total / cfg.num_stages


def stage_noise(cfg: ECARConfig, seed: int, n: int) -> list[np.ndarray]:
    """The white draws z_s of n images: image i from default_rng(seed + i), stage by stage
    (the runtime's convention; see runtime/stage_pipeline.py)."""
    from ..runtime.stage_pipeline import stage_noise as _noise

    return _noise([(cfg.in_channels, cfg.pixels(s), cfg.pixels(s)) for s in range(cfg.num_stages)],
                  seed, n)


@torch.no_grad()
def sample(model: ECAR, class_labels: Sequence[int] | torch.Tensor, noise: Sequence[np.ndarray],
           cfg_scale: float | None = None, stage_steps: Sequence[int] | None = None,
           on_stage=None) -> torch.Tensor:
    """Generate from the per-stage white draws `noise` (list over stages of (N, C, h_s, h_s),
    see `stage_noise`): stage 0 starts from noise[0]; each later stage renoises the upsampled
    end of the previous one with noise[s] (flowar: starts from noise[s]). AR once per stage,
    head `stage_steps[s]` Euler steps per stage, CFG as a batch of two (conditional rows first)
    on the head's velocity. Returns (N, C, H, W) in [-1, 1] scale. `on_stage(s)` is called as
    stage s starts, before its AR pass (calibration and the quantization simulation key their
    per-stage state on it: stages are ECAR's timesteps)."""
    cfg = model.cfg
    g = cfg.cfg_scale if cfg_scale is None else cfg_scale
    steps = cfg.stage_steps if stage_steps is None else tuple(stage_steps)
    p, C = cfg.patch_size, cfg.in_channels
    labels = torch.as_tensor(np.asarray(class_labels), dtype=torch.long)
    n = len(labels)
    guided = g != 1.0
    both = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if guided else labels
    ends: list[torch.Tensor] = []
    x = None
    for s, (t0, t1) in enumerate(cfg.stage_ranges()):
        if on_stage is not None:
            on_stage(s)
        zs = torch.from_numpy(np.asarray(noise[s], np.float32))
        x = zs if s == 0 else renoise(cfg, s, ends[-1], zs)
        prefix = model.ar_inputs(ends)
        if guided and prefix is not None:
            prefix = torch.cat([prefix, prefix])
        z = model.ar(prefix, both, upto=s)
        tok = patchify(x, p)
        dt = (t1 - t0) / steps[s]
        for j in range(steps[s]):
            t = torch.full((len(both),), t0 + j * dt)
            v = model.head(torch.cat([tok, tok]) if guided else tok, t, z)
            if guided:
                v = v[n:] + g * (v[:n] - v[n:])
            tok = tok + dt * v
        ends.append(unpatchify(tok, p, C))
    return ends[-1]


# --- weights and quantization hooks --------------------------------------------------------


def quantizable_modules(model: ECAR) -> dict[str, list[str]]:
    """Module paths of every nn.Linear, by exported component ("ar", "head")."""
    out: dict[str, list[str]] = {"ar": [], "head": []}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name.split(".")[0]].append(name)
    return out


# Layers a plan keeps in floating point unless it names them: embedders, condition
# projections, the adaLN modulation of every block (per-sample conditioning, as DiT's, which
# cost dit-ref 3.2 dB at W8A8) and the output layers (as ModelOpt and the DiT recipes do).
DEFAULT_FP = (r"ar\.token_in", r"ar\.ada_out", r"head\.x_in", r"head\.z_in", r"head\.t_emb\..*",
              r"(ar|head)\.blocks\.\d+\.ada", r"head\.ada_out", r"head\.out")


# Fields that only affect sampling: a checkpoint serves any value of them.
SAMPLING_FIELDS = ("stage_steps", "cfg_scale")


def config_of(spec) -> ECARConfig:
    """The ECARConfig of a ModelSpec of family "ecar" (its `transformer` dict)."""
    return ECARConfig.from_dict(spec.transformer)


def save_checkpoint(model: ECAR, path: str | Path, metadata: dict[str, str]) -> None:
    """Atomic: written to a temporary name, then renamed. The config travels in the metadata."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    meta = {**{k: str(v) for k, v in metadata.items()}, "ecar_config": json.dumps(model.cfg.to_dict())}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, cfg: ECARConfig | None = None) -> ECAR:
    """Weights (safetensors) into an ECAR; the config comes from the file's metadata and must
    equal `cfg` when one is given (except the sampling-only fields, taken from `cfg`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ECAR weights {path} are missing; train them with samples/train_ecar.py")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    stored = ECARConfig.from_dict(json.loads(meta["ecar_config"])) if "ecar_config" in meta else None
    if cfg is not None and stored is not None:
        a, b = cfg.to_dict(), stored.to_dict()
        diff = [k for k in a if a[k] != b[k] and k not in SAMPLING_FIELDS]
        if diff:
            raise ValueError(f"{path}: trained with another ECAR config (differs in {', '.join(diff)})")
    model = ECAR(cfg or stored)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_ecar(name: str, seed: int = 0) -> ECAR:
    """A named ECAR spec: its shipped weights (models/weights/), or seeded random weights for a
    spec without weights."""
    from .configs import get_spec
    from .denoiser import WEIGHTS_DIR

    spec = get_spec(name)
    if spec.family != "ecar":
        raise ValueError(f"{name} is a {spec.family} model, not ecar")
    cfg = config_of(spec)
    if spec.weights is None:
        torch.manual_seed(seed)
        model = ECAR(cfg).eval()
    else:
        model = load_checkpoint(WEIGHTS_DIR / spec.weights, cfg)
    model.spec = spec
    return model
