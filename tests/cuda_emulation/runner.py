"""A :class:`pclayer.cuda.ops.KernelRunner` that runs pclayer's kernels in the CPU emulator.

Launches built by :mod:`pclayer.cuda.ops` (the same code the GPU path uses) run here on CPU
torch tensors, viewed as numpy arrays without copies.
"""

from __future__ import annotations

from pathlib import Path

import pclayer.cuda
import torch

from cuda_emulation.emulator import Emulator, parse_kernels

KERNEL_DIR = Path(pclayer.cuda.__file__).resolve().parent
KERNEL_SOURCES = sorted(KERNEL_DIR.glob("*.cu"))


class EmulatorRunner:
    """Runs each launch in an :class:`Emulator` of every pclayer kernel; records kernel names."""

    def __init__(self, thread_order: str = "index", seed: int = 0, sanitize: bool = False):
        self.emulator = Emulator(KERNEL_SOURCES, thread_order=thread_order, seed=seed, sanitize=sanitize)
        self.launched: list[str] = []
        self._defined = {path.name: set(parse_kernels(path.read_text())) for path in KERNEL_SOURCES}

    def __call__(self, source: str, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: tuple) -> None:
        if kernel not in self._defined.get(source, ()):
            raise KeyError(f"kernel {kernel!r} is not defined in {source!r}")
        for a in args:  # the rule of torch's __cuda_array_interface__, which cupy.asarray goes through
            if isinstance(a, torch.Tensor) and a.requires_grad:
                raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad. "
                                   "If gradients aren't required, use var.detach() to get Variable that doesn't require grad.")
        arrays = tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in args)
        self.emulator.get_function(kernel)(grid, block, arrays)
        self.launched.append(kernel)


def mutated_emulator(directory: Path, source: str, old: str, new: str, thread_order: str, seed: int = 0) -> Emulator:
    """An :class:`Emulator` of the kernel file ``source`` with its one occurrence of ``old``
    replaced by ``new`` (written with the kernel headers into ``directory``): a mutation
    check's broken kernel."""
    text = (KERNEL_DIR / source).read_text()
    assert text.count(old) == 1, f"{source}: expected exactly one {old!r}"
    for header in KERNEL_DIR.glob("*.h"):
        (directory / header.name).write_text(header.read_text())
    (directory / source).write_text(text.replace(old, new))
    return Emulator([directory / source], thread_order=thread_order, seed=seed)
