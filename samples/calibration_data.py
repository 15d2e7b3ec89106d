"""What calibrating on the wrong text states costs: pixart-ref quantized with scales from its
own encoder's states of the held-out captions (the default) against scales from seeded
Gaussian states of the same captions (what effgen gave a T5-conditioned checkpoint before
`effgen encode-prompts`, and still gives the random-weight architectures).

    .venv/bin/python samples/calibration_data.py --json out/calibration_data.json [--n-images 64]

Both runs are samples/quality_table.py on pixart-ref (target trt, same noise, same images;
the second with --calib-prompts pointing at a text states file of the Gaussian states). Prints
a markdown table of PSNR / SSIM / attr_acc against FP for each method and calibration data.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_gaussian_states(path: Path, model: str, n: int) -> None:
    """A text states file of the seeded Gaussian states calib.stats gives captions of a model
    whose encoder effgen does not run (zero negative states behind one valid token)."""
    from safetensors.numpy import save_file

    from effgen.calib.stats import _seeded_states, calibration_items
    from effgen.models.configs import get_spec

    spec = get_spec(model)
    captions = calibration_items(spec, n)
    states = np.stack([_seeded_states(c, spec.text.max_length, spec.text.dim).numpy() for c in captions])
    negative_mask = np.zeros((1, spec.text.max_length), np.float32)
    negative_mask[0, 0] = 1
    save_file({"prompt_embeds": states.astype(np.float32),
               "prompt_attention_mask": np.ones(states.shape[:2], np.float32),
               "negative_prompt_embeds": np.zeros((1, *states.shape[1:]), np.float32),
               "negative_prompt_attention_mask": negative_mask}, str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--methods", nargs="+", default=["vidit-w8a8", "vidit-w4a8"])
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from effgen.metrics import write_json

    quality_table = runpy.run_path(str(HERE / "quality_table.py"))["main"]
    model = "pixart-ref"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        states = Path(tmp) / "gaussian-states.safetensors"
        write_gaussian_states(states, model, args.n_calib)
        for label, extra in [("encoder states", []), ("Gaussian states", ["--calib-prompts", str(states)])]:
            out = Path(tmp) / "rows.json"
            common = ["--json", str(out), "--models", model, "--methods", "fp", *args.methods,
                      "--n-images", str(args.n_images), "--n-calib", str(args.n_calib),
                      "--threads", str(args.threads)] + (["--steps", str(args.steps)] if args.steps else [])
            if quality_table(common + extra) != 0:
                return 1
            for row in json.loads(out.read_text())["rows"]:
                if row["method"] != "fp":
                    rows.append({**row, "calibration_data": label})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, rows)
    print("\n| method | calibrated on | PSNR dB | SSIM | attr_acc | -/+ vs FP |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['method']} | {r['calibration_data']} | skipped: {r['skipped']} | | | |")
            continue
        print(f"| {r['method']} | {r['calibration_data']} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
              f"{r['attr_acc']:.2f} | -{r['acc_lost']}/+{r['acc_gained']} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
