"""ECAR against DiT on the reference data, in one run on ONNX Runtime CPU: FLOPs per image,
latency per image, Fréchet distance and class accuracy (effgen.metrics), each model at its
default sampling settings.

    python samples/ecar_vs_dit.py --json build/ecar_vs_dit.json

Methods: `ecar` (ecar-ref: multistage flow, 4 stages 1-2-4-8 tokens per side, 4 head steps per
stage), `dit` (dit-ref: 20 DPM-Solver++ steps), and the ECAR baselines `ecar-flowar` (every
stage denoised fully from noise) and `ecar-single-stage` (plain flow matching at full
resolution) — a baseline whose weights are missing is left out with a note — and
`ecar-w8a8`: ecar-ref quantized by samples/plans/w8a8.json for ONNX Runtime CPU (both
components, 2 stage groups; calibration statistics cached), scored against the FP ECAR's
images too (`psnr`, `ssim`). All use classifier-free guidance (batch of two per call).
weight_bytes: the bundle's weight files.

- gflops_per_image: models/flops.py (analytic, multiply-add = 2 FLOPs, CFG included).
- image_ms: median wall time of generating one image (all stages/steps, CFG), the methods
  interleaved image by image so that machine load affects them alike.
- fd, class_acc: `effgen.metrics.evaluate_bundle` on `--n-images` images of the fixed
  evaluation set (refdata.eval_prompts), against the same real pictures for every method.

Bars (the ECAR paper's claim, scaled to the reference models): ECAR >= 5x fewer FLOPs and
>= 3x lower latency per image than DiT, with fd within 10% of DiT's. The verdict is printed
as measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

PLANS = Path(__file__).resolve().parent / "plans"
# method -> (model, plan of a quantized export on ONNX Runtime CPU, or None for FP)
METHODS = {"ecar": ("ecar-ref", None), "dit": ("dit-ref", None),
           "ecar-flowar": ("ecar-flowar-ref", None),
           "ecar-single-stage": ("ecar-single-stage-ref", None),
           "ecar-w8a8": ("ecar-ref", PLANS / "w8a8.json")}
QUANT_TARGET = "ort-cpu"


def weights_metadata(spec) -> dict:
    from safetensors import safe_open

    from effgen.models.denoiser import WEIGHTS_DIR

    path = WEIGHTS_DIR / spec.weights
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def export(method: str, build: Path, reuse: bool) -> Path:
    from effgen.exporter.export import export_bundle
    from effgen.runtime.bundle import Bundle

    model, plan = METHODS[method]
    out = build / method
    if reuse and (out / "manifest.json").is_file():
        try:
            Bundle.load(out)
            return out
        except Exception:  # stale or broken: export again
            pass
    quantize = None if plan is None else {"plan": plan, "target": QUANT_TARGET}
    export_bundle(model, out, log=lambda m: print(m, file=sys.stderr), quantize=quantize)
    return out


def weight_bytes(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.glob("*.weights"))


def latency(pipes: dict, n: int, threads: int) -> dict[str, float]:
    from effgen.models import refdata

    labels = [a.class_id for a in refdata.eval_prompts(n + 1, seed=99)]
    for name, pipe in pipes.items():  # warm-up
        pipe.generate(num_images=1, seed=0, class_label=[labels[0]])
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for i in range(n):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.generate(num_images=1, seed=i, class_label=[labels[i + 1]])
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def markdown(rows: list[dict]) -> str:
    head = "| method | model | GFLOPs/image | ms/image | fd | class acc | train steps |"
    head = head[:-1] + " weight MB | PSNR vs FP |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        db = "-" if r.get("psnr") is None else f"{r['psnr']:.1f}"
        lines.append(f"| {r['method']} | {r['model']} | {r['gflops_per_image']:.3f} | "
                     f"{r['image_ms']:.1f} | {r['fd']:.2f} | {r['class_acc']:.3f} | "
                     f"{r.get('train_steps', '?')} | {r['weight_bytes'] / 1e6:.2f} | {db} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows}
    if "ecar" not in by or "dit" not in by:
        return []
    e, d = by["ecar"], by["dit"]
    fl, lat, fd = (d["gflops_per_image"] / e["gflops_per_image"], d["image_ms"] / e["image_ms"],
                   e["fd"] / d["fd"])
    ok = lambda b: "holds" if b else "DOES NOT HOLD"  # noqa: E731
    out = [f"FLOPs: ECAR {fl:.2f}x fewer than DiT (bar >= 5x): {ok(fl >= 5)}",
           f"latency: ECAR {lat:.2f}x lower than DiT (bar >= 3x): {ok(lat >= 3)}",
           f"fd: ECAR {e['fd']:.2f} vs DiT {d['fd']:.2f} = {fd:.2f}x (bar <= 1.10x): {ok(fd <= 1.10)}"]
    if "ecar-w8a8" in by:
        q = by["ecar-w8a8"]
        out.append(f"ECAR W8A8 ({QUANT_TARGET}) vs FP ECAR: latency {q['image_ms'] / e['image_ms']:.2f}x, "
                   f"weight bytes {q['weight_bytes'] / e['weight_bytes']:.2f}x, PSNR {q['psnr']:.1f} dB, "
                   f"fd {q['fd']:.2f} vs {e['fd']:.2f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--n-images", type=int, default=256, help="images per method for fd/class_acc")
    p.add_argument("--latency-images", type=int, default=10, help="images timed per method")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads (1: steadiest on a shared 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build", type=Path, default=Path("build/ecar_vs_dit"))
    p.add_argument("--reuse", action="store_true", help="reuse bundles already in --build")
    args = p.parse_args(argv)

    import torch

    from effgen import metrics
    from effgen.models import flops
    from effgen.models.configs import get_spec
    from effgen.runtime import load_pipeline

    torch.set_num_threads(args.threads)
    methods, notes, bundles = [], [], {}
    for method in args.methods:
        spec = get_spec(METHODS[method][0])
        if not weights_metadata(spec):
            notes.append(f"{method}: no trained weights ({spec.weights}); left out")
            continue
        bundles[method] = export(method, args.build, args.reuse)
        methods.append(method)
    pipes = {m: load_pipeline(bundles[m], threads=args.threads) for m in methods}
    print(f"timing {args.latency_images} images per method ...", file=sys.stderr)
    image_ms = latency(pipes, args.latency_images, args.threads)
    del pipes

    rows = []
    for method in methods:
        model, plan = METHODS[method]
        spec = get_spec(model)
        meta = weights_metadata(spec)
        f = flops.per_image(spec)
        # a quantized row is scored against its FP model's images too (same noise)
        reference = bundles.get("ecar") if plan is not None else None
        q = metrics.evaluate_bundle(bundles[method], reference=reference, n_images=args.n_images,
                                    seed=args.seed, threads=args.threads)
        rows.append({
            "model": spec.name, "method": method,
            "gflops_per_image": f["flops"] / 1e9,
            "gflops_per_image_no_cfg": flops.per_image(spec, guidance=False)["flops"] / 1e9,
            "gflops_components": {k: v / 1e9 for k, v in f["components"].items()},
            "image_ms": image_ms[method], "fd": q["fd"], "class_acc": q["class_acc"],
            "psnr": q["psnr"], "ssim": q["ssim"], "weight_bytes": weight_bytes(bundles[method]),
            "plan": None if plan is None else plan.name,
            "steps": q["steps"], "guidance": q["guidance"], "n_images": q["n_images"],
            "train_steps": int(meta.get("steps", 0)), "train_minutes": meta.get("train_minutes"),
            "threads": args.threads,
        })
        print(f"{method}: {rows[-1]['gflops_per_image']:.3f} GFLOPs, {image_ms[method]:.1f} ms, "
              f"fd {q['fd']:.2f}, class acc {q['class_acc']:.3f}", file=sys.stderr)
    print(markdown(rows))
    for line in verdict(rows) + notes:
        print(line)
    print("\npaper scale, 256x256, analytic (GFLOPs per image with CFG):")
    for r in flops.paper_scale():
        print(f"  {r['model']}, {r['steps']} steps: {r['flops'] / 1e9:,.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(metrics.to_json(rows))  # a list of rows (strict JSON)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
