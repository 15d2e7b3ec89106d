#!/usr/bin/env bash
# Build the TensorRT engines of a copied bundle on this Jetson.
#   jetson/build_engines.sh BUNDLE [extra effgen-build options]
set -euo pipefail
bundle=${1:?usage: build_engines.sh BUNDLE [--workspace-mb N]}
shift
cache=${EFFGEN_TIMING_CACHE:-$HOME/.cache/effgen/orin.timing-cache}
mkdir -p "$(dirname "$cache")"

if [ "$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)" != performance ]; then
  echo "note: clocks are not pinned; for repeatable build and benchmark times run: sudo jetson_clocks" >&2
fi
free_mb=$(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo)
swap_mb=$(awk '/SwapTotal/ {print int($2/1024)}' /proc/meminfo)
echo "available memory: ${free_mb} MB, swap: ${swap_mb} MB"

if python3 -c "import tensorrt" 2>/dev/null; then
  effgen-build "$bundle" --target orin --timing-cache "$cache" "$@"
else
  echo "TensorRT's Python package is not importable: building with trtexec" >&2
  trtexec=$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)
  ( cd "$bundle" && effgen-build . --target orin --timing-cache "$cache" --emit-trtexec "$@" \
      | grep -v '^#' | sed "s#^trtexec #$trtexec #" | bash -eux )
fi
