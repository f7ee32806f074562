"""Build the shipped kernel binaries: ``python -m pclayer.cuda.build``.

Compiles every ``pclayer/cuda/*.cu`` with nvcc into ``bin/<name>.fatbin`` holding cubins for
sm_80 and sm_90 plus compute_80 PTX (JIT-compiled by the driver for newer GPUs), with all
warnings as errors. Prints ptxas' register and spill report per kernel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
BIN_DIR = KERNEL_DIR / "bin"
ARCHITECTURES = ("80", "90")
PTX_ARCHITECTURE = "80"


@dataclass(frozen=True)
class KernelReport:
    """ptxas' resource report for one kernel on one architecture."""

    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int


def source_digest(source: Path) -> str:
    """sha256 of a .cu file together with every header in the kernel directory."""
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(KERNEL_DIR.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()


def nvcc_path() -> str | None:
    """The nvcc on PATH, or None."""
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, source: Path, output: Path) -> list[str]:
    """nvcc command compiling ``source`` into a fatbin at ``output`` (warnings are errors)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES]
    gencode.append(f"-gencode=arch=compute_{PTX_ARCHITECTURE},code=compute_{PTX_ARCHITECTURE}")
    return [nvcc, "-fatbin", f"-I{source.parent}", "--Werror", "all-warnings", "-Xptxas", "-v", "-std=c++17",
            *gencode, "-o", str(output), str(source)]


def parse_ptxas(log: str) -> list[KernelReport]:
    """Registers and spills per kernel from ``-Xptxas -v`` output."""
    reports = []
    kernel = arch = None
    spills = (0, 0)
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
            kernel, arch = match.groups()
        elif match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(match.group(1)), int(match.group(2)))
        elif (match := re.search(r"Used (\d+) registers", line)) and kernel is not None:
            reports.append(KernelReport(kernel, arch, int(match.group(1)), *spills))
            kernel = None
    return reports


def fatbin_contents(path: Path) -> list[tuple[str, int]]:
    """Entries of a fatbin as ``("cubin" | "ptx", sm)`` pairs, read from its container headers."""
    data = path.read_bytes()
    magic, _, header_size, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50:
        raise ValueError(f"{path}: not a fatbin (magic {magic:#x})")
    entries, offset = [], header_size
    while offset < header_size + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        entries.append(({1: "ptx", 2: "cubin"}.get(kind, f"kind{kind}"), arch))
        offset += entry_header + payload
    return entries


def build(output_dir: Path = BIN_DIR, nvcc: str | None = None) -> list[KernelReport]:
    """Compile every kernel file into ``output_dir`` and write ``manifest.json`` (nvcc version,
    targets, source digests); returns the per-kernel reports."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc: not found on PATH (pip install nvidia-cuda-nvcc==13.0.* nvidia-cuda-crt==13.0.* "
                                "nvidia-nvvm==13.0.* nvidia-cuda-runtime==13.0.*)")
    output_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for source in sorted(KERNEL_DIR.glob("*.cu")):
        result = subprocess.run(nvcc_command(nvcc, source, output_dir / f"{source.stem}.fatbin"),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{result.stderr}")
        reports.extend(parse_ptxas(result.stderr + result.stdout))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    release = next((line.strip() for line in version.splitlines() if "release" in line), version.strip())
    manifest = {"nvcc": release, "cubins": [f"sm_{a}" for a in ARCHITECTURES], "ptx": f"compute_{PTX_ARCHITECTURE}",
                "sources": {s.name: source_digest(s) for s in sorted(KERNEL_DIR.glob("*.cu"))}}
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=BIN_DIR, help="directory for the .fatbin files")
    args = parser.parse_args()
    reports = build(args.output)
    for r in reports:
        print(f"{r.kernel:32s} sm_{r.arch}: {r.registers:3d} registers, spills {r.spill_stores}/{r.spill_loads} bytes")
    for fatbin in sorted(args.output.glob("*.fatbin")):
        print(f"{fatbin.name}: {', '.join(f'{kind} sm_{arch}' for kind, arch in fatbin_contents(fatbin))}")


if __name__ == "__main__":
    main()
