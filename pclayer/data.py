"""Reading the standard density-estimation files: comma-separated category rows (the twenty
binary "DEBD" datasets) and IDX arrays (MNIST). No downloads: the caller says where the files are.

* :func:`read_rows` — one ``.data`` or ``.data.gz`` file of comma-separated integers.
* :func:`load_splits` — a dataset's ``NAME.{train,valid,test}.data[.gz]`` files in a directory.
* :func:`read_idx` — one IDX file (``.gz`` or not), e.g. ``train-images-idx3-ubyte.gz``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "valid", "test")

# IDX type codes (the third byte of the magic number) and their big-endian numpy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError) as error:  # includes gzip.BadGzipFile
        raise ValueError(f"path: could not read {path}: {error}") from error


def read_rows(path: str | Path) -> torch.Tensor:
    """The rows of one comma-separated data file as category indices.

    Args:
        path: a ``.data`` file (plain text) or a ``.data.gz`` file (gzipped), one sample
            per line, values separated by commas, e.g. ``0,1,1,0``.

    Returns:
        (N, V) int64 tensor. Every row must have the same number V of non-negative
        integer values; otherwise a ``ValueError`` names the file and the first bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: expected a data file, {path} does not exist")
    lines = [line for line in _open_bytes(path).decode("ascii", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"path: {path} holds no rows")
    rows: list[list[int]] = []
    for number, line in enumerate(lines, start=1):
        try:
            row = [int(value) for value in line.split(",")]
        except ValueError:
            raise ValueError(f"path: {path} line {number}: expected comma-separated integers, got {line[:60]!r}") from None
        if len(row) != len(rows[0] if rows else row):
            raise ValueError(f"path: {path} line {number}: expected {len(rows[0])} values like the first line, got {len(row)}")
        if min(row) < 0:
            raise ValueError(f"path: {path} line {number}: expected non-negative category indices, got {min(row)}")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def _split_file(directory: Path, name: str, split: str) -> Path:
    for suffix in (".data", ".data.gz"):
        candidate = directory / f"{name}.{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"name: expected {name}.{split}.data or {name}.{split}.data.gz in {directory}, found neither")


def load_splits(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The train, valid and test splits of one dataset in the standard layout.

    Args:
        directory: folder holding ``NAME.train.data``, ``NAME.valid.data`` and
            ``NAME.test.data``, each possibly gzipped (``.data.gz``; the plain file wins
            when both exist).
        name: the dataset's file stem, e.g. ``"plants"`` or ``"bnetflix"``.

    Returns:
        ``{"train": (N_train, V), "valid": (N_valid, V), "test": (N_test, V)}`` int64
        tensors; all three splits must have the same number of variables V.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory: expected a folder of data files, {directory} is not one")
    splits = {split: read_rows(_split_file(directory, name, split)) for split in SPLITS}
    widths = {split: rows.shape[1] for split, rows in splits.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"name: the splits of {name!r} disagree on the number of variables: {widths}")
    return splits


def read_idx(path: str | Path) -> torch.Tensor:
    """One array in the IDX format (as MNIST is distributed), gzipped or not.

    Args:
        path: an IDX file, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns:
        A tensor of the file's shape, e.g. (60000, 28, 28) uint8 for MNIST training images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: expected an IDX file, {path} does not exist")
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"path: {path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"path: {path} holds {len(raw) - header} data bytes, its header {shape} says {expected}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
