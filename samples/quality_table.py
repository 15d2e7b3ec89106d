"""Quality of quantization methods on the reference models, simulated for a target.

    .venv/bin/python samples/quality_table.py --json out/quality.json [--n-images 64]

For pixart-ref and dit-ref and each method (fp, naive-w8a8, vidit-w8a8, naive-w4a8,
vidit-w4a8, modelopt-int8 and the mixed-precision plans below), the PyTorch sampler
generates the evaluation set of `effgen eval` (refdata.eval_prompts(N): captions for
pixart, class ids for dit; image i from noise seed SEED+i as the runtime seeds it, the same
noise for every method) with the model quantized by
`effgen.calib` for the target's effective numerics (default trt: W4 Linear layers run
weight-only), and scores it with effgen.metrics.evaluate: PSNR and SSIM against the FP
images, Fréchet distance against real pictures, attribute/class accuracy. weight_bytes:
the weights as they ship on the target (calib.cost.weight_bytes; fp16 on TensorRT).

Methods:
  naive-*: per-output-channel weights, per-tensor min-max activations, one timestep group,
           no smoothing (the plan {"default": {w_bits, a_bits}} and nothing else)
  vidit-*: samples/plans/w8a8.json / w4a8.json: smoothing (alpha 0.8) on the transformer
           blocks' Linear layers whose activations the target quantizes, min-max activation
           scales per timestep group (`--methods fp vidit-w8a8 vidit-w8a8-act-mse` measures
           the MSE activation-scale search against it), weight scales clipped per row/block by an
           activation-weighted MSE search, 2 timestep groups (w4a8: int4 blockwise, block 32)
  modelopt-int8: NVIDIA ModelOpt's INT8 SmoothQuant (mtq.INT8_SMOOTHQUANT_CFG, alpha 0.8,
           per-channel weights, per-tensor max-calibrated activations, one scale for all
           timesteps) on the same Linear layers (same FP layers; LayerNorm inputs not
           quantized), calibrated on the same prompts and trajectories; skipped, with the
           reason, where nvidia-modelopt does not import or run.
  mp-w4.5a8, mp-w4.0a8, mp-w4.5a8-nobos, greedy-w4.5a8: plans made here by `effgen plan`'s
           API (calib.allocate.plan_model): per-layer sensitivity (its default metric: the
           final samples' SQNR for every layer), then W4/W8 x A8/A16 per Linear (block linears,
           adaLN, timestep/caption embedders, final layer) within an average of 4.5 (4.0) weight
           bits by the integer program (greedy: most sensitive layers to 8 bits first),
           activation bits as the target runs them no more than uniform W4A8's (on trt: W8
           layers may be W8A16); vidit-w4a8's techniques plus BOS-aware text embedding
           (-nobos: without).
           At 4.0 bits every Linear is W4 (no candidate has fewer bits): the row differs
           from vidit-w4a8 by the conditioning layers, W4 here and FP there.
           Sensitivities are cached under $EFFGEN_CACHE, so rows sharing techniques measure once.
  mp-w4.5a8-decoupled: mp-w4.5a8 with MixDQ's metric decoupling (`effgen plan --metric
           decoupled`: SSIM of final images for cross-attention and FFN, the denoiser
           output's SQNR for the rest).
  mp-w4.5a8-sqnr-only, mp-w4.5a8-ssim-only (on request): every layer judged by the denoiser
           output's SQNR, or by final-image SSIM.
acc_lost / acc_gained ("-/+" in the printed table): images FP shows right and the method
wrong, and the reverse (metrics.evaluate); the accuracy difference is their difference / N.
weight_ratio: weight bytes / FP's on the target; weight_ratio_w8a8: / uniform W8A8's.
All methods are calibrated on refdata.eval_prompts(n_calib, seed=999) (statistics cached), or
on the first n_calib prompts of --calib-prompts (captions, or a text states file).
This is the PyTorch simulation of the target's numerics; the exported QDQ bundles are
measured with `effgen eval` once the exporter lowers plans.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "samples" / "plans"
MODELS = ("pixart-ref", "dit-ref")
# Mixed precision planned in-process by effgen.calib.allocate.plan_model (`effgen plan`):
# method -> (average weight bits, allocator, BOS-aware, sensitivity options: metric and
# content rules, sensitivity.metric_settings; {} = effgen plan's defaults).
DECOUPLED = {"metric": "decoupled"}
MP_METHODS = {
    "mp-w4.5a8": (4.5, "ilp", True, {}),
    "mp-w4.0a8": (4.0, "ilp", True, {}),
    "mp-w4.5a8-nobos": (4.5, "ilp", False, {}),
    "greedy-w4.5a8": (4.5, "greedy", True, {}),
    "mp-w4.5a8-decoupled": (4.5, "ilp", True, DECOUPLED),
    # On request: every layer by one of the decoupled metrics (same budget and solver).
    "mp-w4.5a8-sqnr-only": (4.5, "ilp", True, {**DECOUPLED, "content_rules": ()}),
    "mp-w4.5a8-ssim-only": (4.5, "ilp", True, {**DECOUPLED, "content_rules": (".",)}),
}
# On request: samples/plans/mp_w4a8_rules.json, vidit-w8a8 with the MSE activation-scale
# search instead of min-max (why the sample plans use min-max), and the metric ablations.
EXTRA_METHODS = ("vidit-mp-w4a8", "vidit-w8a8-act-mse", "mp-w4.5a8-sqnr-only", "mp-w4.5a8-ssim-only")
METHODS = ("fp", "naive-w8a8", "vidit-w8a8", "naive-w4a8", "vidit-w4a8", "modelopt-int8",
           *(m for m in MP_METHODS if m not in EXTRA_METHODS))


def plan_for(method: str) -> dict | None:
    fmt = {"format": "effgen.plan/1"}
    if method == "naive-w8a8":
        return {**fmt, "default": {"w_bits": 8, "a_bits": 8}}
    if method == "naive-w4a8":
        return {**fmt, "default": {"w_bits": 4, "a_bits": 8, "w_granularity": "per_channel"}}
    files = {"vidit-w8a8": "w8a8.json", "vidit-w4a8": "w4a8.json", "vidit-mp-w4a8": "mp_w4a8_rules.json"}
    if method in files:
        return json.loads((PLANS / files[method]).read_text())
    if method == "vidit-w8a8-act-mse":
        plan = json.loads((PLANS / "w8a8.json").read_text())
        plan["techniques"]["act_scale"] = {"method": "mse"}
        return plan
    return None


def mixed_precision_plan(fp, method: str, stats, calib_items, args, log) -> dict:
    """The plan of an MP_METHODS row from effgen's planner (sensitivities cached on disk, so
    rows sharing the techniques measure once)."""
    from effgen.calib.allocate import DEFAULT_TECHNIQUES, plan_model

    weight_bits, allocator, bos, options = MP_METHODS[method]
    techniques = {**DEFAULT_TECHNIQUES, "bos_aware": bos}
    plan, _, result = plan_model(fp, weight_bits=weight_bits, allocator=allocator, **options,
                                 techniques=techniques, target=args.target, stats=stats,
                                 n_calib=args.n_calib, n_prompts=args.sensitivity_prompts,
                                 calib_items=calib_items if args.calib_prompts else None,
                                 steps=args.sensitivity_steps, log=log,
                                 command=f"samples/quality_table.py --methods {method}")
    got = plan["provenance"]["achieved"]
    log(f"  {method}: {allocator} {result.status}, {got['weight_bits']:.3f} weight bits")
    return plan


def modelopt_int8(fp, items, n_calib_steps, guidance, log):
    """ModelOpt's INT8 SmoothQuant on a copy of `fp`; returns (model, info) or raises."""
    import modelopt.torch.quantization as mtq

    from effgen.calib.calibrate import DEFAULT_FP
    from effgen.calib.stats import CALIB_SEED, encode_conditions, quantizable_modules
    from effgen.models.sampling import sample
    from effgen.runtime.pipeline import initial_noise

    spec = fp.spec
    q = copy.deepcopy(fp)
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    cfg["algorithm"] = {"method": "smoothquant", "alpha": 0.8}
    fp_layers = [n for n in quantizable_modules(fp)
                 if any(re.fullmatch(p, n) for p in DEFAULT_FP[spec.family])]
    # The same FP layers as effgen's plans. And only Linear/Conv inputs: ModelOpt registers
    # nn.LayerNorm as a quantizable module (for the LayerNorm *output* QDQ of its FP8
    # attention fusion), so the generic "*input_quantizer" pattern would also fake-quantize
    # the residual stream entering every block's LayerNorm to int8, which is not part of
    # the INT8 SmoothQuant recipe (it alone costs ~20 dB PSNR on dit-ref).
    cfg["quant_cfg"] = (list(cfg["quant_cfg"])
                        + [{"quantizer_name": f"{n}.*", "enable": False} for n in fp_layers]
                        + [{"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False}])
    noise = initial_noise((spec.in_channels, spec.sample_size, spec.sample_size), CALIB_SEED, len(items))
    cond, uncond, cmask, umask = encode_conditions(spec, items)

    def forward_loop(model):
        for start in range(0, len(items), 16):
            sl = slice(start, start + 16)
            sample(model, noise[sl], cond[sl], uncond[sl], spec.scheduler, n_calib_steps, guidance,
                   None if cmask is None else cmask[sl], None if umask is None else umask[sl],
                   guidance_interval=spec.guidance_interval)

    t0 = time.perf_counter()
    with warnings.catch_warnings():  # "X is not calibrated, skip smoothing": our FP layers
        warnings.filterwarnings("ignore", message=".*is not calibrated, skip smoothing")
        mtq.quantize(q, cfg, forward_loop=forward_loop)
    quantized = [n for n, m in q.named_modules()
                 if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)]
    inputs = [n for n, m in q.named_modules()
              if getattr(getattr(m, "input_quantizer", None), "is_enabled", False)]
    if sorted(inputs) != sorted(quantized):
        raise RuntimeError(f"modelopt quantized other inputs than its Linear layers: "
                           f"{sorted(set(inputs) ^ set(quantized))[:3]}")
    smoothed = [n for n, m in q.named_modules()
                if getattr(getattr(m, "input_quantizer", None), "pre_quant_scale", None) is not None]
    log(f"  modelopt: {len(quantized)} quantized layers, {len(smoothed)} smoothed, "
        f"{time.perf_counter() - t0:.0f}s")
    return q, {"quantized": quantized, "smoothed": smoothed}


def weights_info(spec) -> dict | None:
    """Training steps and loss of the shipped weights (safetensors metadata), so a table made
    from a checkpoint of a run still in progress says so."""
    from safetensors import safe_open

    from effgen.models.denoiser import WEIGHTS_DIR

    path = WEIGHTS_DIR / spec.weights if spec.weights else None
    if path is None or not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: meta[k] for k in ("steps", "loss", "train_minutes") if k in meta}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="write the rows here (updated after each row)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=list(METHODS) + list(EXTRA_METHODS))
    p.add_argument("--target", default="trt", choices=["trt", "trt-orin", "ort-cpu"])
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--calib-prompts", type=Path, default=None, metavar="FILE",
                   help="calibrate every method on this prompt or text states file (effgen calib "
                   "--prompts; default: the held-out reference captions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sensitivity-prompts", type=int, default=4,
                   help="prompts of the mp-* rows' sensitivity runs (effgen plan --n-prompts)")
    p.add_argument("--sensitivity-steps", type=int, default=8,
                   help="sampler steps of the mp-* rows' sensitivity runs (effgen plan --steps)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from effgen import metrics
    from effgen.calib.calibrate import calibrate, generate_images, resolve_for_model, sample_items
    from effgen.calib.cost import weight_bytes
    from effgen.calib.simulate import quantize_
    from effgen.calib.stats import calibration_items, collect_statistics
    from effgen.models.configs import get_spec
    from effgen.models.denoiser import load_denoiser

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows: list[dict] = []
    config = {"target": args.target, "n_images": args.n_images, "n_calib": args.n_calib,
              "calib_prompts": None if args.calib_prompts is None else str(args.calib_prompts),
              "seed": args.seed, "simulation": "effgen.calib PyTorch fake quantization"}

    def emit(row):
        rows.append(row)
        metrics.write_json(args.json, {"config": config, "rows": rows})
        shown = " ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                         for k in ("psnr", "ssim", "fd", "attr_acc", "class_acc", "weight_bytes"))
        log(f"{row['model']:>10} {row['method']:>15}: " + (f"skipped ({row['skipped']})"
                                                          if row.get("skipped") else shown))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    real = metrics.real_images(args.n_images)
    for model in args.models:
        spec = get_spec(model)
        base = {"model": spec.name, "target": args.target, "n_images": args.n_images,
                "weights": weights_info(spec)}
        try:
            if spec.weights is None or spec.latent_space:
                raise ValueError(f"{spec.name} is not a trained pixel-space reference model "
                                 "(the metrics score refdata pictures)")
            fp = load_denoiser(model)
        except (FileNotFoundError, ValueError) as e:
            for method in args.methods:
                emit({**base, "method": method, "skipped": str(e)})
            continue
        steps = int(args.steps or spec.steps)
        items, attrs = sample_items(spec, args.n_images)
        class_ids = [a.class_id for a in attrs]
        calib_items = calibration_items(spec, args.n_calib, args.calib_prompts)
        t0 = time.perf_counter()
        fp_images = generate_images(fp, items, seed=args.seed, steps=steps, desc=f"{model} fp")
        fp_seconds = time.perf_counter() - t0
        fp_bytes = weight_bytes(fp, None, args.target)
        # Uniform W8A8 (no smoothing vectors): the denominator of weight_ratio_w8a8.
        w8a8_bytes = weight_bytes(fp, resolve_for_model(fp, {"format": "effgen.plan/1",
                                                             "default": {"w_bits": 8, "a_bits": 8}},
                                                        args.target))
        stats = None

        def score(images, method, wbytes, seconds, **extra):
            result = metrics.evaluate(images, reference_images=fp_images,
                                      attrs=attrs if spec.family == "pixart" else None,
                                      class_ids=class_ids, real_images=real)
            emit({**base, "method": method, **{k: result[k] for k in
                                                ("psnr", "ssim", "fd", "attr_acc", "class_acc",
                                                 "acc_lost", "acc_gained")},
                  "weight_bytes": wbytes, "weight_ratio": round(wbytes / fp_bytes, 4),
                  "weight_ratio_w8a8": round(wbytes / w8a8_bytes, 4),
                  "seconds": round(seconds, 1), "skipped": None, **extra})

        for method in args.methods:
            t0 = time.perf_counter()
            try:
                if method == "fp":
                    score(fp_images, method, fp_bytes, fp_seconds)
                    continue
                if method == "modelopt-int8":
                    try:
                        q, info = modelopt_int8(fp, calib_items, steps, spec.guidance, log)
                    except ImportError as e:
                        emit({**base, "method": method, "skipped": f"nvidia-modelopt does not import: {e}"})
                        continue
                    naive = resolve_for_model(fp, {"format": "effgen.plan/1", "target": args.target,
                                                   "default": {"w_bits": 8, "a_bits": 8}})
                    naive.provenance["smoothing"] = {n: 0.8 for n in info["smoothed"]}
                    images = generate_images(q, items, seed=args.seed, steps=steps, desc=f"{model} {method}")
                    score(images, method, weight_bytes(fp, naive, args.target), time.perf_counter() - t0,
                          quantized_layers=len(info["quantized"]))
                    continue
                if stats is None:
                    stats = collect_statistics(fp, items=calib_items, steps=steps, log=log)
                raw = (mixed_precision_plan(fp, method, stats, calib_items, args, log)
                       if method in MP_METHODS else plan_for(method))
                plan, scales = calibrate(fp, raw, args.target, stats=stats, items=calib_items,
                                         steps=steps)  # GPTQ's Hessians along the same sampler
                q = copy.deepcopy(fp)
                quantize_(q, plan, scales)
                images = generate_images(q, items, seed=args.seed, steps=steps, desc=f"{model} {method}")
                counts: dict = {}
                for e in plan.provenance["effective"].values():
                    k = f"W{e['w_bits']}A{e['a_bits']}"
                    counts[k] = counts.get(k, 0) + 1
                extra = {}
                if method in MP_METHODS:
                    extra["planned"] = raw["provenance"]["achieved"]
                score(images, method, weight_bytes(fp, plan), time.perf_counter() - t0,
                      effective=counts, timestep_groups=[list(g) for g in plan.timestep_groups],
                      **extra)
            except Exception as e:  # a method that cannot run is a row that says why
                log(traceback.format_exc())
                emit({**base, "method": method, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})

    log("")
    log(f"{'model':>10} {'method':>15} {'psnr':>7} {'ssim':>6} {'fd':>8} {'attr':>5} {'class':>5} "
        f"{'-/+':>7} {'MB':>6} {'x FP':>5} {'x W8':>5}")
    for r in rows:
        if r.get("skipped"):
            log(f"{r['model']:>10} {r['method']:>15}  skipped: {r['skipped']}")
            continue

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        def flips(r):
            return "-" if r.get("acc_lost") is None else f"-{r['acc_lost']}/+{r['acc_gained']}"
        log(f"{r['model']:>10} {r['method']:>15} {f(r['psnr'], '7.2f')} {f(r['ssim'], '6.3f')} "
            f"{f(r['fd'], '8.2f')} {f(r['attr_acc'], '5.2f')} {f(r['class_acc'], '5.2f')} "
            f"{flips(r):>7} {r['weight_bytes'] / 1e6:6.2f} {r['weight_ratio']:5.2f} {r['weight_ratio_w8a8']:5.2f}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
