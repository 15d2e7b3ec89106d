"""`effgen`: generate, verify and benchmark bundles.

Commands that only read bundles import the torch-free runtime; nothing here loads torch
unless a command needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


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


def load_prompt_embeds(path: Path) -> dict[str, np.ndarray]:
    """`.npy` (the prompt states) or `.safetensors` (named arrays, see DenoisePipeline)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings file {path} does not exist")
    if path.suffix == ".npy":
        return {"prompt_embeds": np.load(path, allow_pickle=False)}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    raise ValueError(f"{path}: prompt embeddings must be a .npy or .safetensors file")


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
        n = args.num_images or 1
        cond = {"prompt_embeds": load_prompt_embeds(args.prompt_embeds)}
    elif args.class_label:
        n = args.num_images or len(args.class_label)
        labels = (args.class_label * n)[:n]
        cond = {"class_label": labels}
    else:
        raise ValueError("give --prompt, --prompt-embeds or --class-label")
    t0 = time.perf_counter()
    images = pipe.generate(num_images=n, seed=args.seed, steps=args.steps, guidance=args.guidance,
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

    result = bench_bundle(args.bundle, steps=args.steps, images=args.images,
                          repeat=args.repeat, threads=args.threads)
    for k, v in result.items():
        print(f"{k:>20}: {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_eval(args) -> int:
    from .metrics import evaluate_bundle, write_json

    result = evaluate_bundle(args.bundle, reference=args.reference, n_images=args.n_images,
                             seed=args.seed, threads=args.threads, steps=args.steps)
    shown = {"psnr": "PSNR vs reference (dB)", "ssim": "SSIM vs reference",
             "fd": "Frechet distance vs real", "attr_acc": "shape+colour+position acc",
             "class_acc": "shape+colour acc", "n_images": "images"}
    print(f"{result['model']} ({args.bundle}), {result['steps']} steps, seed {args.seed}")
    for key, label in shown.items():
        value = result[key]
        text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"  {label:>26}: {text}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effgen", description="Generate images from effgen bundles and check them. "
        "Bundles are made by `effgen-export MODEL --out DIR`.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a bundle into PNG files",
                       description="Run a bundle's denoising loop on ONNX Runtime and write "
                       "one PNG per image plus grid.png.")
    g.add_argument("bundle", type=Path)
    cond = g.add_mutually_exclusive_group(required=True)
    cond.add_argument("--prompt", action="append", help="text prompt (repeat for several)")
    cond.add_argument("--prompt-embeds", type=Path,
                      help="precomputed text states: .npy, or .safetensors with prompt_embeds "
                      "[, prompt_attention_mask, negative_prompt_embeds, ...]")
    cond.add_argument("--class-label", type=int, nargs="+", help="class id(s) for class-conditional models")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--num-images", type=int, default=None,
                   help="images to make (default: one per prompt/label)")
    g.add_argument("--seed", type=int, default=0, help="image i uses noise seeded SEED+i")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: the bundle's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    g.add_argument("--out", type=Path, default=Path("out"), help="directory for the PNGs")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="check every file of a bundle against its sha256")
    v.add_argument("bundle", type=Path)
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("bench", help="latency per denoiser step and per image, memory, weight bytes",
                       description="Measure a bundle on ONNX Runtime: median latency of one "
                       "denoiser call and of one whole image, peak resident memory and the "
                       "bytes of its weights.")
    b.add_argument("bundle", type=Path)
    b.add_argument("--steps", type=int, default=None, help="sampler steps per image")
    b.add_argument("--images", type=int, default=2, help="images timed")
    b.add_argument("--repeat", type=int, default=10, help="denoiser calls timed")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--json", type=Path, default=None, help="also write the results here")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="quality of a bundle: PSNR/SSIM vs an FP bundle, Frechet "
                       "distance, prompt accuracy",
                       description="Generate the fixed evaluation set (refdata.eval_prompts) "
                       "from a reference-model bundle and score it: PSNR and SSIM against "
                       "the same images from --reference (same prompts, seeds, steps), "
                       "Frechet distance of attribute-classifier features against real "
                       "pictures, and the fraction of images that show the shape, colour "
                       "(and position, for text prompts) asked for. JSON writes infinite "
                       "PSNR as \"inf\".")
    e.add_argument("bundle", type=Path)
    e.add_argument("--reference", type=Path, default=None,
                   help="FP bundle of the same model (without it psnr/ssim are null)")
    e.add_argument("--json", type=Path, default=None, help="write the results here")
    e.add_argument("--n-images", type=int, default=64, help="images generated per bundle")
    e.add_argument("--seed", type=int, default=0, help="image i uses noise seeded SEED+i")
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the bundle's)")
    e.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    e.set_defaults(func=cmd_eval)
    return p


@fail_cleanly
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
