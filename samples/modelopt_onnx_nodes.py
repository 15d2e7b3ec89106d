"""Cross-check effgen's TensorRT Q/DQ placement against NVIDIA ModelOpt's ONNX quantizer.

    python samples/modelopt_onnx_nodes.py pixart-ref --json out/modelopt-nodes.json

Both start from the same FP denoiser graph: effgen's `--target trt` W8A8 export
(samples/plans/w8a8.json) and `modelopt.onnx.quantization.quantize(quantize_mode="int8")`
calibrated on the denoiser inputs of real sampler runs (recorded from the FP bundle). For
every compute node (MatMul, Gemm, Conv) the script reads what each graph quantizes: the
activation input (a DequantizeLinear fed by a QuantizeLinear) and the weight input (a
DequantizeLinear of a constant), and lists the nodes where the two disagree, grouped by what
kind of node they are. It also counts Q/DQ pairs ModelOpt puts elsewhere (e.g. on the inputs of
residual Adds or of the attention softmax products).

ModelOpt's ONNX path needs its `[onnx]` extra (onnxslim, polygraphy, onnxconverter-common,
lief, cppimport; on x86 it asks for onnxruntime-gpu and cupy, which its int8 mode does not
use): not a project dependency; without it the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMPUTE = ("MatMul", "Gemm", "Conv")


def quantized_inputs(model) -> dict[str, dict[str, bool]]:
    """Compute node name -> {"act": input 0 is Q->DQ'd, "weight": input 1 is DQ of a constant}."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}

    def dq_source(tensor: str):
        n = producer.get(tensor)
        # a Transpose or Reshape between the weight DQ and the MatMul is still a weight DQ
        while n is not None and n.op_type in ("Transpose", "Reshape", "Cast"):
            n = producer.get(n.input[0])
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    def of_constant(dq) -> bool:
        # int8 stored (DQ of an initializer, effgen) or FP stored and Q->DQ'd (ModelOpt):
        # TensorRT folds either into an int8 weight at build time
        q = producer.get(dq.input[0])
        source = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]
        return source in constants or (producer.get(source) is None and source not in graph_inputs)

    graph_inputs = {i.name for i in model.graph.input}
    out = {}
    for n in model.graph.node:
        if n.op_type not in COMPUTE:
            continue
        act = dq_source(n.input[0])
        w = dq_source(n.input[1]) if len(n.input) > 1 else None
        out[n.name] = {
            "act": act is not None and not of_constant(act)
                   and getattr(producer.get(act.input[0]), "op_type", "") == "QuantizeLinear",
            "weight": w is not None and of_constant(w),
        }
    return out


def node_kind(name: str) -> str:
    """A short label for where a node sits in a PixArt/DiT block."""
    for pattern, kind in ((r"attn\d/MatMul(_1)?$", "attention score/value product (activation x activation)"),
                          (r"attn1/to_[qkv]", "self-attention q/k/v"), (r"attn2/to_q", "cross-attention q"),
                          (r"attn2/to_[kv]", "cross-attention k/v (text states)"),
                          (r"attn\d/to_out", "attention out projection"), (r"/ff/", "feed-forward"),
                          (r"adaln|norm|emb|timestep|t_embedder|caption|y_embedder", "embedding / adaLN"),
                          (r"proj_out|pos_embed|patch", "patch embed / final layer")):
        if re.search(pattern, name, flags=re.I):
            return kind
    return "other"


