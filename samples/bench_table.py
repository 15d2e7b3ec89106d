"""Cost and fidelity of effgen's ort-cpu bundles against FP32 and ONNX Runtime's own
quantizers, on ONNX Runtime's CPU provider, measured in one run.

    .venv/bin/pip install -e '.[bench]'   # onnx-ir, for ONNX Runtime's 4-bit quantizer
    .venv/bin/python samples/bench_table.py --json out/bench.json [--real-arch] [--threads 2]

Models: pixart-ref and dit-ref (the shipped reference weights, whatever checkpoint exists),
and with --real-arch the real `pixart-alpha-512` architecture (611M parameters, random
weights, one sampler step, no VAE; ~2.4 GB of FP32 ONNX, needs ~6 GB of memory and minutes).

Methods (every bundle from the same FP graph, `effgen-export`):
  fp32                  the FP export
  w8a8                  samples/plans/w8a8.json lowered for ort-cpu (2 timestep groups, one graph;
                        its W8 weights rounded by GPTQ, as the plan says)
  w4a8-mp               samples/plans/mp_w4a8_rules.json for ort-cpu (W4 block 64 as
                        DQ(int4)->MatMulNBits; self-attention v/out and PixArt's adaln_single W8A8)
  ort-dynamic-int8      onnxruntime.quantization.quantize_dynamic on the FP graph (S8 weights,
                        per tensor, MatMul/Gemm with constant weights: MatMulConstBOnly)
  ort-matmulnbits-4bit  onnxruntime's MatMulNBitsQuantizer (4-bit, block 32, symmetric,
                        accuracy_level 4) on the FP graph
  fp32-fused-attention  the fp32 graph with effgen's ort-cpu attention fusion only
                        (exporter/ort_attention.py, which every ort-cpu lowering runs): how
                        much of a quantized bundle's speed-up is the fused attention
  w8a8-variants-1/-4    the w8a8 plan with 1 and 4 timestep groups (variant memory check; an
                        ort-cpu bundle is one graph for all groups, so K only adds scales)

The bundles are timed together, interleaved (effgen.runtime.bench.bench_interleaved, what
`effgen bench A B ...` runs): each in its own process (peak memory per bundle), one process
running at a time, a warm-up call each, then `--repeat` rounds of one denoiser call per bundle
(medians reported; `step_ms_rounds` in the JSON: every round's time), then a warm-up image and
`--images` rounds of one image each, so load on a shared machine falls on every method alike. weight_bytes: the denoiser's graphs +
weight file. Quality against the FP32 bundle from the same noise: psnr of the final images
(`effgen eval`, reference models) and sqnr_db of one denoiser call (mean over timesteps 100,
500, 900).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "samples" / "plans"
REF_MODELS = ("pixart-ref", "dit-ref")
REAL_ARCH = "pixart-alpha-512"
METHODS = ("fp32", "w8a8", "w4a8-mp", "ort-dynamic-int8", "ort-matmulnbits-4bit",
           "fp32-fused-attention", "w8a8-variants-1", "w8a8-variants-4")
DERIVED = ("ort-dynamic-int8", "ort-matmulnbits-4bit", "fp32-fused-attention")  # from the FP graph
PLAN_OF = {"w8a8": ("w8a8.json", None), "w4a8-mp": ("mp_w4a8_rules.json", None),
           "w8a8-variants-1": ("w8a8.json", 1), "w8a8-variants-4": ("w8a8.json", 4)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- bundles -----------------------------------------------------------------------------


def export_method(model: str, method: str, root: Path, fp_bundle: Path | None, args) -> Path:
    from effgen.exporter.export import export_bundle

    out = root / model / method
    if out.is_dir() and (out / "manifest.json").is_file() and not args.rebuild:
        return out
    t0 = time.perf_counter()
    quiet = (lambda _m: None) if not args.verbose else log
    if method == "fp32":
        export_bundle(model, out, log=quiet)
    elif method in PLAN_OF:
        plan_file, groups = PLAN_OF[method]
        raw = json.loads((PLANS / plan_file).read_text())
        if groups is not None:
            raw["techniques"] = {**raw.get("techniques", {}), "timestep_grouping": {"k": groups}}
            raw.pop("timestep_groups", None)
        plan_path = root / model / f"{method}.plan.json"
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(raw, indent=2))
        export_bundle(model, out, log=quiet,
                      quantize={"plan": plan_path, "target": "ort-cpu", "n_calib": args.n_calib,
                                "calib_steps": args.calib_steps, "fp_bundle": fp_bundle})
    elif method in DERIVED:
        derived_bundle(fp_bundle, out, method)
    else:
        raise ValueError(f"unknown method {method}")
    log(f"  {model}/{method}: bundle in {time.perf_counter() - t0:.1f}s")
    return out


def derived_bundle(fp_bundle: Path, out: Path, method: str) -> None:
    """The FP bundle with its denoiser replaced by ONNX Runtime's own quantization of it, or
    by the FP graph with fused attention."""
    import onnx

    from effgen.exporter.onnx_export import save_with_external_data
    from effgen.runtime.bundle import MANIFEST, sha256_file, write_json_atomic

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp_bundle, tmp)
    src = fp_bundle / "denoiser.onnx"
    qpath = tmp / "denoiser.quant.onnx"
    if method == "ort-dynamic-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, qpath, op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        model = onnx.load(str(qpath))
    elif method == "fp32-fused-attention":
        from effgen.exporter.ort_attention import with_fused_attention

        model, _ = with_fused_attention(onnx.load(str(src)))
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        model = q.model.model
    for f in tmp.glob("denoiser*"):
        f.unlink()
    save_with_external_data(model, tmp / "denoiser.onnx", "denoiser.weights")
    manifest = json.loads((tmp / MANIFEST).read_text())
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())
                         if p.is_file() and p.name != MANIFEST}
    manifest["components"]["denoiser"]["derived_by"] = method
    write_json_atomic(tmp / MANIFEST, manifest)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# --- bytes, and quality against FP32 -------------------------------------------------------


def denoiser_bytes(bundle: Path) -> int:
    m = json.loads((bundle / "manifest.json").read_text())
    comp = m["components"]["denoiser"]
    files = {v["onnx"] for v in comp["variants"]} | {comp["external_data"]}
    return sum((bundle / f).stat().st_size for f in files)


def call_sqnr(bundle: Path, fp_bundle: Path, threads: int) -> float:
    """Mean SQNR (dB) of one denoiser call against the FP bundle's, same feeds, t in
    (100, 500, 900)."""
    from effgen.runtime import load_pipeline
    from effgen.runtime.bench import _example_conditioning
    from effgen.runtime.pipeline import initial_noise

    pipes = [load_pipeline(b, threads=threads) for b in (bundle, fp_bundle)]
    m = pipes[1].model
    cond = pipes[1].conditioning(1, **_example_conditioning(pipes[1], 1))
    b = pipes[1].denoiser.batch
    pair = {k: np.concatenate([v, cond.uncond[k]]) for k, v in cond.cond.items()}
    feeds = {k: np.concatenate([v] * b)[:b] for k, v in pair.items()}
    feeds["sample"] = np.repeat(initial_noise((m["in_channels"], m["sample_size"], m["sample_size"]),
                                              3, 1), b, 0)
    out = []
    for t in (100.0, 500.0, 900.0):
        feeds["timestep"] = np.full(b, t, np.float32)
        q, ref = (p.denoiser.run(feeds, t)["model_output"].astype(np.float64) for p in pipes)
        out.append(10 * np.log10((ref ** 2).mean() / max(((ref - q) ** 2).mean(), 1e-30)))
    return float(np.mean(out))


def image_psnr(bundle: Path, fp_bundle: Path, n_images: int, threads: int) -> float | None:
    from effgen.metrics import evaluate_bundle

    r = evaluate_bundle(bundle, reference=fp_bundle, n_images=n_images, threads=threads, progress=False)
    return None if r.get("psnr") is None else float(r["psnr"])


# --- the table ---------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    head = ["model", "method", "step_ms", "x fp32", "image_ms", "weight_bytes", "x fp32",
            "peak_mb", "psnr", "sqnr_db"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = {r["model"]: r for r in rows if r["method"] == "fp32"}

    def f(v, fmt):
        return "-" if v is None else (v if isinstance(v, str) else format(v, fmt))

    for r in rows:
        base = fp.get(r["model"])
        rs = r["step_ms"] / base["step_ms"] if base and r.get("step_ms") else None
        rw = r["weight_bytes"] / base["weight_bytes"] if base and r.get("weight_bytes") else None
        lines.append("| " + " | ".join([
            r["model"], r["method"], f(r.get("step_ms"), ".2f"), f(rs, ".2f"), f(r.get("image_ms"), ".0f"),
            f(r.get("weight_bytes"), ",d"), f(rw, ".3f"), f(r.get("peak_mb"), ".0f"),
            f(r.get("psnr"), ".2f"), f(r.get("sqnr_db"), ".1f")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench", help="bundle directory")
    p.add_argument("--models", nargs="+", default=list(REF_MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--real-arch", action="store_true",
                   help=f"also {REAL_ARCH} (random weights, one step; ~6 GB RAM, minutes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20, help="denoiser calls timed per bundle")
    p.add_argument("--images", type=int, default=2, help="whole images timed per bundle")
    p.add_argument("--n-images", type=int, default=16, help="images for PSNR (reference models)")
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--calib-steps", type=int, default=None)
    p.add_argument("--rebuild", action="store_true", help="re-export bundles that exist")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    import torch

    from effgen.runtime.bench import bench_interleaved

    torch.set_num_threads(max(1, args.threads))
    models = list(args.models) + ([REAL_ARCH] if args.real_arch else [])
    rows = []

    def emit(row):
        rows.append(row)
        log(f"  {json.dumps(row)}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    for model in models:
        real = model == REAL_ARCH
        steps = 1 if real else None
        # real arch: 2 calibration prompts, 4 sampler steps (enough for 4 timestep groups)
        export_args = args if not real else argparse.Namespace(
            **{**vars(args), "n_calib": min(args.n_calib, 2), "calib_steps": args.calib_steps or 4})
        bundles: dict[str, Path] = {}
        fp_bundle = None
        for method in ["fp32"] + [m for m in args.methods if m != "fp32"]:  # fp32: the reference
            try:
                bundles[method] = export_method(model, method, args.out, fp_bundle, export_args)
                if method == "fp32":
                    fp_bundle = bundles[method]
            except Exception as e:  # one failing method must not lose the others' numbers
                emit({"model": model, "method": method, "error": f"{type(e).__name__}: {e}"})
                if method == "fp32":
                    break
        if fp_bundle is None:
            continue
        log(f"  {model}: timing {', '.join(bundles)} interleaved")
        timed = bench_interleaved(list(bundles.values()), steps=steps, images=args.images,
                                  repeat=min(args.repeat, 5) if real else args.repeat, threads=args.threads)
        for (method, bundle), r in zip(bundles.items(), timed):
            try:
                if "error" in r:
                    raise RuntimeError(r["error"])
                row = {"model": model, "method": method, "step_ms": r["step_ms"], "image_ms": r["image_ms"],
                       "weight_bytes": denoiser_bytes(bundle), "bundle_bytes": r["weight_bytes"],
                       "peak_mb": r["peak_mb"], "threads": args.threads, "steps": r["steps"],
                       "step_ms_rounds": r["step_ms_rounds"]}
                row["sqnr_db"] = None if method == "fp32" else round(call_sqnr(bundle, fp_bundle, args.threads), 2)
                row["psnr"] = None
                if not real and method != "fp32":
                    row["psnr"] = image_psnr(bundle, fp_bundle, args.n_images, args.threads)
                man = json.loads((bundle / "manifest.json").read_text())
                q = man["components"]["denoiser"].get("quantization")
                if q:
                    row["variants"] = len(man["components"]["denoiser"]["variants"])
                    row["sqnr_vs_simulation_db"] = [
                        x for v in man["components"]["denoiser"]["variants"]
                        for x in v.get("sqnr_vs_simulation_db_by_group", [v["sqnr_vs_simulation_db"]])]
            except Exception as e:
                row = {"model": model, "method": method, "error": f"{type(e).__name__}: {e}"}
                log(f"  {model}/{method}: FAILED {row['error']}")
            emit(row)
    print(markdown([r for r in rows if "error" not in r]))
    for r in rows:
        if "error" in r:
            print(f"{r['model']}/{r['method']}: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
