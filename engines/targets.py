"""Build targets and devices: what an engine is built for and how much memory a device has."""

from __future__ import annotations

from dataclasses import dataclass

# Engines are built per target; the manifest records them under these names.
BUILD_TARGETS = ("desktop", "orin")


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # physical memory; on Jetson it is shared by CPU and GPU
    reserved_gb: float  # what the OS, display stack and CUDA/TensorRT libraries take first
    compute_capability: str
    shared_memory: bool  # Jetson: one memory pool for CPU and GPU


# Jetson Orin (sm_87, JetPack 6 = TensorRT 10.3). Reserved memory: a headless JetPack 6 boot
# with the CUDA context, cuBLAS/cuDNN and the TensorRT runtime loaded takes about 1.5 GB
# (less on the smallest module, which runs fewer services); desktop GPUs have their own memory,
# of which the driver keeps a few hundred MB.
DEVICES = {d.name: d for d in [
    Device("orin-nano-4gb", 4, 1.2, "8.7", True),
    Device("orin-nano-8gb", 8, 1.5, "8.7", True),
    Device("orin-nx-8gb", 8, 1.5, "8.7", True),
    Device("orin-nx-16gb", 16, 1.5, "8.7", True),
    Device("agx-orin-32gb", 32, 1.8, "8.7", True),
    Device("agx-orin-64gb", 64, 1.8, "8.7", True),
    Device("rtx-3090", 24, 0.5, "8.6", False),
    Device("rtx-4080", 16, 0.5, "8.9", False),
    Device("rtx-4090", 24, 0.5, "8.9", False),
    Device("a100-40gb", 40, 0.5, "8.0", False),
    Device("h100-80gb", 80, 0.5, "9.0", False),
]}


def get_device(name: str) -> Device:
    if name not in DEVICES:
        import difflib

        close = difflib.get_close_matches(name, DEVICES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown device '{name}'{hint} (known: {', '.join(DEVICES)})")
    return DEVICES[name]