def q_dq_elsewhere(model) -> Counter:
    """Consumers of activation Q->DQ pairs that are not compute-node activation inputs."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in model.graph.node for o in n.output}
    seen = Counter()
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or producer.get(n.input[0]) is None:
            continue
        q = producer[n.input[0]]
        if q.op_type != "QuantizeLinear" or q.input[0] in constants or producer.get(q.input[0]) is None:
            continue  # a weight
        for c in consumers.get(n.output[0], []):
            if not (c.op_type in COMPUTE and c.input[0] == n.output[0]):
                seen[c.op_type] += 1
    return seen


def calibration_feeds(fp_bundle: Path, n_prompts: int, steps: int) -> dict[str, np.ndarray]:
    """Denoiser inputs of real sampler runs on the FP bundle, stacked along the batch."""
    from effgen.models import refdata
    from effgen.runtime import load_pipeline
    from effgen.runtime.compare import record_calls

    pipe = load_pipeline(fp_bundle)
    text = pipe.bundle.model.get("text")
    feeds: dict[str, list] = {}
    for a in refdata.eval_prompts(n_prompts, seed=999):
        cond = {"prompt": [a.caption]} if text else {"class_label": [a.class_id]}
        for call in record_calls(pipe, num_images=1, steps=steps, **cond):
            if call.component == "denoiser":
                for k, v in call.feeds.items():
                    feeds.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in feeds.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="pixart-ref")
    p.add_argument("--work", type=Path, default=None, help="where the bundles go (default: a temp dir)")
    p.add_argument("--n-calib", type=int, default=4, help="calibration prompts/labels")
    p.add_argument("--steps", type=int, default=8, help="sampler steps of the calibration runs")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        from modelopt.onnx.quantization import quantize as modelopt_quantize
    except ImportError as e:
        print(f"modelopt_onnx_nodes.py: ModelOpt's ONNX quantizer does not import here ({e}); "
              "install nvidia-modelopt with its [onnx] extra", file=sys.stderr)
        return 2
    import onnx

    from effgen.exporter.export import export_bundle

    work = args.work or Path(tempfile.mkdtemp(prefix="effgen-modelopt-"))
    fp = work / f"{args.model}-fp"
    ours = work / f"{args.model}-w8a8-trt"
    if not (fp / "manifest.json").is_file():
        export_bundle(args.model, fp, log=lambda _m: None)
    if not (ours / "manifest.json").is_file():
        export_bundle(args.model, ours, log=lambda _m: None,
                      quantize={"plan": ROOT / "samples" / "plans" / "w8a8.json", "target": "trt",
                                "n_calib": args.n_calib, "calib_steps": args.steps, "fp_bundle": fp})
    mo_path = work / f"{args.model}-modelopt-int8.onnx"
    if not mo_path.is_file():
        modelopt_quantize(str(fp / "denoiser.onnx"), quantize_mode="int8",
                          calibration_data=calibration_feeds(fp, args.n_calib, args.steps),
                          calibration_eps=["cpu"], output_path=str(mo_path), log_level="WARNING")
    theirs = quantized_inputs(onnx.load(str(mo_path), load_external_data=False))
    variant0 = json.loads((ours / "manifest.json").read_text())["components"]["denoiser"]["variants"][0]["onnx"]
    mine = quantized_inputs(onnx.load(str(ours / variant0), load_external_data=False))

    rows, differences = [], Counter()
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None:
            rows.append({"node": name, "effgen": a, "modelopt": b, "kind": node_kind(name),
                         "note": "node only in one graph"})
            continue
        if a != b:
            kind = node_kind(name)
            differences[(kind, json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True))] += 1
            rows.append({"node": name, "effgen": a, "modelopt": b, "kind": kind})
    both = sum(1 for n in mine if mine[n]["act"] and theirs.get(n, {}).get("act"))
    summary = {
        "model": args.model,
        "compute_nodes": len(mine),
        "effgen_quantized": sum(v["act"] or v["weight"] for v in mine.values()),
        "modelopt_quantized": sum(v["act"] or v["weight"] for v in theirs.values()),
        "both_activation_quantized": both,
        "differences": [{"kind": k, "effgen": json.loads(a), "modelopt": json.loads(b), "nodes": n}
                        for (k, a, b), n in sorted(differences.items())],
        "modelopt_qdq_elsewhere": dict(q_dq_elsewhere(onnx.load(str(mo_path), load_external_data=False))),
        "effgen_qdq_elsewhere": dict(q_dq_elsewhere(onnx.load(str(ours / variant0), load_external_data=False))),
        "rows": rows,
    }
    print(f"{args.model}: {summary['compute_nodes']} MatMul/Gemm/Conv nodes; effgen quantizes "
          f"{summary['effgen_quantized']}, ModelOpt {summary['modelopt_quantized']}, both quantize "
          f"the activation of {both}")
    print("| where | effgen (act, weight) | ModelOpt (act, weight) | nodes |\n|---|---|---|---|")
    for d in summary["differences"]:
        e, m = d["effgen"], d["modelopt"]
        print(f"| {d['kind']} | {e['act']:d}, {e['weight']:d} | {m['act']:d}, {m['weight']:d} | {d['nodes']} |")
    print(f"Q/DQ feeding other ops: ModelOpt {summary['modelopt_qdq_elsewhere']}, "
          f"effgen {summary['effgen_qdq_elsewhere']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
