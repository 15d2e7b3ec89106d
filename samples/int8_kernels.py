"""What INT8 can buy on this CPU: ONNX Runtime's CPU kernels for a PixArt block stack's
matrix products, FP32 against the integer forms, timed in one run.

    .venv/bin/python samples/int8_kernels.py --json out/int8_kernels.json [--threads 2]

The bench table's W8A8 step (samples/bench_table.py) is mostly these kernels: on
pixart-alpha-512 the Linear layers are 80% of an FP32 denoiser call (`effgen bench BUNDLE
--profile`). So the integer kernels' speed-up over FP32 on the model's own shapes bounds the
step ratio an int8 graph can reach here when everything else in the call (attention,
norms) stays as it is:

    step ratio >= (1 - f) + f / speedup      (f: the FP32 call's share in those GEMMs)

Linear (one batch-2 call, i.e. classifier-free guidance, at `--tokens` image tokens): the
Linear layers of `--blocks` PixArt blocks chained in order (self-attention q, k, v, out,
cross-attention q, out, FFN in and out; the cross-attention's k, v read the text tokens, <1%
of the products, and are left out), each with its own weights, so each call streams its
weights from memory as the whole model does (a layer timed alone can keep its weights in
cache, which the model cannot; measured here, the difference was within the noise):
  fp32         MatMul with constant FP32 weights (MLAS SGEMM, weights pre-packed)
  effgen-u8s8  effgen's ort-cpu form (exporter/qdq.py integer_matmuls): the timestep group's
               scale Gather'ed at run time, QuantizeLinear(uint8, zero point 128) ->
               MatMulInteger(int8 weight) -> Cast -> Mul, fused by ONNX Runtime into
               MatMulIntegerToFloat (the ops it runs are printed)
  qdq-s8s8     TensorRT's Q/DQ form (int8 activation, zero point 0) opened by ONNX Runtime
  ort-dynamic  onnxruntime.quantization.quantize_dynamic of the fp32 graph
               (DynamicQuantizeMatMul: each activation's range measured per call)
  ort-nbits4   onnxruntime's MatMulNBitsQuantizer, 4-bit block 32, accuracy_level 4
Attention (`--heads` heads at `--tokens` tokens):
  fp32         softmax(q k^T / sqrt(d)) v as MatMul / Softmax / MatMul
  qdq-int8     the same with q, k, v and the probabilities through int8/uint8 Q/DQ (ONNX
               Runtime fuses both products into MatMulIntegerToFloat)
  ort-mha      com.microsoft.MultiHeadAttention (ONNX Runtime's fused CPU kernel)

Median ms of `--repeat` calls, the methods' calls interleaved; speed-up against FP32 and, for
the Linear layers, the bound above at `--gemm-share` (default 0.80, pixart-alpha-512's FP32
profile here). The CPU's vector extensions are recorded: without AVX-512 VNNI / AVX-VNNI,
x86 int8 products go through VPMADDUBSW and gain far less over FP32 than with them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_info() -> dict:
    flags, name = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": name, "cores": os.cpu_count(), **{f: f in flags for f in CPU_FLAGS}}


def _model(nodes, inputs, inits, opset=21, ms_domain=False):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "kernel", [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "group"
                                                                             else TensorProto.FLOAT, s)
                                                for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms_domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def linear_models(m: int, dims: list[int], rng, tmp: Path) -> dict:
    """method -> ONNX model of the chain x -> Linear(dims[0], dims[1]) -> Linear(dims[1],
    dims[2]) -> ... for x (1, m, dims[0]), every layer its own weight, as the layers of a
    block stack follow each other: together far larger than the CPU's caches, so each call
    streams its weights from memory as the whole model does."""
    from onnx import TensorProto, helper, numpy_helper as nh

    x_amax = 4.0
    fp_nodes, fp_inits, u8_nodes, s8_nodes = [], [], [], []
    qinits = [nh.from_array(np.array(x_amax / 127, np.float32), "xs"),
              nh.from_array(np.full(2, x_amax / 127, np.float32), "xs_by_group"),
              nh.from_array(np.array(128, np.uint8), "xz_u8"), nh.from_array(np.array(0, np.int8), "xz_s8"),
              nh.from_array(np.array(0, np.int8), "wz"),
              # the call's timestep group's activation scale, picked at run time (Gather), so the
              # scale product stays a Mul node, which is what ONNX Runtime's fusion matches
              ]
    u8_nodes.append(helper.make_node("Gather", ["xs_by_group", "group"], ["xs_g"], axis=0))
    x = "x"
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        y = "y" if i == len(dims) - 2 else f"h{i}"
        w = (rng.standard_normal((k, n)) * k ** -0.5).astype(np.float32)
        w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        bias = (rng.standard_normal(n) * 0.01).astype(np.float32)
        fp_inits += [nh.from_array(w, f"W{i}"), nh.from_array(bias, f"b{i}")]
        qinits += [nh.from_array(np.round(w / w_scale).astype(np.int8), f"Wq{i}"),
                   nh.from_array(w_scale, f"ws{i}"), nh.from_array(np.zeros(n, np.int8), f"wz{i}"),
                   nh.from_array(bias, f"b{i}"), nh.from_array(bias[None], f"b2d{i}")]
        # a Linear's bias, as exported: it also keeps one layer's output quantization from
        # fusing into the previous layer's kernel, which a bare chain would allow
        fp_nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"mm{i}"]),
                     helper.make_node("Add", [f"mm{i}", f"b{i}"], [y])]
        # effgen's ort-cpu form (exporter/qdq.py integer_matmuls), bias 1-D
        u8_nodes += [helper.make_node("QuantizeLinear", [x, "xs_g", "xz_u8"], [f"xq{i}"]),
                     helper.make_node("MatMulInteger", [f"xq{i}", f"Wq{i}", "xz_u8", "wz"], [f"acc{i}"]),
                     helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
                     helper.make_node("Mul", ["xs_g", f"ws{i}"], [f"s{i}"]),
                     helper.make_node("Mul", [f"accf{i}", f"s{i}"], [f"mm{i}"]),
                     helper.make_node("Add", [f"mm{i}", f"b{i}"], [y])]
        # TensorRT's Q/DQ form, bias [1, N] (exporter/qdq.py bias_to_2d)
        s8_nodes += [helper.make_node("QuantizeLinear", [x, "xs", "xz_s8"], [f"xq{i}"]),
                     helper.make_node("DequantizeLinear", [f"xq{i}", "xs", "xz_s8"], [f"xd{i}"]),
                     helper.make_node("DequantizeLinear", [f"Wq{i}", f"ws{i}", f"wz{i}"], [f"Wd{i}"], axis=1),
                     helper.make_node("MatMul", [f"xd{i}", f"Wd{i}"], [f"mm{i}"]),
                     helper.make_node("Add", [f"mm{i}", f"b2d{i}"], [y])]
        x = y
    inputs = [("x", [1, m, dims[0]])]
    fp32 = _model(fp_nodes, inputs, fp_inits)
    out = {"fp32": fp32, "effgen-u8s8": _model(u8_nodes, inputs + [("group", [])], qinits),
           "qdq-s8s8": _model(s8_nodes, inputs, qinits)}

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dyn = tmp / "fp32.onnx", tmp / "dynamic.onnx"
    onnx.save(fp32, src)
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process the graph first
    quantize_dynamic(str(src), str(dyn), weight_type=QuantType.QInt8)
    out["ort-dynamic"] = onnx.load(dyn)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        out["ort-nbits4"] = q.model.model
    except ImportError as e:  # older onnxruntime: the row says why
        print(f"ort-nbits4 left out: {e}", file=sys.stderr)
    return out


def attention_models(b: int, heads: int, tokens: int, d: int) -> dict:
    from onnx import helper, numpy_helper as nh

    c = heads * d
    inputs = [(n, [b, tokens, c]) for n in "qkv"]
    split = [nh.from_array(np.array([b, tokens, heads, d], np.int64), "split"),
             nh.from_array(np.array([b, tokens, c], np.int64), "merge"),
             nh.from_array(np.array(d ** -0.5, np.float32), "scale")]

    def heads_of(quantize: bool):
        nodes, inits = [], list(split)
        names = {}
        for t, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            nodes += [helper.make_node("Reshape", [t, "split"], [t + "_r"]),
                      helper.make_node("Transpose", [t + "_r"], [t + "_h"], perm=perm)]
            names[t] = t + "_h"
        nodes.append(helper.make_node("Mul", [names["q"], "scale"], ["q_s"]))
        names["q"] = "q_s"

        def qdq(t, scale, zp_type, zp):
            inits.extend([nh.from_array(np.array(scale, np.float32), t + "_qs"),
                          nh.from_array(np.array(zp, zp_type), t + "_qz")])
            nodes.extend([helper.make_node("QuantizeLinear", [t, t + "_qs", t + "_qz"], [t + "_q"]),
                          helper.make_node("DequantizeLinear", [t + "_q", t + "_qs", t + "_qz"], [t + "_dq"])])
            return t + "_dq"

        q, k = names["q"], names["k"]
        if quantize:
            q, k = qdq(q, 4.0 / 127, np.uint8, 128), qdq(k, 4.0 / 127, np.int8, 0)
        nodes += [helper.make_node("MatMul", [q, k], ["scores"]),
                  helper.make_node("Softmax", ["scores"], ["p"], axis=-1)]
        p, v = "p", names["v"]
        if quantize:
            p, v = qdq(p, 1.0 / 255, np.uint8, 0), qdq(v, 4.0 / 127, np.int8, 0)
        nodes += [helper.make_node("MatMul", [p, v], ["o"]),
                  helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["o_t", "merge"], ["y"])]
        return _model(nodes, inputs, inits)

    mha = _model([helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                                   num_heads=heads)], inputs, [], ms_domain=True)
    return {"fp32": heads_of(False), "qdq-int8": heads_of(True), "ort-mha": mha}


def time_models(models: dict, feeds: dict, threads: int, repeat: int) -> dict[str, tuple[float, list[str]]]:
    """method -> (median ms of `repeat` calls after one warm-up, the ops ONNX Runtime runs);
    the methods' calls interleaved, so that machine load affects them alike."""
    import onnx
    import onnxruntime as ort

    sessions, ops = {}, {}
    for method, model in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.log_severity_level = 3
            so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            ops[method] = sorted({n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node})
        names = {i.name for i in sess.get_inputs()}
        sessions[method] = (sess, {k: v for k, v in feeds.items() if k in names})
        sess.run(None, sessions[method][1])
    times: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(repeat):
        for method, (sess, f) in sessions.items():
            time.sleep(0.1)  # the previous session's threads spin a while after its run
            t0 = time.perf_counter()
            sess.run(None, f)
            times[method].append(time.perf_counter() - t0)
    return {m: (statistics.median(t) * 1e3, ops[m]) for m, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--hidden", type=int, default=1152, help="pixart-alpha-512: 1152")
    p.add_argument("--ff", type=int, default=4608)
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (512 px / 8 / patch 2: 1024)")
    p.add_argument("--blocks", type=int, default=4,
                   help="blocks of layers chained, each with its own weights (4: ~300 MB of FP32)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="2: classifier-free guidance")
    p.add_argument("--gemm-share", type=float, default=0.80,
                   help="the FP32 call's share in its Linear layers (effgen bench --profile)")
    args = p.parse_args(argv)
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")

    rng = np.random.default_rng(0)
    m, c, f = args.batch * args.tokens, args.hidden, args.ff
    # A block's Linear layers at the image tokens, in order: self-attention q, k, v, out,
    # cross-attention q, out (its k, v read the text tokens: <1% of the products, left out),
    # the FFN's two layers; `--blocks` of them, each with its own weights.
    dims = [c] + ([c] * 6 + [f, c]) * args.blocks
    macs = m * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    rows: list[dict] = []
    result = {"cpu": cpu_info(), "threads": args.threads, "config": vars(args) | {"json": str(args.json)},
              "rows": rows}
    print(f"CPU: {result['cpu']}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        feeds = {"x": rng.standard_normal((1, m, c)).astype(np.float32), "group": np.array(0, np.int64)}
        timed = time_models(linear_models(m, dims, rng, Path(tmp)), feeds, args.threads, args.repeat)
        base = timed["fp32"][0]
        name = f"{args.blocks} blocks' Linear layers ({len(dims) - 1})"
        for method, (ms, ops) in timed.items():
            speedup = base / ms
            rows.append({"kernel": "linear", "shape": name, "rows": m, "macs": macs, "method": method,
                         "ms": round(ms, 3), "gmac_per_s": round(macs / ms / 1e6, 1),
                         "speedup": round(speedup, 3),
                         "step_ratio_bound": round((1 - args.gemm_share) + args.gemm_share / speedup, 3),
                         "ops": ops})
            print(f"{'linear':>10} {method:>12}: {ms:8.1f} ms  {rows[-1]['gmac_per_s']:6.1f} GMAC/s  "
                  f"x{speedup:.2f}  {ops}", file=sys.stderr)
        d = c // args.heads
        feeds = {t: rng.standard_normal((args.batch, args.tokens, c)).astype(np.float32) for t in "qkv"}
        timed = time_models(attention_models(args.batch, args.heads, args.tokens, d), feeds,
                            args.threads, args.repeat)
        base = timed["fp32"][0]
        for method, (ms, ops) in timed.items():
            rows.append({"kernel": "attention", "shape": f"{args.heads} heads x {args.tokens} tokens x {d}",
                         "method": method, "ms": round(ms, 3), "speedup": round(base / ms, 3), "ops": ops})
            print(f"{'attention':>16} {method:>12}: {ms:8.1f} ms  x{rows[-1]['speedup']:.2f}  "
                  f"{rows[-1]['ops']}", file=sys.stderr)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))

    print(f"\n{args.threads} threads, {result['cpu']['model']} "
          f"(AVX-512 VNNI: {result['cpu']['avx512_vnni']}, AVX-VNNI: {result['cpu']['avx_vnni']})")
    print(f"{args.blocks} blocks' Linear layers (batch {args.batch} x {args.tokens} tokens, width {c}, "
          f"FFN {f}); step-ratio bound at a {args.gemm_share:.0%} GEMM share of the FP32 call:\n")
    print("| method | ms | GMAC/s | speed-up vs FP32 | step ratio >= |")
    print("|---|---:|---:|---:|---:|")
    for r in (r for r in rows if r["kernel"] == "linear"):
        print(f"| {r['method']} | {r['ms']:.1f} | {r['gmac_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['step_ratio_bound']:.3f} |")
    att = [r for r in rows if r["kernel"] == "attention"]
    print("\n| attention | ms | speed-up vs FP32 |\n|---|---:|---:|")
    for r in att:
        print(f"| {r['method']} | {r['ms']:.1f} | {r['speedup']:.2f}x |")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
