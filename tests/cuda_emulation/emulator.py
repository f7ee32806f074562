"""Compile unchanged CUDA C kernels with g++ and launch them on numpy arrays like cupy does.

``Emulator(sources).get_function(name)(grid, block, args)`` mirrors
``cupy.RawModule(...).get_function(name)(grid, block, args)``: ``args`` are C-contiguous numpy
arrays for pointer parameters and numpy scalars of the exact C type for value parameters
(``numpy.int32`` for ``int``, ``numpy.int64`` for ``long long``), checked against the kernel's
signature parsed from the source. Each block's threads run as fibers that switch at
``__syncthreads`` and at warp-level operations (``scheduler.cpp``), picked in ``thread_order``
"index", "reversed" or "shuffled" (blocks too), on one OS thread. The shared library is cached in the temp directory, keyed by a hash of every input.
Floating point is contracted as on a GPU: ``a*b+c`` compiles to one fused multiply-add
(``-ffp-contract=fast -mfma``, nvcc's default ``--fmad=true``), and ``expf``/``logf``/``exp``/``log``
err within CUDA's documented ulp bounds. Warp-level operations (shuffles, ballot,
``__syncwarp``) are emulated with CUDA's lane arithmetic (``cuda_emu.h``).
``sanitize=True`` builds with AddressSanitizer; such a library only loads in a process started
with the ASan runtime preloaded (see :func:`asan_environment`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emu.h"
SCHEDULER = HERE / "scheduler.cpp"
THREAD_ORDERS = {"index": 0, "reversed": 1, "shuffled": 2}
# -ffp-contract=fast -mfma: contract a*b+c into one FMA as nvcc does by default (--fmad=true); GCC forms
# FMAs in a pass that -O1 runs only with -fexpensive-optimizations
_CXXFLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-Wall", "-Wextra", "-Werror", "-ffp-contract=fast", "-mfma",
             "-fexpensive-optimizations", "-U_FORTIFY_SOURCE"]
_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_VALUE_TYPES = {
    "float": (np.float32, ctypes.c_float),
    "double": (np.float64, ctypes.c_double),
    "int": (np.int32, ctypes.c_int32),
    "unsigned int": (np.uint32, ctypes.c_uint32),
    "long long": (np.int64, ctypes.c_int64),
}
_MAX_THREADS_PER_BLOCK = 1024
_MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Param:
    """One kernel parameter: C base type, whether it is a (const) pointer, and its name."""

    base: str
    pointer: bool
    const: bool
    name: str

    @property
    def c_type(self) -> str:
        return f"{'const ' if self.const else ''}{self.base}*" if self.pointer else self.base


def parse_kernels(source: str) -> dict[str, list[Param]]:
    """Map each ``extern "C" __global__`` kernel in CUDA source text to its parameters."""
    kernels = {}
    for name, params in _SIGNATURE.findall(_COMMENT.sub("", source)):
        parsed = []
        for text in filter(None, (p.strip() for p in params.split(","))):
            tokens = text.replace("*", " * ").split()
            words = [t for t in tokens[:-1] if t not in ("const", "*", "__restrict__")]
            base = " ".join(words)
            if base not in _VALUE_TYPES:
                raise ValueError(f"kernel {name}: parameter {text!r} has a type the emulator does not support")
            parsed.append(Param(base, "*" in tokens, "const" in tokens, tokens[-1]))
        kernels[name] = parsed
    return kernels


def _thunks(source: Path, kernels: dict[str, list[Param]]) -> str:
    """A translation unit that includes ``source`` unchanged and exposes each kernel as
    ``emu_thunk_<name>(void** args)`` (cuLaunchKernel's argument convention)."""
    lines = [f'#include "{source}"']
    for name, params in kernels.items():
        call = ", ".join(f"*({p.c_type}*)args[{i}]" for i, p in enumerate(params))
        lines.append(f'extern "C" void emu_thunk_{name}(void** args) {{ {name}({call}); }}')
    return "\n".join(lines) + "\n"


def asan_environment() -> dict[str, str]:
    """Environment for a child process that loads a ``sanitize=True`` library."""
    runtime = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    return {**os.environ, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"}


def _build(sources: Sequence[Path], sanitize: bool) -> tuple[Path, dict[str, list[Param]]]:
    kernels: dict[str, list[Param]] = {}
    units = []
    for source in sources:
        found = parse_kernels(source.read_text())
        if not found:
            raise ValueError(f"{source}: no extern \"C\" __global__ kernels found")
        kernels.update(found)
        units.append((source, _thunks(source, found)))
    flags = _CXXFLAGS + (["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else [])
    digest = hashlib.sha256()
    for path in [HEADER, SCHEDULER, *sorted({p for s in sources for p in s.parent.glob("*.h")})]:
        digest.update(path.read_bytes())
    for source, thunk in units:
        digest.update(source.read_bytes() + thunk.encode())
    digest.update(" ".join(flags).encode())
    cache = Path(tempfile.gettempdir()) / "pclayer-cuda-emulator" / digest.hexdigest()[:20]
    library = cache / "libemu.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        objects = []
        for i, (source, thunk) in enumerate(units):
            wrapper = cache / f"unit{i}_{source.stem}.cpp"
            wrapper.write_text(thunk)
            objects.append(wrapper)
        partial = cache / f"libemu.{os.getpid()}.so"
        command = ["g++", *flags, "-shared", "-include", str(HEADER), *sorted({f"-I{s.parent}" for s in sources}),
                   str(SCHEDULER), *map(str, objects), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{' '.join(command)}\n{result.stderr}")
        os.replace(partial, library)
    return library, kernels


class EmulatedKernel:
    """A kernel callable as ``kernel(grid, block, args, shared_mem=0)``, as cupy's RawKernel."""

    def __init__(self, module: Emulator, name: str, params: list[Param]):
        self.module, self.name, self.params = module, name, params
        self._thunk = ctypes.cast(getattr(module.library, f"emu_thunk_{name}"), ctypes.c_void_p)

    def _argument(self, i: int, param: Param, value: object) -> ctypes._SimpleCData:
        where = f"kernel {self.name}, argument {i} ({param.c_type} {param.name})"
        dtype, ctype = _VALUE_TYPES[param.base]
        if param.pointer:
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{where}: expected a numpy array, got {type(value).__name__}")
            if value.dtype != dtype:
                raise TypeError(f"{where}: expected dtype {np.dtype(dtype)}, got {value.dtype}")
            if not value.flags.c_contiguous:
                raise TypeError(f"{where}: expected a C-contiguous array")
            if not param.const and not value.flags.writeable:
                raise TypeError(f"{where}: the kernel writes here but the array is read-only")
            return ctypes.c_void_p(value.ctypes.data)
        if type(value) is not dtype:
            raise TypeError(f"{where}: expected a numpy.{np.dtype(dtype).name} scalar, got {type(value).__name__} "
                            f"(cupy would pass a Python int as int64)")
        return ctype(value)

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0) -> None:
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        block3 = tuple(block) + (1,) * (3 - len(block))
        if len(grid3) != 3 or any(not 1 <= g <= m for g, m in zip(grid3, _MAX_GRID)):
            raise ValueError(f"kernel {self.name}: grid {grid} outside CUDA limits (1..{_MAX_GRID})")
        if len(block3) != 3 or min(block3) < 1 or np.prod(block3) > _MAX_THREADS_PER_BLOCK:
            raise ValueError(f"kernel {self.name}: block {block} must have 1..{_MAX_THREADS_PER_BLOCK} threads")
        if shared_mem != 0:
            raise ValueError(f"kernel {self.name}: dynamic shared memory is not emulated")
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name}: expected {len(self.params)} arguments, got {len(args)}")
        values = [self._argument(i, p, a) for i, (p, a) in enumerate(zip(self.params, args))]
        argv = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        error = ctypes.create_string_buffer(512)
        status = self.module.library.emu_launch(self._thunk, argv, *map(ctypes.c_uint, grid3 + block3),
                                                THREAD_ORDERS[self.module.thread_order], ctypes.c_ulonglong(self.module.seed),
                                                error, ctypes.c_size_t(len(error)))
        if status != 0:
            raise RuntimeError(f"kernel {self.name}: {error.value.decode()}")


class Emulator:
    """The kernels of ``sources`` (.cu files) compiled for the CPU, as cupy's RawModule."""

    def __init__(self, sources: Sequence[Path], *, thread_order: str = "index", seed: int = 0, sanitize: bool = False):
        if thread_order not in THREAD_ORDERS:
            raise ValueError(f"thread_order: expected one of {sorted(THREAD_ORDERS)}, got {thread_order!r}")
        self.thread_order, self.seed = thread_order, seed
        path, self.kernels = _build([Path(s).resolve() for s in sources], sanitize)
        self.library = ctypes.CDLL(str(path))
        self.library.emu_launch.restype = ctypes.c_int
        self._functions: dict[str, EmulatedKernel] = {}

    def get_function(self, name: str) -> EmulatedKernel:
        if name not in self.kernels:
            raise KeyError(f"kernel {name!r} not found; available: {sorted(self.kernels)}")
        if name not in self._functions:
            self._functions[name] = EmulatedKernel(self, name, self.kernels[name])
        return self._functions[name]
