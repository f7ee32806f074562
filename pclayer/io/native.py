"""pclayer's own file format: one safetensors file holding a compiled circuit.

Tensors (the plan's index tensors, the current parameter values and the fixed
tables) are safetensors entries; the structure of the :class:`~pclayer.plan.Plan`
(its layer dicts, with tensors replaced by ``{"__tensor__": name}``) is JSON in the
safetensors metadata, next to the format name, the format version, the parameter
dtype and a SHA-256 digest of the structure and every tensor. Nothing in the file
is executable and no pickle is involved. Saving writes a temporary file in the
target directory, fsyncs it and renames it over the target, so an interrupted save
leaves the previous file (or none) and never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from pclayer.circuit import TensorCircuit
from pclayer.io.plan_format import plan_from_dict, plan_to_dict
from pclayer.passes import optimize as optimize_plan
from pclayer.io.errors import CircuitFileError

FORMAT_NAME = "pclayer-circuit"
FORMAT_VERSION = 2
"""Version 2 stores typed banks and input distributions by class name; version-1 files
(pclayer 0.1) are migrated on load (see :mod:`pclayer.io.plan_format`)."""
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TENSOR = "__tensor__"


def _storer(tensors: dict[str, torch.Tensor]):
    """A callback that moves a plan tensor into ``tensors`` under a fresh name and returns
    its JSON reference."""
    def store(value: torch.Tensor) -> dict:
        name = f"plan/{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    return store


def _fetcher(tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`_storer` over a loaded file's tensors."""
    def fetch(reference: object) -> torch.Tensor:
        if not isinstance(reference, dict) or set(reference) != {_TENSOR}:
            raise CircuitFileError(f"structure: expected a tensor reference, got {reference!r}")
        name = reference[_TENSOR]
        if name not in tensors:
            raise CircuitFileError(f"structure refers to tensor {name!r}, which the file does not contain")
        return tensors[name]
    return fetch


def _digest(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(structure.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save(path: str | os.PathLike, circuit: TensorCircuit) -> None:
    """Write ``circuit`` (structure and current parameters) to ``path`` atomically.

    Args:
        path: target file (conventionally ``*.safetensors``); its directory must exist.
        circuit: a compiled :class:`pclayer.TensorCircuit` on any device.
    """
    if not isinstance(circuit, TensorCircuit):
        raise TypeError(f"circuit: expected a pclayer.TensorCircuit, got {type(circuit).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: directory {str(path.parent)!r} does not exist")
    tensors: dict[str, torch.Tensor] = {}
    plan = circuit.plan
    fields = plan_to_dict(plan, _storer(tensors))
    structure = json.dumps({"plan": fields, "params": sorted(circuit.params), "fixed": sorted(plan.fixed),
                            "optimized": plan.optimized, "backend": circuit.runtime.backend})
    for key, value in circuit.params.items():
        tensors[f"params/{key}"] = value.detach().cpu().contiguous()
    for key in plan.fixed:
        tensors[f"fixed/{key}"] = getattr(circuit, f"fixed_{key}").detach().cpu().contiguous()
    dtype_name = str(circuit.dtype).removeprefix("torch.")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "dtype": dtype_name,
        "structure": structure,
        "sha256": _digest(structure, tensors),
    }
    _atomic_write(path, safetensors.torch.save(tensors, metadata=metadata))


def _read_metadata(raw: bytes, where: str) -> dict[str, str]:
    if len(raw) < 8:
        raise CircuitFileError(f"{where}: file is truncated ({len(raw)} bytes; not a pclayer circuit file)")
    header_len = int.from_bytes(raw[:8], "little")
    if 8 + header_len > len(raw):
        raise CircuitFileError(f"{where}: file is truncated or not a safetensors file "
                               f"(header of {header_len} bytes, file of {len(raw)})")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CircuitFileError(f"{where}: corrupted header ({err})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise CircuitFileError(f"{where}: not a pclayer circuit file (no {FORMAT_NAME!r} metadata)")
    try:
        version = int(metadata["format_version"])
    except (KeyError, ValueError):
        raise CircuitFileError(f"{where}: missing or invalid format_version") from None
    if version > FORMAT_VERSION:
        raise CircuitFileError(f"{where}: written in format version {version}, but this pclayer reads versions "
                               f"up to {FORMAT_VERSION}; upgrade pclayer to load it")
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + header_len + max(ends, default=0) != len(raw):
        raise CircuitFileError(f"{where}: file is truncated or has trailing bytes (expected "
                               f"{8 + header_len + max(ends, default=0)} bytes, found {len(raw)})")
    return metadata


def load(path: str | os.PathLike, device: torch.device | str | None = None, *,
         optimize: bool | None = None) -> TensorCircuit:
    """Read a circuit written by :func:`save` (any format version up to the current one).

    Args:
        path: the file.
        device: where to put the circuit (default CPU).
        optimize: run the optimisation passes (default: as the saved circuit was compiled).

    Returns:
        A :class:`pclayer.TensorCircuit` with the saved structure, dtype and parameters;
        its log-likelihoods equal the saved circuit's bit for bit (same device).

    Raises:
        CircuitFileError: truncated, corrupted, foreign or newer-version files.
    """
    where = str(path)
    raw = Path(path).read_bytes()
    metadata = _read_metadata(raw, where)
    try:
        tensors = safetensors.torch.load(raw)
    except SafetensorError as err:
        raise CircuitFileError(f"{where}: corrupted tensor data ({err})") from None
    structure_text = metadata.get("structure", "")
    if _digest(structure_text, tensors) != metadata.get("sha256"):
        raise CircuitFileError(f"{where}: checksum mismatch: the file is corrupted")
    dtype = _DTYPES.get(metadata.get("dtype", ""))
    if dtype is None:
        raise CircuitFileError(f"{where}: unknown parameter dtype {metadata.get('dtype')!r}")
    try:
        structure = json.loads(structure_text)
        plan = plan_from_dict(structure["plan"], {key: tensors[f"params/{key}"] for key in structure["params"]},
                              {key: tensors[f"fixed/{key}"] for key in structure["fixed"]}, _fetcher(tensors))
        optimized = structure.get("optimized", True) if optimize is None else optimize
        circuit = TensorCircuit(optimize_plan(plan) if optimized else plan, dtype=dtype,
                                backend=structure.get("backend", "auto"))
    except CircuitFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise CircuitFileError(f"{where}: inconsistent circuit structure ({type(err).__name__}: {err})") from None
    return circuit if device is None else circuit.to(device)
