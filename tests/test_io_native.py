"""pclayer.save / pclayer.load: exact round trips and every failure mode."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

import pclayer as pc
from pclayer.io import FORMAT_VERSION, CircuitFileError
from pclayer.learn import FullBatchEM


def _mixed_circuit() -> pc.NodeGroup:
    """Categorical, Bernoulli, Indicator and Gaussian leaves; dense, sparse and tied sums."""
    g = torch.Generator().manual_seed(0)
    a = pc.inputs(0, 3, pc.Categorical(4), generator=g)
    b = pc.inputs(1, 3, pc.Bernoulli(), generator=g)
    c = pc.inputs(2, 3, pc.Gaussian(), generator=g)
    d = pc.inputs(3, 2, pc.Indicator(2))
    d3 = pc.inputs(3, 3, pc.Indicator(2, values=(0, 1, 1)))
    abc = pc.multiply(a, b, c)
    s1 = pc.summate(abc, num_nodes=2, generator=g)
    s2 = pc.summate(abc, num_nodes=3, edges=[[0, 1, 1, 2], [0, 1, 2, 2]], generator=g)
    s1_tied = pc.summate(abc, num_nodes=2, tie=s1)
    left = pc.multiply(s1, d)
    right = pc.multiply(s2, d3)
    tied = pc.multiply(s1_tied, d, edges=[[1, 0], [0, 1]])
    return pc.summate(left, right, tied, num_nodes=1, generator=g)


def _mixed_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.randint(0, 4, (n,), generator=g).double(), torch.randint(0, 2, (n,), generator=g).double(),
                     torch.randn(n, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g).double()], 1)
    return x, torch.rand(x.shape, generator=g) < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_is_bit_exact_after_training(tmp_path, dtype):
    circuit = pc.compile(_mixed_circuit(), dtype=dtype)
    x, missing = _mixed_data(40)
    em = FullBatchEM(circuit)
    em.accumulate(x.to(dtype), missing)
    em.step()
    path = tmp_path / "model.safetensors"
    pc.save(path, circuit)
    loaded = pc.load(path)
    assert loaded.dtype == dtype
    assert sorted(loaded.params) == sorted(circuit.params)
    for key in circuit.params:
        assert torch.equal(loaded.params[key], circuit.params[key].detach())
    for query in (lambda c: c.log_prob(x.to(dtype)), lambda c: c.log_prob(x.to(dtype), missing=missing)):
        assert torch.equal(query(loaded), query(circuit))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(loaded.sample(10, generator=g1), circuit.sample(10, generator=g2))
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_round_trip_of_an_hmm_keeps_ties_and_parameter_count(tmp_path):
    circuit = pc.compile(pc.structures.hmm(6, 3, 5, seed=2))
    pc.save(tmp_path / "hmm.safetensors", circuit)
    loaded = pc.load(tmp_path / "hmm.safetensors")
    assert loaded.num_parameters() == circuit.num_parameters()
    x = torch.randint(0, 5, (7, 6))
    assert torch.equal(loaded.log_prob(x), circuit.log_prob(x))


def test_the_file_holds_no_pickle_and_a_format_version(tmp_path):
    path = tmp_path / "hmm.safetensors"
    pc.save(path, pc.compile(pc.structures.hmm(3, 2, 2, seed=0)))
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "pclayer-circuit"
    assert header["__metadata__"]["format_version"] == str(FORMAT_VERSION)
    assert json.loads(header["__metadata__"]["structure"])["plan"]["num_vars"] == 3
    assert b"\x80\x04" not in raw[:16]  # not a pickle stream


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    pc.save(path, pc.compile(pc.structures.hmm(3, 2, 2, seed=0)))
    raw = path.read_bytes()
    for cut in (4, 100, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CircuitFileError, match="truncated"):
            pc.load(path)


def test_corrupted_tensor_bytes_fail_the_checksum(tmp_path):
    path = tmp_path / "c.safetensors"
    pc.save(path, pc.compile(pc.structures.hmm(3, 2, 2, seed=0)))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CircuitFileError, match="checksum mismatch"):
        pc.load(path)


def test_corrupted_header_gives_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    pc.save(path, pc.compile(pc.structures.hmm(3, 2, 2, seed=0)))
    raw = bytearray(path.read_bytes())
    raw[9] = ord("#")
    path.write_bytes(bytes(raw))
    with pytest.raises(CircuitFileError, match="corrupted header"):
        pc.load(path)


def _rewrite_metadata(path, **changes) -> None:
    tensors = safetensors.torch.load_file(str(path))
    raw = path.read_bytes()
    metadata = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, **changes})


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    pc.save(path, pc.compile(pc.structures.hmm(3, 2, 2, seed=0)))
    _rewrite_metadata(path, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(CircuitFileError, match=f"format version {FORMAT_VERSION + 1}.*upgrade pclayer"):
        pc.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CircuitFileError, match="not a pclayer circuit file"):
        pc.load(path)


def test_edited_structure_is_caught(tmp_path):
    path = tmp_path / "c.safetensors"
    pc.save(path, pc.compile(pc.structures.hmm(3, 2, 2, seed=0)))
    raw = path.read_bytes()
    metadata = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    _rewrite_metadata(path, structure=metadata["structure"].replace('"num_vars": 3', '"num_vars": 4'))
    with pytest.raises(CircuitFileError, match="checksum mismatch"):
        pc.load(path)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "c.safetensors"
    old = pc.compile(pc.structures.hmm(3, 2, 2, seed=0))
    pc.save(path, old)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="disk full"):
        pc.save(path, pc.compile(pc.structures.hmm(3, 2, 2, seed=1)))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert path.read_bytes() == before
    x = torch.randint(0, 2, (4, 3))
    assert torch.equal(pc.load(path).log_prob(x), old.log_prob(x))


def test_save_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="circuit: expected a pclayer.TensorCircuit"):
        pc.save(tmp_path / "x.safetensors", pc.structures.hmm(3, 2, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pc.save(tmp_path / "missing" / "x.safetensors", pc.compile(pc.structures.hmm(3, 2, 2)))


# Issue 12, point 11: every corruption raises CircuitFileError at load, never later.


def _hmm_file(tmp_path):
    path = tmp_path / "c.safetensors"
    pc.save(path, pc.compile(pc.structures.hmm(3, 2, 3, seed=0)))
    return path


def _write_header(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _split_file(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def test_random_single_bit_flips_always_raise_circuit_file_error(tmp_path):
    path = _hmm_file(tmp_path)
    raw = path.read_bytes()
    generator = torch.Generator().manual_seed(12)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    # Half the flips in the 8-byte length and the JSON header (where the structure lives), half anywhere.
    positions = torch.cat([torch.randint(0, header_end, (300,), generator=generator),
                           torch.randint(0, len(raw), (300,), generator=generator)])
    bits = torch.randint(0, 8, (600,), generator=generator)
    for position, bit in zip(positions.tolist(), bits.tolist()):
        flipped = bytearray(raw)
        flipped[position] ^= 1 << bit
        path.write_bytes(bytes(flipped))
        with pytest.raises(CircuitFileError):
            pc.load(path)


@pytest.mark.parametrize("entry", [[1, 2], "tensor", {"dtype": "F32", "shape": [2]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": [0, 5]},
                                   {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}])
def test_malformed_header_entries_raise_circuit_file_error(tmp_path, entry):
    path = _hmm_file(tmp_path)
    header, data = _split_file(path)
    name = next(k for k in header if k != "__metadata__")
    header[name] = entry
    _write_header(path, header, data)
    with pytest.raises(CircuitFileError, match="corrupted header|truncated"):
        pc.load(path)


def _resave_with_valid_checksum(path, change) -> None:
    """Rewrite the file with ``change(tensors)`` applied and a recomputed checksum."""
    from pclayer.io.native import _digest

    header, _ = _split_file(path)
    metadata = header["__metadata__"]
    tensors = safetensors.torch.load_file(str(path))
    change(tensors)
    metadata["sha256"] = _digest(metadata["structure"], tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_nan_or_positive_infinite_parameters_are_refused_at_load(tmp_path):
    for value in (float("nan"), float("inf")):
        path = _hmm_file(tmp_path)
        key = next(k for k in safetensors.torch.load_file(str(path)) if k.startswith("params/"))
        _resave_with_valid_checksum(path, lambda t: t[key].view(-1)[0].fill_(value))
        with pytest.raises(CircuitFileError, match="NaN or \\+inf"):
            pc.load(path)


@pytest.mark.parametrize("shift", [1000, -1])
def test_out_of_range_plan_indices_are_refused_at_load(tmp_path, shift):
    path = _hmm_file(tmp_path)
    names = [k for k, v in safetensors.torch.load_file(str(path)).items()
             if k.startswith("plan/") and not v.is_floating_point() and v.dtype != torch.bool and v.numel()]
    for name in names:
        _hmm_file(tmp_path)
        _resave_with_valid_checksum(path, lambda t: t[name].view(-1)[-1].fill_(shift if shift < 0 else int(t[name].max()) + shift))
        with pytest.raises(CircuitFileError):
            pc.load(path)
