"""`effgen-export MODEL --out DIR`: export a model to a bundle."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cli import fail_cleanly


def build_parser() -> argparse.ArgumentParser:
    from ..models.configs import ALIASES, MODELS

    names = ", ".join(sorted(MODELS))
    p = argparse.ArgumentParser(
        prog="effgen-export",
        description="Export a model to an effgen bundle: ONNX graphs (opset 21, fixed shapes) "
        "checked against PyTorch in ONNX Runtime, and a manifest with the sha256 of every file. "
        f"`pixart`, `dit` and `ecar` are the shipped reference models ({ALIASES['pixart']}, "
        f"{ALIASES['dit']}, {ALIASES['ecar']}); an ECAR bundle has components `ar` and `head`, "
        f"one graph per stage each. Known models: {names}.")
    p.add_argument("model", help="model name, e.g. pixart, dit, ecar, pixart-alpha-512, dit-xl-2-256")
    p.add_argument("--out", type=Path, default=None, help="bundle directory (default build/MODEL)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="local diffusers folder with transformer/ (and optionally vae/, "
                   "scheduler/); without it the real architectures get random weights")
    p.add_argument("--resolution", type=int, default=None, help="image resolution in pixels")
    p.add_argument("--batch", type=int, default=2,
                   help="fixed batch of the denoiser graph (2 = one image with guidance)")
    q = p.add_argument_group(
        "quantization", "With --plan or --scales the denoiser is exported quantized: one QDQ "
        "graph per timestep group (on ort-cpu one graph that picks each group's scales by its "
        "timestep), all sharing one weight file; the manifest records per layer the precision "
        "the target really runs and the sha256 of plan and scales. An ECAR model's two "
        "components are quantized by one plan, each stage graph with its stage group's scales.")
    q.add_argument("--plan", type=Path, default=None,
                   help="plan JSON (effgen.plan/1): calibrated now (cached statistics are reused)")
    q.add_argument("--scales", type=Path, default=None,
                   help="calibration directory from `effgen calib` (plan.json + scales.safetensors): "
                   "no calibration")
    q.add_argument("--target", choices=["trt", "trt-orin", "ort-cpu"], default=None,
                   help="what the graphs are lowered for (default: the plan's target)")
    q.add_argument("--n-calib", type=int, default=32, help="calibration prompts/labels (with --plan)")
    q.add_argument("--prompts", type=Path, default=None,
                   help="calibration prompts (with --plan): a text file, one caption or class label "
                   "per line, or a text states file from `effgen encode-prompts` (.safetensors), "
                   "which a PixArt checkpoint needs (effgen does not run T5); default: held-out "
                   "reference prompts")
    q.add_argument("--calib-device", default=None, metavar="DEVICE",
                   help="torch device of the calibration sampler passes (statistics, GPTQ "
                   "Hessians): cuda for a real-size model; the rest runs on the CPU")
    q.add_argument("--calib-steps", type=int, default=None,
                   help="sampler steps of the calibration runs (default: the model's)")
    return p


@fail_cleanly
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .export import export_bundle

    if args.batch < 1:
        raise ValueError("--batch must be at least 1")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {args.checkpoint} does not exist")
    out = args.out or Path("build") / args.model
    quantize = None
    if args.plan is not None or args.scales is not None:
        quantize = {"plan": args.plan, "scales_dir": args.scales, "target": args.target,
                    "n_calib": args.n_calib, "calib_steps": args.calib_steps,
                    "prompts": args.prompts, "device": args.calib_device}
    elif args.target is not None:
        raise ValueError("--target needs --plan or --scales (a quantized export)")
    t0 = time.perf_counter()
    export_bundle(args.model, out, checkpoint=args.checkpoint, resolution=args.resolution,
                  batch=args.batch, quantize=quantize)
    print(f"bundle written to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
