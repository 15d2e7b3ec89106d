"""What `techniques.bos_aware` does on pixart-ref: the PyTorch simulation of a plan with and
without the switch against FP, on the same noise and captions (one load of the weights, so
both sides see the same model while training rewrites the shipped file).

    OMP_NUM_THREADS=1 .venv/bin/python samples/measure_bos_aware.py --n-calib 8 --images 8

Prints, per plan: the denoiser output SQNR against FP at three timesteps (one call, batch of
the evaluation captions) and the PSNR of the sampled images against the FP images.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

PLANS = Path(__file__).resolve().parent / "plans"
TIMESTEPS = (900.0, 500.0, 100.0)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def plans() -> dict[str, dict]:
    w8a8 = json.loads((PLANS / "w8a8.json").read_text())
    caption = copy.deepcopy(w8a8)  # caption_projection quantized too: its input holds [CLS]
    caption["rules"] = [*w8a8.get("rules", []), {"match": r"caption_projection", "w_bits": 8, "a_bits": 8}]
    return {"w8a8": w8a8, "w8a8 + caption_projection": caption,
            "mp_w4a8": json.loads((PLANS / "mp_w4a8.json").read_text())}


def main(argv=None) -> int:
    from effgen.calib.calibrate import calibrate, generate_images, sample_items
    from effgen.calib.simulate import quantize_
    from effgen.calib.stats import collect_statistics, encode_conditions
    from effgen.metrics import psnr
    from effgen.models.denoiser import load_denoiser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--target", default="trt")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fp = load_denoiser("pixart-ref")
    stats = collect_statistics(fp, n_calib=args.n_calib, use_cache=False, progress=False)
    items, _ = sample_items(fp.spec, args.images)
    cond, _, mask, _ = encode_conditions(fp.spec, items)
    noise = torch.randn(len(items), 3, 32, 32, generator=torch.Generator().manual_seed(5))
    fp_images = generate_images(fp, items, seed=3, progress=False)
    print(f"pixart-ref, {args.target}, {args.n_calib} calibration captions x {fp.spec.steps} steps, "
          f"{len(items)} evaluation captions")
    print(f"{'plan':28s} {'bos_aware':9s} " + " ".join(f"SQNR t={int(t):<4d}" for t in TIMESTEPS)
          + "  image PSNR")
    for label, raw in plans().items():
        for bos in (False, True):
            raw = copy.deepcopy(raw)
            raw.setdefault("techniques", {})["bos_aware"] = bos
            plan, scales = calibrate(fp, raw, args.target, stats=stats)
            sim = copy.deepcopy(fp)
            ctx = quantize_(sim, plan, scales)
            values = []
            for t in TIMESTEPS:
                ctx.set_timestep(t)
                ts = torch.full((len(items),), t)
                with torch.no_grad():
                    values.append(sqnr_db(fp(noise, ts, cond, mask), sim(noise, ts, cond, mask)))
            images = generate_images(sim, items, seed=3, progress=False)
            print(f"{label:28s} {str(bos).lower():9s} " + " ".join(f"{v:11.2f}" for v in values)
                  + f"  {float(np.mean(psnr(fp_images, images))):10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
