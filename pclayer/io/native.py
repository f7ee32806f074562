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
import math
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
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


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
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CircuitFileError(f"{where}: corrupted header (metadata values must be strings)")
    try:
        version = int(metadata["format_version"])
    except (KeyError, ValueError):
        raise CircuitFileError(f"{where}: missing or invalid format_version") from None
    if version > FORMAT_VERSION:
        raise CircuitFileError(f"{where}: written in format version {version}, but this pclayer reads versions "
                               f"up to {FORMAT_VERSION}; upgrade pclayer to load it")
    end = _check_entries({k: v for k, v in header.items() if k != "__metadata__"}, where)
    if 8 + header_len + end != len(raw):
        raise CircuitFileError(f"{where}: file is truncated or has trailing bytes (expected "
                               f"{8 + header_len + end} bytes, found {len(raw)})")
    return metadata


def _check_entries(entries: dict[str, object], where: str) -> int:
    """Check every tensor entry of a safetensors header (dtype, shape, byte range; the byte
    ranges tile the data section in order) and return the data section's length."""
    spans = []
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CircuitFileError(f"{where}: corrupted header (entry {name!r} is not a tensor description)")
        size, shape, offsets = _ITEM_BYTES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        if size is None:
            raise CircuitFileError(f"{where}: corrupted header (entry {name!r} has unknown dtype {entry['dtype']!r})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CircuitFileError(f"{where}: corrupted header (entry {name!r} has shape {shape!r})")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
                or offsets[1] - offsets[0] != size * math.prod(shape):
            raise CircuitFileError(f"{where}: corrupted header (entry {name!r} has byte range {offsets!r} for shape "
                                   f"{shape} of {entry['dtype']})")
        spans.append((offsets[0], offsets[1]))
    position = 0
    for begin, stop in sorted(spans):
        if begin != position:
            raise CircuitFileError(f"{where}: corrupted header (tensor byte ranges overlap or leave gaps)")
        position = stop
    return position


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_values(tensors: dict[str, torch.Tensor], plan_names: list[str], where: str) -> None:
    """Parameters and fixed tables hold no NaN or +inf (``-inf`` is a log of zero); the
    plan's integer tensors (indices) are non-negative."""
    for name, tensor in tensors.items():
        if name.startswith(("params/", "fixed/")) and tensor.is_floating_point():
            bad = torch.isnan(tensor) | (tensor == torch.inf)
            if bool(bad.any()):
                raise CircuitFileError(f"{where}: tensor {name!r} holds NaN or +inf values; the file is corrupted")
    for name in plan_names:
        tensor = tensors[name]
        if tensor.dtype != torch.bool and not tensor.is_floating_point() and bool((tensor < 0).any()):
            raise CircuitFileError(f"{where}: plan tensor {name!r} holds negative indices; the file is corrupted")


def _probe(circuit: TensorCircuit, where: str) -> None:
    """One evaluation with every variable summed out must give log 1 = 0: it runs every
    index of the plan (an out-of-range index fails here, not later) and checks the loaded
    circuit is a normalised one."""
    continuous = bool((circuit.var_cats == 0).any())
    x = torch.zeros(1, circuit.num_vars, dtype=torch.float64 if continuous else torch.long, device=circuit.device)
    with torch.no_grad():
        value = circuit.log_prob(x, missing=torch.ones(1, circuit.num_vars, dtype=torch.bool, device=circuit.device))
    tolerance = 1e-3 if circuit.dtype in (torch.float32, torch.float64) else 5e-2
    if not bool(torch.isfinite(value).all()) or float(value.abs().max()) > tolerance:
        raise CircuitFileError(f"{where}: inconsistent circuit structure (the total probability is "
                               f"{float(value.double().exp().max())}, expected 1)")


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
        CircuitFileError: truncated, corrupted, foreign or newer-version files: the header,
            every tensor's byte range, the checksum, the parameter values (no NaN or +inf)
            and the plan (indices in range: one evaluation with everything summed out must
            give probability 1) are all checked here, so a corrupted file never loads.
    """
    where = str(path)
    raw = Path(path).read_bytes()
    metadata = _read_metadata(raw, where)
    try:
        tensors = safetensors.torch.load(raw)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as err:
        raise CircuitFileError(f"{where}: corrupted tensor data ({err})") from None
    structure_text = metadata.get("structure", "")
    if _digest(structure_text, tensors) != metadata.get("sha256"):
        raise CircuitFileError(f"{where}: checksum mismatch: the file is corrupted")
    dtype = _DTYPES.get(metadata.get("dtype", ""))
    if dtype is None:
        raise CircuitFileError(f"{where}: unknown parameter dtype {metadata.get('dtype')!r}")
    try:
        structure = json.loads(structure_text)
        _check_values(tensors, [name for name in tensors if name.startswith("plan/")], where)
        plan = plan_from_dict(structure["plan"], {key: tensors[f"params/{key}"] for key in structure["params"]},
                              {key: tensors[f"fixed/{key}"] for key in structure["fixed"]}, _fetcher(tensors))
        optimized = structure.get("optimized", True) if optimize is None else optimize
        circuit = TensorCircuit(optimize_plan(plan) if optimized else plan, dtype=dtype,
                                backend=structure.get("backend", "auto"))
        _probe(circuit, where)
    except CircuitFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError, OverflowError) as err:
        raise CircuitFileError(f"{where}: inconsistent circuit structure ({type(err).__name__}: {err})") from None
    return circuit if device is None else circuit.to(device)
