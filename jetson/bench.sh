#!/usr/bin/env bash
# Latency per denoiser step and per image on this Jetson's TensorRT engines, with the peak of
# the memory the CPU and GPU share (tegrastats) next to the process's own peak.
#   jetson/bench.sh BUNDLE [--steps N]
set -euo pipefail
bundle=${1:?usage: bench.sh BUNDLE [effgen bench options]}
shift
log=$(mktemp)
if command -v tegrastats >/dev/null; then
  tegrastats --interval 200 --logfile "$log" &
  tstats=$!
  trap 'kill $tstats 2>/dev/null || true; rm -f "$log"' EXIT
fi
effgen bench "$bundle" --backend trt --json "$bundle/bench-orin.json" "$@"
if [ -n "${tstats:-}" ]; then
  kill "$tstats" 2>/dev/null || true
  peak=$(grep -o 'RAM [0-9]*/' "$log" | tr -dc '0-9\n' | sort -n | tail -1)
  echo "peak RAM in use on the device (tegrastats): ${peak} MB"
fi
