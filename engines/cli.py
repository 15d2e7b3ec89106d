"""`effgen-build BUNDLE --target desktop|orin`: TensorRT engines for a bundle, built on the
device that will run them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import fail_cleanly
from .targets import BUILD_TARGETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effgen-build",
        description="Build one TensorRT engine per variant of every component of a bundle "
        "(strongly typed for quantized graphs), write them to BUNDLE/engines/ and record the "
        "TensorRT version, GPU and each engine's sha256 in the manifest. Engines are not "
        "portable: run this on the device (e.g. the Jetson) that will use them.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--target", choices=BUILD_TARGETS, default="desktop",
                   help="name the engines are recorded under (orin for Jetson Orin)")
    p.add_argument("--workspace-mb", type=int, default=None,
                   help="limit of the builder's scratch memory (MiB); lower it on Orin Nano")
    p.add_argument("--optimization-level", type=int, default=3,
                   help="TensorRT builder optimization level 0-5 (higher: slower build, maybe faster engine)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file, read if present and written back: repeat builds are faster")
    p.add_argument("--emit-trtexec", action="store_true",
                   help="print the equivalent trtexec commands instead of building")
    return p


@fail_cleanly
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..runtime.bundle import Bundle
    from .build import BuildOptions, build_engines, trtexec_commands

    options = BuildOptions(target=args.target, workspace_mb=args.workspace_mb,
                           optimization_level=args.optimization_level,
                           timing_cache=args.timing_cache)
    if args.emit_trtexec:
        bundle = Bundle.load(args.bundle)
        print(f"# run in {args.bundle}. These engines serve trtexec/C++ deployments; effgen's trt "
              "backend needs TensorRT's Python package, and where it exists effgen-build builds "
              "and records the engines itself.")
        print("mkdir -p engines")
        for cmd in trtexec_commands(bundle, options):
            print(cmd)
        return 0
    info = build_engines(args.bundle, options)
    print(f"engines for '{args.target}' built with TensorRT {info['tensorrt']} on {info['gpu']} "
          f"(sm {info['compute_capability']}) -> {args.bundle}/engines/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
