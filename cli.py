"""`effgen`: generate, verify and benchmark bundles.

Commands that only read bundles import the torch-free runtime; nothing here loads torch
unless a command needs it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .runtime.backends import BACKENDS


def fail_cleanly(main):
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    def wrapper(argv=None):
        from .runtime.bundle import BundleError

        try:
            return main(argv)
        except (BundleError, ValueError, FileNotFoundError, NotADirectoryError) as e:
            prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "effgen"
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def _progress(total_desc: str):
    from tqdm import tqdm

    bar = {"bar": None}

    def on_step(done: int, total: int):
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=total_desc, unit="step", file=sys.stderr)
        bar["bar"].update(done - bar["bar"].n)
        if done == total:
            bar["bar"].close()

    return on_step


def cmd_generate(args) -> int:
    from .runtime import load_pipeline
    from .runtime.images import make_grid, save_png

    pipe = load_pipeline(args.bundle, threads=args.threads)
    cond: dict = {}
    if args.prompt:
        n = args.num_images or len(args.prompt)
        prompts = args.prompt if len(args.prompt) == n else (args.prompt * n)[:n]
        cond = {"prompt": prompts, "negative_prompt": args.negative_prompt}
    elif args.prompt_embeds:
        from .runtime.text import read_text_states

        embeds = read_text_states(args.prompt_embeds)
        n = args.num_images or (len(embeds["prompt_embeds"])  # one image per row of the file
                                if np.ndim(embeds.get("prompt_embeds")) == 3 else 1)
        cond = {"prompt_embeds": embeds}
    elif args.class_label:
        n = args.num_images or len(args.class_label)
        labels = (args.class_label * n)[:n]
        cond = {"class_label": labels}
    else:
        raise ValueError("give --prompt, --prompt-embeds or --class-label")
    t0 = time.perf_counter()
    images = pipe.generate(num_images=n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                           guidance_interval=args.guidance_interval,
                           on_step=_progress("denoising"), **cond)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    upscale = max(1, 128 // images.shape[1])  # tiny reference images are enlarged to be seen
    for i, img in enumerate(images):
        save_png(img, args.out / f"{i:03d}.png")
    grid = args.out / "grid.png"
    save_png(make_grid(images), grid, upscale=upscale)
    print(f"{n} images in {seconds:.1f}s -> {args.out}/000.png .. {n - 1:03d}.png, grid: {grid}")
    return 0


def cmd_verify(args) -> int:
    from .runtime.bundle import Bundle

    bundle = Bundle.load(args.bundle, verify_hashes=True)
    print(f"ok: {args.bundle}: {len(bundle.manifest['files'])} files match their sha256")
    return 0


def cmd_bench(args) -> int:
    from .runtime.bench import bench_bundle

    if args.profile and args.backend != "ort":
        raise SystemExit("effgen bench: --profile needs --backend ort (ONNX Runtime's profiler)")
    if args.repeat < 1 or args.images < 0:
        raise SystemExit("effgen bench: --repeat must be at least 1 and --images at least 0")
    if len(args.bundle) > 1:
        return _bench_several(args)
    result = bench_bundle(args.bundle[0], steps=args.steps, images=args.images,
                          repeat=args.repeat, threads=args.threads, backend=args.backend,
                          profile=args.profile)
    for k, v in result.items():
        if k != "op_ms":
            print(f"{k:>20}: {v}")
    if "op_ms" in result:
        total = sum(result["op_ms"].values())
        print(f"denoiser call by operator type (ONNX Runtime profiler, {total:.1f} ms of kernels):")
        for op, ms in result["op_ms"].items():
            if ms >= 0.005 * total:
                print(f"{op:>28}: {ms:10.1f} ms {100 * ms / total:5.1f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bench_several(args) -> int:
    from .runtime.bench import bench_interleaved

    if args.profile:
        raise SystemExit("effgen bench: --profile times one bundle")
    results = bench_interleaved(args.bundle, steps=args.steps, images=args.images,
                                repeat=args.repeat, threads=args.threads, backend=args.backend)
    base = results[0] if "error" not in results[0] else None
    print(f"{len(results)} bundles, calls interleaved ({args.repeat} rounds, {args.images} images)"
          + (f"; ratios against {results[0]['bundle']}" if base else ""))
    print(f"{'bundle':<40} {'step_ms':>10} {'x':>6} {'image_ms':>10} {'x':>6} {'peak_mb':>8} "
          f"{'weight_bytes':>14} {'x':>6}")
    failed = 0
    for r in results:
        if "error" in r:
            print(f"{r['bundle']:<40} failed: {r['error']}")
            failed += 1
            continue

        def ratio(key):
            return f"{r[key] / base[key]:6.2f}" if base and r.get(key) and base.get(key) else f"{'-':>6}"

        image = f"{r['image_ms']:10.1f}" if r["image_ms"] is not None else f"{'-':>10}"
        print(f"{r['bundle']:<40} {r['step_ms']:10.2f} {ratio('step_ms')} {image} {ratio('image_ms')} "
              f"{r['peak_mb']:8.1f} {r['weight_bytes']:14,d} {ratio('weight_bytes')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


def cmd_compare(args) -> int:
    from .metrics import write_json
    from .runtime.compare import compare_backends, rows_as_dicts

    rows = compare_backends(args.bundle, reference=args.reference, candidate=args.candidate,
                            steps=args.steps, seed=args.seed, threads=args.threads)
    print(f"{args.candidate} against {args.reference} on the calls of one image ({args.bundle})")
    print(f"{'component':>14} {'variant':>7} {'output':>14} {'calls':>5} {'max |err|':>10} {'SQNR dB':>8}")
    for r in rows:
        print(f"{r.component:>14} {r.variant:>7} {r.output:>14} {r.calls:>5} "
              f"{r.max_abs_error:>10.3g} {r.sqnr_db:>8.1f}")
    if args.json:
        write_json(args.json, {"bundle": str(args.bundle), "reference": args.reference,
                               "candidate": args.candidate, "rows": rows_as_dicts(rows)})
        print(f"wrote {args.json}")
    if args.min_sqnr is not None:
        worst = min(rows, key=lambda r: r.sqnr_db)
        if worst.sqnr_db < args.min_sqnr:
            raise ValueError(f"{worst.component} variant {worst.variant} output {worst.output}: "
                             f"SQNR {worst.sqnr_db:.1f} dB < --min-sqnr {args.min_sqnr}")
    return 0


def cmd_eval(args) -> int:
    from .metrics import evaluate_bundle, write_json
    from .runtime.pipeline import EVERY_STEP

    result = evaluate_bundle(args.bundle, reference=args.reference, n_images=args.n_images,
                             seed=args.seed, threads=args.threads, steps=args.steps,
                             guidance=args.guidance, guidance_interval=args.guidance_interval)
    shown = {"psnr": "PSNR vs reference (dB)", "ssim": "SSIM vs reference",
             "fd": "Frechet distance vs real", "attr_acc": "shape+colour+position acc",
             "attr_acc_heldout": "same, unseen combinations",
             "class_acc": "shape+colour acc", "n_images": "images"}
    interval = result["guidance_interval"]
    where = ("" if interval is None or tuple(interval) == EVERY_STEP
             else f" at t {interval[0]:g}-{interval[1]:g}")
    print(f"{result['model']} ({args.bundle}), {result['steps']} steps, guidance "
          f"{result['guidance']:g}{where}, seed {args.seed}")
    for key, label in shown.items():
        value = result[key]
        text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"  {label:>26}: {text}")
    if result.get("acc_by_attribute"):
        print(f"  {'acc per attribute':>26}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in result["acc_by_attribute"].items()))
    if result.get("shape_confusion"):
        from .models.refdata import SHAPES

        print(f"  {'shapes asked -> read':>26}: " + "; ".join(
            f"{asked}: " + ", ".join(f"{read} {n}" for read, n in zip(SHAPES, row) if n)
            for asked, row in zip(SHAPES, result["shape_confusion"])))
    if result.get("acc_lost") is not None:
        print(f"  {'flips vs reference':>26}: {result['acc_lost']} right there and wrong "
              f"here, {result['acc_gained']} the reverse")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_plan_memory(args) -> int:
    from .engines.memory import format_plan, plan_memory
    from .engines.targets import get_device
    from .runtime.bundle import Bundle

    plan = plan_memory(Bundle.load(args.bundle), get_device(args.device), args.workspace_mb)
    print(format_plan(plan))
    if args.json:
        args.json.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return 0


def _calib_log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _grouping_override(raw: dict, args) -> dict:
    """--groups K / --group-tolerance X replace the plan's timestep grouping."""
    if getattr(args, "groups", None) is None and getattr(args, "group_tolerance", None) is None:
        return raw
    raw = dict(raw)
    raw.pop("timestep_groups", None)
    techniques = dict(raw.get("techniques") or {})
    techniques["timestep_grouping"] = ({"k": args.groups} if args.groups is not None
                                       else {"tolerance": args.group_tolerance})
    raw["techniques"] = techniques
    return raw


