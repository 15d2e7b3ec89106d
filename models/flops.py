"""Analytic FLOP counts of DiT and ECAR, per component, per forward and per generated image.

Convention: what is counted are the multiply-accumulates (MACs) of every matrix product —
Linear layers, the patch-embedding convolution, and the two attention products Q K^T and
A V (dense, masked entries included, as the exported graphs compute them). Normalisations,
activations, softmax, adaLN modulation and residual adds are not counted (they are O(tokens x
width), a fraction of a percent here). FLOPs = 2 x MACs.

DiT's paper reports 118.6 "Gflops" for DiT-XL/2 at 256x256: that number is MACs (fvcore's
convention, one fused multiply-add = one flop): `dit_forward(get_spec("dit-xl-2-256").transformer)`
gives 118.6 GMACs = 237.3 GFLOPs with the 2-FLOPs-per-MAC convention used here. Ratios are the
same under either convention.

Per image: DiT runs its transformer `steps` times; ECAR runs the AR once per stage and the head
`stage_steps[s]` times in stage s. With classifier-free guidance every call runs on two rows
(conditional and unconditional), so the cost per image doubles. Under a guidance interval the
steps outside it need the conditional row alone, but for one image the exported graph, of
fixed batch two, computes the second row anyway (the runtime pads it): counted as computed, as
attention's masked entries are, the cost is that of guidance on every step.

No torch: ECAR configs are read from their dict (`ECARConfig.to_dict()` or a spec's
`transformer`).
"""

from __future__ import annotations

from typing import Any

TIMESTEP_FREQ_DIM = 256  # sinusoidal features fed to the timestep MLP (DiT and ECAR)


def _attn_block_macs(tokens: int, width: int, mlp_hidden: int, kv_tokens: int | None = None) -> int:
    """Per-token projections (q, k, v, out), the MLP, and the two attention products of
    `tokens` queries against `kv_tokens` keys."""
    kv = tokens if kv_tokens is None else kv_tokens
    proj = tokens * 4 * width * width
    mlp = tokens * 2 * width * mlp_hidden
    attn = 2 * tokens * kv * width
    return proj + mlp + attn


# --- DiT (diffusers DiTTransformer2DModel) ------------------------------------------------


def dit_forward(transformer: dict[str, Any]) -> dict[str, int]:
    """MACs of one forward of one sample, by part, from the diffusers config dict.

    diffusers' DiT (norm_type ada_norm_zero) computes the timestep+label embedding inside every
    block's AdaLayerNormZero (and once more for the final layer), then a Linear(D, 6D) per
    block; we count it that way (the original DiT computes it once: 0.04% less for XL/2)."""
    D = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    p = transformer["patch_size"]
    side = transformer["sample_size"] // p
    L = side * side
    c_in = transformer["in_channels"]
    c_out = transformer.get("out_channels") or c_in
    layers = transformer["num_layers"]
    t_emb = TIMESTEP_FREQ_DIM * D + D * D
    parts = {
        "patch_embed": L * p * p * c_in * D,
        "conditioning": layers * (t_emb + 6 * D * D) + t_emb + 2 * D * D,
        "blocks": layers * _attn_block_macs(L, D, 4 * D),
        "final": L * D * p * p * c_out,
    }
    parts["total"] = sum(parts.values())
    return parts


def dit_per_image(transformer: dict[str, Any], steps: int, guidance: bool) -> dict[str, Any]:
    fwd = dit_forward(transformer)["total"]
    rows = 2 if guidance else 1
    macs = fwd * steps * rows
    return {"forward_macs": fwd, "calls": steps, "rows": rows, "macs": macs, "flops": 2 * macs,
            "components": {"denoiser": 2 * macs}}


# --- ECAR ----------------------------------------------------------------------------------


def _cfg(cfg) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def ecar_ar_stage(cfg, s: int, kv_cache: bool = False) -> int:
    """MACs of the AR at stage s for one sample. Full prefix (what is exported): all tokens of
    stages 0..s go through every block; with `kv_cache` only stage s's tokens do, attending to
    the cached keys of stages 0..s."""
    c = _cfg(cfg)
    D, depth = c["width"], c["depth"]
    hidden = int(D * c["mlp_ratio"])
    sizes = [n * n for n in c["stages"]]
    token_dim = c["patch_size"] ** 2 * c["in_channels"]
    L = sum(sizes[:s + 1])
    new = sizes[s] if kv_cache else L
    embed = (sizes[s] if kv_cache else L - sizes[0]) * token_dim * D if s > 0 else 0
    blocks = depth * (6 * D * D + _attn_block_macs(new, D, hidden, kv_tokens=L))
    final = 2 * D * D
    return embed + blocks + final


