"""nvcc builds every kernel for sm_80 and sm_90 with warnings as errors (reporting registers and
spills), and the shipped fatbins in pclayer/cuda/bin are complete and built from today's sources."""

from __future__ import annotations

import ctypes
import json
import re
import sys
from pathlib import Path

import pytest

from pclayer.cuda import build

INSTALL = ('pip install "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" '
           '"nvidia-cuda-runtime==13.0.*"')
SOURCES = sorted(build.KERNEL_DIR.glob("*.cu"))


def _kernel_names() -> set[str]:
    return {name for s in SOURCES for name in re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', s.read_text())}


def test_nvcc_builds_every_kernel_for_sm80_and_sm90_without_warnings_or_spills(tmp_path):
    if build.nvcc_path() is None:
        pytest.skip(f"nvcc not found on PATH; CI must run: {INSTALL}")
    reports = build.build(tmp_path)  # --Werror all-warnings: any warning fails the build
    table = "\n".join(f"{r.kernel:30s} sm_{r.arch}: {r.registers:3d} registers, spill stores/loads "
                      f"{r.spill_stores}/{r.spill_loads} bytes" for r in sorted(reports, key=lambda r: (r.kernel, r.arch)))
    print("\nptxas resource report\n" + table)
    assert {(r.kernel, r.arch) for r in reports} == {(k, a) for k in _kernel_names() for a in build.ARCHITECTURES}
    assert all(r.registers > 0 for r in reports)
    spilling = [r for r in reports if r.spill_stores or r.spill_loads]
    assert not spilling, f"register spills:\n{table}"
    # a block whose threads need more than an SM's 65,536 registers cannot launch at all
    too_many = [r for r in reports if r.registers * _block_threads(r.kernel) > 65536]
    assert not too_many, f"blocks exceeding 65,536 registers:\n{table}"


def _block_threads(kernel: str) -> int:
    """Threads per block that pclayer.cuda.ops launches ``kernel`` with."""
    from pclayer.cuda import ops

    sizes = {"pc_inverse_cdf_block": ops.CDF_BLOCK, "pc_inverse_cdf_warp": 32 * ops.CDF_WARP_ROWS,
             "pc_max_plus_fwd": 16 * 16, "pc_categorical_topk": ops.TOPK_THREADS}
    return next((threads for prefix, threads in sizes.items() if kernel.startswith(prefix)), ops.THREADS)


def test_shipped_fatbins_hold_sm80_sm90_cubins_and_ptx():
    for source in SOURCES:
        fatbin = build.BIN_DIR / f"{source.stem}.fatbin"
        assert fatbin.exists(), f"{fatbin} missing: run python -m pclayer.cuda.build"
        entries = build.fatbin_contents(fatbin)
        assert sorted(entries) == [("cubin", 80), ("cubin", 90), ("ptx", 80)], entries
        data = fatbin.read_bytes()
        for name in re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', source.read_text()):
            assert name.encode() in data, f"{fatbin.name} lacks {name}"


def test_shipped_fatbins_were_built_from_the_current_sources():
    manifest = json.loads((build.BIN_DIR / "manifest.json").read_text())
    stale = [s.name for s in SOURCES if manifest["sources"].get(s.name) != build.source_digest(s)]
    assert not stale, f"fatbins older than {stale}: run python -m pclayer.cuda.build"
    assert manifest["cubins"] == ["sm_80", "sm_90"] and manifest["ptx"] == "compute_80"


def _find_nvrtc() -> Path | None:
    for root in map(Path, sys.path):
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            found = sorted(root.glob(pattern))
            if found:
                return found[0]
    return None


def test_nvrtc_compiles_every_kernel_source_as_the_runtime_fallback_does():
    """The fallback in CupyRunner hands the raw .cu text to NVRTC with only ``-I<kernel dir>``:
    no C math headers, unlike nvcc, so this catches e.g. an undefined INFINITY."""
    path = _find_nvrtc()
    if path is None:
        pytest.skip('libnvrtc not found on sys.path; CI must run: pip install "nvidia-cuda-nvrtc==13.0.*"')
    for builtins in sorted(path.parent.glob("libnvrtc-builtins.so.*")):  # NVRTC dlopens it by name
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(path))
    for source in SOURCES:
        for arch in build.ARCHITECTURES:
            program = ctypes.c_void_p()
            assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.read_bytes(), source.name.encode(), 0, None,
                                            None) == 0
            options = [f"-I{build.KERNEL_DIR}".encode(), b"--std=c++17", f"-arch=compute_{arch}".encode()]
            status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
            assert status == 0, f"NVRTC failed on {source.name} for compute_{arch}:\n{log.value.decode()}"
