"""HTML report of a mixed-precision plan (`effgen plan --report DIR`): sensitivity per layer
and candidate, the chosen precision per layer, weight bytes per transformer block.

The directory is written under a temporary name and renamed into place, so an interrupted
run never leaves a report that looks complete.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FAMILY_COLOURS = {"content": "#d95f02", "quality": "#1b9e77"}


def _short(name: str) -> str:
    return name.removeprefix("transformer.").replace("transformer_blocks.", "b")


def _block(name: str) -> str:
    m = re.search(r"transformer_blocks\.(\d+)\.", name)
    return f"block {m.group(1)}" if m else "other"


def _plots(out: Path, sens, plan: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .allocate import _weight_bytes_table
    from .cost import fp_bytes
    from .quantizers import describe

    layers = sens.layers
    labels = [describe(p) for p in sens.candidates]
    scores = plan["provenance"]["scores"]
    x = np.arange(len(layers))
    width = max(8.0, 0.22 * len(layers))
    figures = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        figures.append((name, caption))

    fig, ax = plt.subplots(figsize=(width, 4.5))
    norm = np.array([[1 - s for s in scores[n]["score"]] for n in layers])
    step = 0.8 / len(labels)
    for c, label in enumerate(labels):
        ax.bar(x - 0.4 + (c + 0.5) * step, np.maximum(norm[:, c], 1e-9), step, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, [_short(n) for n in layers], rotation=90, fontsize=7)
    for tick, n in zip(ax.get_xticklabels(), layers):
        tick.set_color(FAMILY_COLOURS[sens.family[n]])
    ax.set_ylabel("normalised loss (log)")
    metric_of = {"content": sens.meta.get("content_metric"),
                 "quality": sens.meta.get("quality_metric", "sqnr")}
    colours = {"content": "orange", "quality": "green"}
    present = [f for f in ("content", "quality") if f in set(sens.family.values())]
    ax.set_title("sensitivity per layer and candidate (labels: "
                 + ", ".join(f"{colours[f]} {f} / {metric_of[f]}" for f in present) + ")")
    ax.legend(fontsize=8)
    save(fig, "sensitivity.png", "Normalised loss of each layer quantized alone, per candidate")

    fig, ax = plt.subplots(figsize=(width, 3.5))
    chosen = [plan["layers"][n] for n in layers]
    ax.bar(x, [c["w_bits"] for c in chosen], color=[FAMILY_COLOURS[sens.family[n]] for n in layers],
           label="weight bits")
    ax.plot(x, [c["a_bits"] for c in chosen], "k_", markersize=10, label="activation bits (planned)")
    ax.set_xticks(x, [_short(n) for n in layers], rotation=90, fontsize=7)
    ax.set_ylabel("bits")
    ax.set_yticks([4, 8, 16])
    ax.set_title("chosen precision per layer")
    ax.legend(fontsize=8)
    save(fig, "bits.png", "Chosen weight bits (bars, coloured by family) and planned activation bits")

    table = _weight_bytes_table(sens)
    choice = [labels.index(scores[n]["chosen"]) for n in layers]
    blocks = sorted({_block(n) for n in layers}, key=lambda b: (b == "other", len(b), b))
    fp_b = fp_bytes(sens.target)
    per_block = {b: [0.0, 0.0] for b in blocks}
    for l, n in enumerate(layers):
        per_block[_block(n)][0] += table[l, choice[l]]
        per_block[_block(n)][1] += sens.params[n] * fp_b
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(blocks)), 3.5))
    bx = np.arange(len(blocks))
    ax.bar(bx - 0.2, [per_block[b][1] / 1e3 for b in blocks], 0.4, label="FP", color="#bbbbbb")
    ax.bar(bx + 0.2, [per_block[b][0] / 1e3 for b in blocks], 0.4, label="plan", color="#7570b3")
    ax.set_xticks(bx, blocks, fontsize=8)
    ax.set_ylabel(f"kB of Linear weights on {sens.target}")
    ax.set_title("weight bytes per block")
    ax.legend(fontsize=8)
    save(fig, "bytes_per_block.png", "Weight bytes of the allocatable layers per transformer block")
    return figures


def write_report(out_dir: str | Path, sens, plan: dict[str, Any]) -> Path:
    """index.html + PNGs for `plan` (made by allocate.mixed_precision_plan from `sens`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        figures = _plots(tmp, sens, plan)
        prov = plan["provenance"]
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{s['family']}</td><td>{html.escape(s['chosen'])}</td>"
            + "".join(f"<td>{v:.4f}</td>" for v in s["score"])
            + "".join(f"<td>{v if isinstance(v, str) else f'{v:.4g}'}</td>" for v in s["metric"])
            + "</tr>" for n, s in prov["scores"].items())
        cands = prov["candidates"]
        head = ("<tr><th>layer</th><th>family</th><th>chosen</th>"
                + "".join(f"<th>score {html.escape(c)}</th>" for c in cands)
                + "".join(f"<th>metric {html.escape(c)}</th>" for c in cands) + "</tr>")
        summary = {k: prov[k] for k in ("allocator", "solver_status", "objective", "achieved",
                                        "content_weight", "normalisation") if k in prov}
        page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>effgen plan: {html.escape(plan['model'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} pre{{background:#f6f6f6;padding:.5em}}</style></head>
<body><h1>Mixed-precision plan for {html.escape(plan['model'])} on {html.escape(plan['target'])}</h1>
<p>Budget: <code>{html.escape(json.dumps(plan.get('budget', {})))}</code>.
Sensitivity metric: <code>{html.escape(str(prov['sensitivity'].get('metric')))}</code>, losses as
the normalisation below says (metric columns: SSIM, or SQNR in dB).</p>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>
{''.join(f'<h2>{html.escape(cap)}</h2><img src="{name}" alt="{html.escape(cap)}">' for name, cap in figures)}
<h2>Per layer</h2><table>{head}{rows}</table></body></html>
"""
        (tmp / "index.html").write_text(page)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"