def _load_model(name: str, checkpoint):
    """The model calibration and planning work on: a Denoiser, or an ECAR model (both
    components; its stages are the timesteps)."""
    from .models.configs import get_spec

    if get_spec(name).family == "ecar":
        from .models.ecar import load_ecar

        if checkpoint is not None:
            raise ValueError(f"{name}: ECAR models use their shipped weights (no --checkpoint)")
        return load_ecar(name)
    from .models.denoiser import load_denoiser

    return load_denoiser(name, checkpoint)


def cmd_calib(args) -> int:
    from .calib.calibrate import calibrate
    from .calib.plan import LayerPrecision, read_plan_file
    from .calib.quantizers import describe
    from .calib.scales import write_calibration
    from .calib.stats import model_calibration_items

    raw = _grouping_override(read_plan_file(args.plan), args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    denoiser = _load_model(args.model, args.checkpoint)
    items = model_calibration_items(denoiser, args.n_calib, args.prompts)
    plan, scales = calibrate(denoiser, raw, args.target, items=items, steps=args.steps,
                             guidance=args.guidance, use_cache=not args.no_cache, log=_calib_log,
                             device=args.device)
    plan_path, scales_path = write_calibration(args.out, plan, scales)
    counts: dict = {}
    for name, prec in plan.layers.items():
        eff = plan.provenance["effective"].get(name)
        label = describe(prec if eff is None else LayerPrecision(**eff))
        counts[label] = counts.get(label, 0) + 1
    print(f"{plan.model} on {plan.target}: {len(plan.layers)} layers ("
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"), "
          f"{len(plan.timestep_groups)} timestep group(s) {plan.timestep_groups}")
    print(f"wrote {plan_path} and {scales_path}")
    return 0


def cmd_sample_sim(args) -> int:
    from .calib.calibrate import calibrate, generate_images, resolve_for_model, sample_items
    from .calib.plan import read_plan_file
    from .calib.scales import PLAN_FILE, SCALES_FILE, load_scales
    from .calib.simulate import quantize_
    from .models.denoiser import load_denoiser
    from .runtime.images import make_grid, save_png

    if args.plan is None and args.scales is None:
        raise ValueError("give --plan PLAN (calibrated on the fly) and/or --scales DIR (from effgen calib)")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    denoiser = load_denoiser(args.model, args.checkpoint)
    if denoiser.spec.latent_space:
        raise ValueError(f"{denoiser.spec.name} denoises latents: sample-sim writes images of the "
                         "pixel-space reference models (pixart, dit)")
    if args.scales is not None:
        plan_path = args.plan or args.scales / PLAN_FILE
        raw = read_plan_file(plan_path)
        if isinstance(raw, dict) and raw.get("model") not in (None, "", denoiser.spec.name):
            raise ValueError(f"{plan_path} is a plan for {raw['model']}, not {denoiser.spec.name}")
        plan = resolve_for_model(denoiser, raw)
        scales = load_scales(args.scales / SCALES_FILE, plan)
    else:
        plan, scales = calibrate(denoiser, _grouping_override(read_plan_file(args.plan), args),
                                 args.target, n_calib=args.n_calib, steps=args.steps,
                                 guidance=args.guidance, log=_calib_log)
    quantize_(denoiser, plan, scales, args.target)
    items, _ = sample_items(denoiser.spec, args.num_images)
    images = generate_images(denoiser, items, seed=args.seed, steps=args.steps,
                             guidance=args.guidance, desc=f"sampling ({plan.target} simulation)")
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(img, args.out / f"{i:03d}.png")
    grid = args.out / "grid.png"
    save_png(make_grid(images), grid, upscale=max(1, 128 // images.shape[1]))
    (args.out / "prompts.txt").write_text("".join(f"{x}\n" for x in items))
    print(f"{len(images)} images ({plan.model}, {plan.target} simulation) -> {args.out}/000.png .. "
          f"{len(images) - 1:03d}.png, grid: {grid}")
    return 0


def _add_calib_parsers(sub) -> None:
    c = sub.add_parser("calib", help="calibrate a model for a plan: plan.json + scales.safetensors",
                       description="Run the FP PyTorch sampler over calibration prompts/labels "
                       "(statistics cached under $EFFGEN_CACHE or ~/.cache/effgen), compute "
                       "smoothing vectors, weight scales and per-timestep-group activation "
                       "scales for the plan as the target runs it, and write the resolved "
                       "plan (plan.json) and scales.safetensors into --out. ECAR models "
                       "calibrate both components (ar.*, head.*) along their stage loop: "
                       "their timestep groups are stage groups.")
    c.add_argument("model", help="model name (pixart = pixart-ref, dit = dit-ref, ecar = ecar-ref, dit-tiny, ...)")
    c.add_argument("--plan", type=Path, required=True, help="plan JSON (effgen.plan/1)")
    c.add_argument("--out", type=Path, required=True, help="directory for plan.json and scales.safetensors")
    c.add_argument("--target", choices=["ort-cpu", "trt", "trt-orin"], default=None,
                   help="target whose effective precision is simulated (default: the plan's)")
    c.add_argument("--n-calib", type=int, default=32, help="calibration prompts/labels")
    c.add_argument("--prompts", type=Path, default=None,
                   help="calibration prompts: a text file, one caption (or class label) per "
                   "line, or a text states file from `effgen encode-prompts` (.safetensors), "
                   "which a PixArt checkpoint needs: effgen does not run T5 "
                   "(default: refdata.eval_prompts(N, seed=999); N distinct seeded classes for "
                   "a DiT with other classes than the reference data's)")
    c.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    c.add_argument("--guidance", type=float, default=None, help="guidance (default: the model's)")
    c.add_argument("--groups", type=int, default=None, help="K equal timestep groups (overrides the plan)")
    c.add_argument("--group-tolerance", type=float, default=None,
                   help="group adjacent steps whose activation ranges agree within this relative tolerance")
    c.add_argument("--checkpoint", type=Path, default=None, help="local diffusers folder")
    c.add_argument("--no-cache", action="store_true", help="recompute the statistics")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    c.add_argument("--device", default=None, help="torch device of the FP sampler passes "
                   "(statistics, GPTQ Hessians): cuda for a real-size model; the rest runs on the CPU")
    c.set_defaults(func=cmd_calib)

    s = sub.add_parser("sample-sim", help="sample images with a quantization-simulated PyTorch model",
                       description="Swap the plan's layers for simulating modules (the target's "
                       "effective numerics) and sample refdata.eval_prompts(N) (captions for "
                       "pixart, class ids for dit) with image i seeded SEED+i like the runtime; "
                       "writes PNGs, grid.png and prompts.txt.")
    s.add_argument("model")
    s.add_argument("--plan", type=Path, default=None,
                   help="plan JSON (default with --scales: DIR/plan.json)")
    s.add_argument("--scales", type=Path, default=None,
                   help="directory written by effgen calib (without it: calibrate now)")
    s.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    s.add_argument("--target", choices=["ort-cpu", "trt", "trt-orin"], default=None)
    s.add_argument("--num-images", "-n", type=int, default=16)
    s.add_argument("--seed", type=int, default=0, help="image i uses noise seeded SEED+i")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--n-calib", type=int, default=32, help="calibration prompts (without --scales)")
    s.add_argument("--groups", type=int, default=None)
    s.add_argument("--group-tolerance", type=float, default=None)
    s.add_argument("--checkpoint", type=Path, default=None)
    s.add_argument("--threads", type=int, default=0)
    s.set_defaults(func=cmd_sample_sim)



def cmd_plan(args) -> int:
    from .calib.allocate import DEFAULT_TECHNIQUES, plan_model
    from .calib.plan import PlanError, read_plan_file
    from .calib.quantizers import describe
    from .calib.sensitivity import DEFAULT_METRIC
    from .calib.stats import model_calibration_items
    from .runtime.bundle import write_json_atomic

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.out.exists() and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the plan file's path")
    techniques = dict(DEFAULT_TECHNIQUES)
    if args.techniques_from is not None:
        raw = read_plan_file(args.techniques_from)
        if not isinstance(raw, dict) or not isinstance(raw.get("techniques", {}), dict):
            raise PlanError(f"{args.techniques_from}: techniques: expected an object")
        techniques = dict(raw.get("techniques", {}))
    if args.bos_aware is not None:
        techniques["bos_aware"] = args.bos_aware
    denoiser = _load_model(args.model, args.checkpoint)
    calib_items = model_calibration_items(denoiser, args.n_calib, args.prompts)
    command = "effgen " + shlex.join(args.argv)
    t0 = time.perf_counter()
    plan, sens, result = plan_model(
        denoiser, weight_bits=args.weight_bits, weight_mb=args.weight_mb, act_bits=args.act_bits,
        content_weight=args.content_weight, allocator=args.allocator, techniques=techniques,
        target=args.target, per_timestep=args.per_timestep, command=command,
        log=_calib_log, n_prompts=args.n_prompts, steps=args.steps, n_calib=args.n_calib,
        metric=args.metric or DEFAULT_METRIC, content_rules=args.content_rule,
        use_cache=not args.no_cache,
        calib_items=calib_items if args.prompts is not None else None, device=args.device)
    if args.report is not None:
        from .calib.report import write_report

        index = write_report(args.report, sens, plan)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, plan)
    counts: dict = {}
    for n in sens.layers:
        label = describe(sens.candidates[result.choice[sens.layers.index(n)]])
        counts[label] = counts.get(label, 0) + 1
    got = plan["provenance"]["achieved"]
    print(f"{sens.model} on {sens.target}: {len(sens.layers)} layers ("
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"); "
          f"{got['weight_bits']:.3f} weight bits, {got['act_bits_planned']:.2f} activation bits "
          f"planned ({got['act_bits_effective']:.2f} as run), {got['weight_mb']:.3f} MB; "
          f"{args.allocator}: {result.status}, {time.perf_counter() - t0:.0f}s")
    print(f"wrote {args.out}" + (f" and {index}" if args.report is not None else ""))
    return 0


def _add_plan_parser(sub) -> None:
    pl = sub.add_parser(
        "plan", help="mixed-precision plan: per-layer sensitivity + integer-programming bit allocation",
        description="Measure every layer's sensitivity at each candidate precision (W4/W8 x "
        "A8/A16) over every Linear (block linears, embedders, adaLN, final layer), "
        "quantized alone for the target: by default by the SQNR of the final samples against FP "
        "from the same noise (--metric final), or MixDQ's split (--metric decoupled: content "
        "layers, cross-attention and FFN, by SSIM of final images, the rest by SQNR of the "
        "denoiser output), cached under $EFFGEN_CACHE or ~/.cache/effgen. Then choose one "
        "precision per layer that minimises the summed normalised loss within the budget "
        "(integer program, scipy milp/HiGHS, or the greedy baseline) and write an "
        "effgen.plan/1 file with a resolved `layers` map.")
    pl.add_argument("model", help="model name (pixart = pixart-ref, dit = dit-ref, pixart-tiny, ...)")
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--weight-bits", type=float, default=None,
                        help="average weight bits over the Linear layers, weighted by parameters, as the "
                        "target runs them (e.g. 4.5)")
    budget.add_argument("--weight-mb", type=float, default=None,
                        help="weight megabytes (1e6 bytes) of the whole denoiser as shipped on the target")
    pl.add_argument("--act-bits", type=float, default=None,
                    help="average activation bits as the target runs them, weighted by each "
                    "layer's input size (default: the uniform W4A8 plan's, i.e. 8 where W4A8 "
                    "runs as such and 16 on TensorRT, where W4 runs weight-only; lower it to "
                    "trade quality for INT8 GEMMs)")
    pl.add_argument("--out", type=Path, required=True, help="plan JSON to write")
    pl.add_argument("--allocator", choices=["ilp", "greedy"], default="ilp",
                    help="ilp: exact integer program (default); greedy: most sensitive layers "
                    "to 8 bits first, for comparison")
    pl.add_argument("--content-weight", type=float, default=0.5, metavar="W",
                    help="weight of the content layers' normalised loss (quality layers: 1 - W)")
    pl.add_argument("--per-timestep", action="store_true",
                    help="measure per timestep group and allocate for the worst group")
    pl.add_argument("--metric", choices=["final", "decoupled"], default=None,
                    help="final (default): every layer by the SQNR of the final samples, the whole "
                    "sampler run, so the plan minimises the images' summed noise (PSNR); decoupled: "
                    "MixDQ's metric decoupling, content layers by final-image SSIM and the rest by "
                    "the SQNR of single denoiser calls (cheaper: fewer sampler runs)")
    pl.add_argument("--content-rule", action="append", default=None, metavar="REGEX",
                    help="layers judged by final-image SSIM (repeat; default: none with --metric "
                    "final, \\.attn2\\. and \\.ff\\. with --metric decoupled)")
    pl.add_argument("--target", choices=["ort-cpu", "trt", "trt-orin"], default="trt",
                    help="target whose effective precision is measured and planned (default trt)")
    pl.add_argument("--techniques-from", type=Path, default=None, metavar="PLAN",
                    help="take the techniques (smoothing, act_scale, timestep_grouping, ...) from this "
                    "plan (default: those of samples/plans/w4a8.json with bos_aware)")
    bos = pl.add_mutually_exclusive_group()
    bos.add_argument("--bos-aware", dest="bos_aware", action="store_true", default=None,
                     help="MixDQ BOS-aware text embedding on (default: on, or as the "
                     "--techniques-from plan says)")
    bos.add_argument("--no-bos-aware", dest="bos_aware", action="store_false",
                     help="quantize the first text token's cross-attention rows like the others")
    pl.add_argument("--report", type=Path, default=None, metavar="DIR",
                    help="directory for an HTML report with plots")
    pl.add_argument("--n-prompts", type=int, default=4, help="prompts of the sensitivity runs")
    pl.add_argument("--steps", type=int, default=8, help="sampler steps of the sensitivity runs")
    pl.add_argument("--n-calib", type=int, default=32, help="calibration prompts for the scales")
    pl.add_argument("--prompts", type=Path, default=None,
                    help="calibration prompts: a text file, one caption or class label per line, "
                    "or a text states file from `effgen encode-prompts` (a PixArt checkpoint "
                    "needs one); the first --n-prompts of them measure the sensitivities "
                    "(default: held-out reference prompts)")
    pl.add_argument("--checkpoint", type=Path, default=None, help="local diffusers folder")
    pl.add_argument("--no-cache", action="store_true", help="recompute statistics and sensitivities")
    pl.add_argument("--device", default=None, help="torch device of the sampler passes (statistics, "
                    "GPTQ Hessians) and of the sensitivity measurements: cuda for a real-size "
                    "model; scales and GPTQ rounding are computed on the CPU")
    pl.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    pl.set_defaults(func=cmd_plan)


def cmd_check(args) -> int:
    """Every graph of the bundle against the target's rules; exit 1 naming each violation."""
    from .exporter.qdq import check_file, describe_target_rules, ort_unfused
    from .runtime.bundle import Bundle

    bundle = Bundle.load(args.bundle, verify_hashes=False)
    problems, graphs = [], 0
    for name, comp in bundle.components.items():
        target = args.target or (comp.get("quantization") or {}).get("target")
        if target is None:
            continue  # an FP component of a bundle checked without --target
        for v in comp["variants"]:
            path = bundle.path(v["onnx"])
            graphs += 1
            found = check_file(path, target)
            if target == "ort-cpu" and args.ort and not found:
                found = ort_unfused(path)
            problems += [f"{name}/{v['onnx']}: {p}" for p in found]
    if not graphs:
        raise ValueError(f"{args.bundle}: no quantized component; give --target to check FP graphs")
    for p in problems:
        print(p)
    rules = describe_target_rules(args.target) if args.target else "their targets'"
    if problems:
        print(f"{len(problems)} violation(s) of {rules} rules in {graphs} graph(s)", file=sys.stderr)
        return 1
    print(f"ok: {graphs} graph(s) of {args.bundle} follow {rules} rules")
    return 0


def cmd_encode_prompts(args) -> int:
    from .calib.scales import _atomic_write_bytes
    from .calib.stats import prompt_lines
    from .models.configs import get_spec
    from .models.t5 import encode_prompts
    from .runtime.text import TEXT_STATES_FORMAT

    spec = get_spec(args.model)
    if spec.text is None:
        raise ValueError(f"{spec.name} is class-conditional: it has no text encoder")
    if spec.text.encoder == "minilm":
        raise ValueError(f"{spec.name} ships its text encoder: give captions directly "
                         "(--prompts FILE.txt, --prompt)")
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: text states are written as a .safetensors file")
    prompts = prompt_lines(args.prompts)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    arrays = encode_prompts(args.checkpoint, prompts, spec.text.max_length, spec.text.dim,
                            negative_prompt=args.negative_prompt, dtype=args.dtype,
                            device=args.device)
    from safetensors.numpy import save_file

    meta = {"format": TEXT_STATES_FORMAT, "model": spec.name, "encoder": spec.text.encoder,
            "dtype": args.dtype, "prompts": json.dumps(prompts),
            "negative_prompt": args.negative_prompt}
    _atomic_write_bytes(args.out, lambda tmp: save_file(arrays, tmp, metadata=meta))
    n, length, dim = arrays["prompt_embeds"].shape
    print(f"{n} prompts -> {args.out} ({n} x {length} x {dim} states, {args.dtype} T5, "
          f"{time.perf_counter() - t0:.0f}s); calibrate with --prompts {args.out}, generate "
          f"with --prompt-embeds {args.out}")
    return 0


def _add_encode_prompts_parser(sub) -> None:
    e = sub.add_parser(
        "encode-prompts", help="T5 text states of prompts, from a PixArt checkpoint's own text encoder",
        description="Encode prompts with the T5 text encoder in a diffusers PixArt folder "
        "(text_encoder/ and tokenizer/, read offline with transformers), as diffusers' PixArt "
        "pipelines do: padded to the model's text length with the attention mask, and the "
        "negative prompt encoded the same way. The .safetensors file is what calibration takes "
        "as --prompts (effgen calib, effgen plan, effgen-export --plan) and `effgen generate "
        "--prompt-embeds` conditions on: effgen does not run T5 itself. T5-XXL's 4.7B "
        "weights take 9.4 GB in bfloat16.")
    e.add_argument("model", help="a T5-conditioned model: pixart-alpha-256/512/1024, pixart-sigma-1024")
    e.add_argument("--checkpoint", type=Path, required=True,
                   help="local diffusers folder with text_encoder/ and tokenizer/")
    e.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    e.add_argument("--out", type=Path, required=True, help="text states file to write (.safetensors)")
    e.add_argument("--negative-prompt", default="", help="the unconditional branch's prompt")
    e.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                   help="T5's compute precision (float16 overflows in T5 v1.1; float32 needs ~19 GB)")
    e.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    e.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    e.set_defaults(func=cmd_encode_prompts)


