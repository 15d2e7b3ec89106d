"""The few CUDA runtime calls the TensorRT path needs, through cuda-python (no torch).

cuda-python returns `(error, *results)` from every call; `check` turns an error into an
exception naming the call.
"""

from __future__ import annotations

import numpy as np


def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise ImportError("the TensorRT backend needs cuda-python (pip install cuda-python)") from None
    return runtime


def check(result, what: str):
    rt = cudart()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {rt.cudaGetErrorString(err)[1].decode()}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def get_device_properties(device: int = 0) -> dict:
    rt = cudart()
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}


class DeviceBuffer:
    """One device allocation for a tensor of fixed shape and dtype, made once and reused."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = check(cudart().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc")

    def upload(self, array: np.ndarray, stream) -> None:
        rt = cudart()
        a = np.ascontiguousarray(array, dtype=self.dtype)
        if a.shape != self.shape:
            raise ValueError(f"expected shape {self.shape}, got {a.shape}")
        check(rt.cudaMemcpyAsync(self.ptr, a.ctypes.data, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync")

    def download(self, stream) -> np.ndarray:
        rt = cudart()
        out = np.empty(self.shape, self.dtype)
        check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync")
        return out

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0
