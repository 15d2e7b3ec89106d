"""What each planned precision becomes on each target (DESIGN §3): one table, used by the
calibrator (to simulate what ships) and by the exporter (to lower what ships).

Pure Python, like plan.py: the exporter reads it without torch.
"""

from __future__ import annotations

import dataclasses

from .plan import FP, TARGETS, LayerPrecision, PlanError

KINDS = ("linear", "conv")
# Weight bits of an int8 GEMM on ONNX Runtime CPU (see effective_precision).
ORT_CPU_INT8_WEIGHT_BITS = 7


def int4_block_size(prec: LayerPrecision, k: int) -> int:
    """The K block of a 4-bit weight as exported: its own block, or for a per-channel one the
    largest of 128/64/32/16 that divides K (TensorRT and ONNX Runtime take INT4 blocked only;
    the channel's scale repeats). On ONNX Runtime CPU, MatMulNBits (accuracy_level 4) also
    quantizes its input to int8 per row in blocks of this size."""
    if prec.block_size:
        return prec.block_size
    return next((b for b in (128, 64, 32, 16) if k % b == 0), k)


def effective_precision(prec: LayerPrecision, kind: str, target: str) -> LayerPrecision:
    """The precision a layer of `kind` ("linear" | "conv") planned at `prec` really runs at on
    `target` ("ort-cpu" | "trt" | "trt-orin").

    - FP stays FP (fp32 on ONNX Runtime CPU, fp16 on TensorRT: the simulation runs fp32).
    - 4-bit activations do not exist on any target: A4 -> A8.
    - Conv: no 4-bit convolution anywhere (TensorRT: not supported; ONNX Runtime: no blocked
      int4 Conv): W4 -> W8 per output channel; a blocked conv weight -> per channel. On
      ONNX Runtime CPU a Conv stays FP: its QDQ Conv fuses (QLinearConv) only with a quantized
      output, which the plan does not have; unfused it is slower than FP32 (DESIGN §9).
    - TensorRT (desktop and Orin): no INT4 x INT8 GEMM, so a W4 Linear runs INT4 weight-only
      (W4A16, activations not quantized); per-token dynamic activations are lowered to one
      static per-tensor scale per timestep group.
    - ONNX Runtime CPU: a W4 Linear with quantized activations becomes
      DQ(int4, block) -> MatMulNBits with accuracy_level 4, which quantizes its input to int8
      dynamically per row in blocks of the weight's K block, inside the op: simulated so
      (per token, per K block; see int4_block_size). W8 layers
      with quantized activations are U8S8 QDQ (MatMulIntegerToFloat / QGemm) with the
      weights on a 7-bit grid (W7: int8 storage, |q| <= 64), per-token activations lowered to
      static per-tensor per group. MLAS's U8S8 kernel on AVX2 without VNNI sums pairs of
      u8 x s8 products in int16, which full-range int8 weights overflow (255 * 127 * 2 >
      32767); 7-bit weights cannot (255 * 64 * 2 = 32640): ONNX Runtime's own `reduce_range`
      fix. Measured once (a standalone ORT microbenchmark, one thread, AVX2; numbers in
      issue 5's note): a 2048x1152x4608 GEMM ran 173-208 ms in U8S8 against 281-294 ms in
      the exact U8U8 kernel (408-443 ms FP32); samples/bench_table.py measures whole models. A W8 layer with FP
      activations (W8A16, e.g. from `effgen plan` for TensorRT) runs FP: ONNX Runtime CPU has
      no fused weight-only int8 GEMM, and an unfused DQ -> MatMul is slower than FP32.
    """
    if target not in TARGETS:
        raise PlanError(f"target: {target!r} is not one of {', '.join(TARGETS)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if prec.is_fp:
        return FP
    p = prec
    if p.a_bits == 4:
        p = dataclasses.replace(p, a_bits=8)
    if kind == "conv":
        if target == "ort-cpu":
            return FP  # DESIGN §9: ORT CPU runs Conv in fp32 (a DQ->Conv with a float output
            # does not fuse into QLinearConv and runs slower than FP32)
        if p.w_bits == 4:
            p = dataclasses.replace(p, w_bits=8)
        if p.w_granularity != "per_channel":
            p = dataclasses.replace(p, w_granularity="per_channel")
        if p.a_granularity == "per_token":
            p = dataclasses.replace(p, a_granularity="per_tensor")
        return p
    if target in ("trt", "trt-orin"):
        if p.w_bits == 4 and p.a_bits < 16:
            p = dataclasses.replace(p, a_bits=16, a_granularity="per_tensor")
        if p.a_granularity == "per_token":
            p = dataclasses.replace(p, a_granularity="per_tensor")
        return p
    # ort-cpu
    if p.w_bits == 4 and p.a_bits < 16:
        return dataclasses.replace(p, a_granularity="per_token")  # MatMulNBits, accuracy_level 4
    if p.a_granularity == "per_token":
        p = dataclasses.replace(p, a_granularity="per_tensor")
    if p.w_bits == 8 and p.a_bits >= 16:
        return FP
    if p.w_bits == 8:
        p = dataclasses.replace(p, w_bits=ORT_CPU_INT8_WEIGHT_BITS)
    return p