def _add_check_parser(sub) -> None:
    c = sub.add_parser("check", help="verify a bundle's graphs against a target's quantization rules",
                       description="Check every graph of a bundle against the rules of a target "
                       "(trt, trt-orin: TensorRT explicit quantization — symmetric, zero point 0, "
                       "per-channel only on weights on the output-channel axis, per-tensor "
                       "activations, INT4 only blocked on MatMul/Gemm weights; ort-cpu: what ONNX "
                       "Runtime's CPU provider fuses into integer kernels) and name each violating "
                       "node. Exit status 1 when there are violations.")
    c.add_argument("bundle", type=Path)
    c.add_argument("--target", choices=["trt", "trt-orin", "ort-cpu"], default=None,
                   help="rules to check (default: each component's quantization target)")
    c.add_argument("--no-ort", dest="ort", action="store_false",
                   help="ort-cpu: skip building each graph in ONNX Runtime to find weight "
                   "DequantizeLinear nodes it leaves unfused")
    c.set_defaults(func=cmd_check)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effgen", description="Generate images from effgen bundles and check them; "
        "plan mixed precision (`effgen plan`) and calibrate (`effgen calib`) before export. "
        "Bundles are made by `effgen-export MODEL --out DIR`.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a bundle into PNG files",
                       description="Run a bundle's denoising loop on ONNX Runtime and write "
                       "one PNG per image plus grid.png.")
    g.add_argument("bundle", type=Path)
    cond = g.add_mutually_exclusive_group(required=True)
    cond.add_argument("--prompt", action="append", help="text prompt (repeat for several)")
    cond.add_argument("--prompt-embeds", type=Path,
                      help="precomputed text states (`effgen encode-prompts`): .safetensors with "
                      "prompt_embeds [, prompt_attention_mask, negative_prompt_embeds, ...], or "
                      ".npy; one image per row unless --num-images")
    cond.add_argument("--class-label", type=int, nargs="+", help="class id(s) for class-conditional models")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--num-images", type=int, default=None,
                   help="images to make (default: one per prompt/label)")
    g.add_argument("--seed", type=int, default=0, help="image i uses noise seeded SEED+i")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: the bundle's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide only the steps at timesteps LO..HI (0..999), the others unguided "
                   "(default: the bundle's; 0 inf guides every step)")
    g.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    g.add_argument("--out", type=Path, default=Path("out"), help="directory for the PNGs")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="check every file of a bundle against its sha256")
    v.add_argument("bundle", type=Path)
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("bench", help="latency per denoiser step and per image, memory, weight bytes",
                       description="Measure a bundle on ONNX Runtime: median latency of one "
                       "denoiser call (ECAR: one head call of the last stage) and of one whole "
                       "image, peak resident memory and the bytes of its weights. With several "
                       "bundles (e.g. FP and quantized), each runs in its own process and their "
                       "calls are interleaved round by round, so a machine whose load comes and "
                       "goes affects them alike; ratios are against the first bundle.")
    b.add_argument("bundle", type=Path, nargs="+")
    b.add_argument("--steps", type=int, default=None, help="sampler steps per image")
    b.add_argument("--images", type=int, default=2, help="images timed")
    b.add_argument("--repeat", type=int, default=10, help="denoiser calls timed")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--backend", default="ort", choices=list(BACKENDS),
                   help="ort: ONNX Runtime CPU; trt: the bundle's TensorRT engines")
    b.add_argument("--profile", action="store_true",
                   help="also time one denoiser call by operator type with ONNX Runtime's "
                   "profiler (where the time goes: integer GEMMs, float attention, Q/DQ)")
    b.add_argument("--json", type=Path, default=None, help="also write the results here")
    b.set_defaults(func=cmd_bench)

    cmp = sub.add_parser("compare", help="run the same inputs through two backends and report "
                         "the error per component and timestep variant",
                         description="Generate one image on --reference, recording every "
                         "component call (text encoder, each denoiser step, VAE, ECAR stages), "
                         "then replay those exact inputs on --candidate and report max |error| "
                         "and SQNR per component, variant and output. Default: the bundle's "
                         "TensorRT engines against ONNX Runtime running the Q/DQ graph as "
                         "written (ort-reference).")
    cmp.add_argument("bundle", type=Path)
    cmp.add_argument("--reference", default="ort-reference", choices=list(BACKENDS))
    cmp.add_argument("--candidate", default="trt", choices=list(BACKENDS))
    cmp.add_argument("--steps", type=int, default=None, help="sampler steps (default: the bundle's)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    cmp.add_argument("--min-sqnr", type=float, default=None,
                     help="exit with status 2 if any output's SQNR is below this (dB)")
    cmp.add_argument("--json", type=Path, default=None, help="write the rows here")
    cmp.set_defaults(func=cmd_compare)

    e = sub.add_parser("eval", help="quality of a bundle: PSNR/SSIM vs an FP bundle, Frechet "
                       "distance, prompt accuracy",
                       description="Generate the fixed evaluation set (refdata.eval_prompts) "
                       "from a reference-model bundle and score it: PSNR and SSIM against "
                       "the same images from --reference (same prompts, seeds, steps), "
                       "Frechet distance of attribute-classifier features against real "
                       "pictures, and the fraction of images that show the shape, colour "
                       "(and position, for text prompts) asked for, over all prompts and, "
                       "for text prompts, over those asking for combinations training never "
                       "showed (attr_acc_heldout). JSON writes infinite PSNR as \"inf\".")
    e.add_argument("bundle", type=Path)
    e.add_argument("--reference", type=Path, default=None,
                   help="FP bundle of the same model (without it psnr/ssim are null)")
    e.add_argument("--json", type=Path, default=None, help="write the results here")
    e.add_argument("--n-images", type=int, default=64, help="images generated per bundle")
    e.add_argument("--seed", type=int, default=0, help="image i uses noise seeded SEED+i")
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the bundle's)")
    e.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the bundle's)")
    e.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide only the steps at timesteps LO..HI (0..999), the others unguided "
                   "(default: the bundle's; 0 inf guides every step)")
    e.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("plan-memory", help="will a bundle's TensorRT engines fit on a device?",
                       description="Estimate engine weights (x timestep variants), "
                       "activations, workspace and runtime overhead against a device's memory "
                       "(shared with the CPU on Jetson) and say whether it fits.")
    m.add_argument("bundle", type=Path)
    m.add_argument("--device", required=True, help="orin-nano-4gb, orin-nano-8gb, orin-nx-8gb, "
                   "orin-nx-16gb, agx-orin-32gb, agx-orin-64gb, rtx-3090, rtx-4080, rtx-4090, ...")
    m.add_argument("--workspace-mb", type=int, default=None, help="builder workspace limit (MiB)")
    m.add_argument("--json", type=Path, default=None)
    m.set_defaults(func=cmd_plan_memory)
    _add_calib_parsers(sub)
    _add_plan_parser(sub)
    _add_encode_prompts_parser(sub)
    _add_check_parser(sub)
    return p


@fail_cleanly
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, recorded in what a command writes (effgen plan)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