def ecar_head_step(cfg, s: int) -> int:
    """MACs of one head call (one Euler step) at stage s for one sample."""
    c = _cfg(cfg)
    Dh, D = c["head_width"], c["width"]
    hidden = int(Dh * c["head_mlp_ratio"])
    N = c["stages"][s] ** 2
    token_dim = c["patch_size"] ** 2 * c["in_channels"]
    macs = TIMESTEP_FREQ_DIM * Dh + Dh * Dh  # timestep embedding (per sample)
    macs += N * token_dim * Dh + N * D * Dh  # x_in, z_in
    if c["head_type"] == "transformer":
        macs += c["head_depth"] * (6 * Dh * Dh + _attn_block_macs(N, Dh, hidden))
        macs += 2 * Dh * Dh  # final adaLN (per sample)
    else:  # per-token adaLN: the condition t + z differs per token
        macs += c["head_depth"] * N * (3 * Dh * Dh + 2 * Dh * hidden)
        macs += N * 2 * Dh * Dh
    macs += N * Dh * token_dim  # out
    return macs


def ecar_per_image(cfg, guidance: bool, stage_steps=None, kv_cache: bool = False) -> dict[str, Any]:
    c = _cfg(cfg)
    steps = list(c["stage_steps"] if stage_steps is None else stage_steps)
    rows = 2 if guidance else 1
    stages = []
    for s in range(len(c["stages"])):
        ar = ecar_ar_stage(c, s, kv_cache)
        head = ecar_head_step(c, s)
        stages.append({"stage": s, "ar_macs": ar, "head_step_macs": head, "steps": steps[s],
                       "macs": rows * (ar + steps[s] * head)})
    ar_total = rows * sum(st["ar_macs"] for st in stages)
    head_total = rows * sum(st["head_step_macs"] * st["steps"] for st in stages)
    macs = ar_total + head_total
    return {"rows": rows, "stages": stages, "macs": macs, "flops": 2 * macs,
            "components": {"ar": 2 * ar_total, "head": 2 * head_total}}


# --- one entry point -------------------------------------------------------------------------


def per_image(spec, guidance: bool | None = None, steps=None) -> dict[str, Any]:
    """FLOPs per image of a ModelSpec at its default sampling settings (guidance on when the
    spec's guidance scale is not 1, unless `guidance` says otherwise)."""
    if spec.family == "dit":
        g = spec.guidance != 1.0 if guidance is None else guidance
        return dit_per_image(spec.transformer, steps or spec.steps, g)
    if spec.family == "ecar":
        g = spec.transformer["cfg_scale"] != 1.0 if guidance is None else guidance
        return ecar_per_image(spec.transformer, g, stage_steps=steps)
    raise ValueError(f"no FLOP counter for family {spec.family!r}")


def paper_scale() -> list[dict[str, Any]]:
    """The 256x256 comparison at paper scale: DiT-XL/2 (250 and 50 steps, CFG) and
    `ecar-xl-256`, an ECAR we assume for the comparison (the paper publishes no config we can
    check): DiT-XL/2's transformer (28 x 1152) as the AR over the f8 latent (32x32x4, patch 2,
    stages 1-2-4-8-16 tokens per side) and a MAR-style 3-block MLP head of width 1024, pyramid
    schedule, 5 head steps per stage."""
    from .configs import get_spec

    dit = get_spec("dit-xl-2-256")
    ecar = {"sample_size": 32, "in_channels": 4, "patch_size": 2, "stages": [1, 2, 4, 8, 16],
            "num_classes": 1000, "width": 1152, "depth": 28, "heads": 16, "mlp_ratio": 4.0,
            "head_type": "mlp", "head_width": 1024, "head_depth": 3, "head_heads": 16,
            "head_mlp_ratio": 1.0, "stage_steps": [5] * 5}
    rows = [{"model": "dit-xl-2-256", "steps": n, **dit_per_image(dit.transformer, n, True)}
            for n in (250, 50)]
    rows.append({"model": "ecar-xl-256 (assumed config)", "steps": 25,
                 **ecar_per_image(ecar, True)})
    return rows
