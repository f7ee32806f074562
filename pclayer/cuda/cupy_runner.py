"""Run pclayer's kernels with cupy on torch CUDA tensors (imported only when needed).

Kernels load from the precompiled fatbins in ``bin/`` (built by :mod:`pclayer.cuda.build`);
if a fatbin is missing or the driver rejects it, the .cu source is compiled at run time with
NVRTC (needs the ``nvidia-cuda-nvrtc`` wheel or a CUDA toolkit). Torch tensors are wrapped
with ``cupy.asarray`` (zero copy) and every launch goes to torch's current stream.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).resolve().parent
BIN_DIR = KERNEL_DIR / "bin"


def unavailable_reason() -> str | None:
    """None if cupy imports and can use a CUDA device, else why not (never raises)."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a broken install raising anything else
        return f"cupy cannot be imported ({type(error).__name__}: {error})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "cupy found no CUDA device"
        cupy.zeros(1)
    except Exception as error:  # e.g. CUDARuntimeError: cudaErrorInsufficientDriver
        return f"cupy cannot use CUDA ({type(error).__name__}: {error})"
    return None


class CupyRunner:
    """A :class:`pclayer.cuda.ops.KernelRunner` launching with cupy on torch's current stream."""

    def __init__(self) -> None:
        import cupy

        self._cupy = cupy
        self._modules: dict[tuple[str, int], object] = {}
        self.sources: dict[str, str] = {}  # .cu file -> "fatbin" or "nvrtc", as loaded

    def _load(self, source: str):
        cupy = self._cupy
        fatbin = BIN_DIR / f"{Path(source).stem}.fatbin"
        if fatbin.exists():
            try:
                module = cupy.RawModule(path=str(fatbin))
                module.get_function(next(iter(_kernel_names(source))))  # forces the driver to load it
                self.sources[source] = "fatbin"
                return module
            except Exception:  # no cubin or compatible PTX for this GPU / driver: compile instead
                pass
        module = cupy.RawModule(code=(KERNEL_DIR / source).read_text(), options=(f"-I{KERNEL_DIR}", "--std=c++17"))
        self.sources[source] = "nvrtc"
        return module

    def __call__(self, source: str, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: tuple) -> None:
        cupy = self._cupy
        device = next(a.device.index for a in args if isinstance(a, torch.Tensor))
        with cupy.cuda.Device(device):
            key = (source, device)
            if key not in self._modules:
                self._modules[key] = self._load(source)
            function = self._modules[key].get_function(kernel)
            converted = tuple(cupy.asarray(a) if isinstance(a, torch.Tensor) else a for a in args)
            with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
                function(grid, block, converted)


def _kernel_names(source: str) -> list[str]:
    """Names of the ``extern "C" __global__`` kernels defined in a .cu file."""
    text = (KERNEL_DIR / source).read_text()
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', text)
