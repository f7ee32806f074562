"""Side-by-side CPU comparison of pclayer with the installed peer libraries.

Runs pclayer and every installed peer (cirkit ``libcirkit``, SPFlow ``spflow``, SparC
``sparc-pc``) on circuits of the same structure and size in ONE process, interleaving the
libraries round by round so machine load hits all of them alike, and reports medians:

* forward (log-likelihood of a batch, no gradient), timed twice per round: the first call
  after the parameters changed (each round ends with an EM step), and the same call repeated
  with unchanged parameters (an inference loop; pclayer then reuses its normalised tables),
* forward+backward (gradient of the summed log-likelihood w.r.t. all parameters),
* one EM step (flows + M-step; for pclayer ``pclayer.learn.MiniBatchEM``, for cirkit its
  ``EM`` optimizer, for SPFlow ``expectation_maximization(max_steps=1)``; SparC has no EM, so
  its cell times its projected-gradient ascent step and says so),
* the peak resident memory (VmHWM) of a fresh process that builds the circuit and runs
  forward+backward (includes the ~0.3 GB of importing torch).

Where parameters can be matched (the inhomogeneous HMM: pclayer, cirkit, SPFlow and SparC get
the same initial, transition and emission tables) it checks that the log-likelihoods agree.
SPFlow runs the HMM only; SparC (float64, about a second per forward) the HMM, its HCLT and,
as the CP tree, its RAT-SPN; it has no row for the cross-product RAT-SPN.
It also times the bare matrix products a HMM forward needs (the roofline reference).

Writes ``RESULTS_DIR/peers.md`` (markdown table with machine, versions, load) and
``RESULTS_DIR/peers_*.png``. A peer that is not installed is skipped with a note.

Installing the peers: in their own venv (libcirkit pins scipy and downgrades numpy), torch
first, then ``pip install libcirkit spflow sparc-pc`` and pclayer editable; see
docs/performance.md. Usage::

    /work/peers-venv/bin/python benchmarks/compare_peers.py --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import pclayer as pc
from pclayer.learn import MiniBatchEM

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Sizes:
    """Circuit and batch sizes shared by every library."""

    num_vars: int = 32
    num_states: int = 128
    num_cats: int = 256
    batch: int = 512
    rat_states: int = 32  # RAT-SPN: one random binary region tree down to single variables
    cp_units: int = 128  # binary tree of CP layers (sum per child, then elementwise product)


@dataclass
class Runner:
    """One library on one structure: callables for each timed task."""

    library: str
    structure: str
    num_params: int
    tasks: dict[str, Callable[[], object]]
    log_likelihood: Callable[[], torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    substitutes: dict[str, str] = field(default_factory=dict)  # task -> what was timed instead (shown in its cell)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _random_tables(sizes: Sizes, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inhomogeneous HMM tables: initial (H,), transition (T-1, H, H), emission (T, H, K)."""
    g = torch.Generator().manual_seed(seed)

    def rows(*shape: int) -> torch.Tensor:
        r = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.05
        return r / r.sum(-1, keepdim=True)

    t, h, k = sizes.num_vars, sizes.num_states, sizes.num_cats
    return rows(h), rows(t - 1, h, h), rows(t, h, k)


# ----------------------------------------------------------------------------- pclayer


def _pclayer_runner(structure: str, circuit: pc.TensorCircuit, x: torch.Tensor) -> Runner:
    em = MiniBatchEM(circuit, step_size=0.1)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return circuit.log_prob(x)

    def forward_backward() -> None:
        circuit.zero_grad(set_to_none=True)
        circuit.log_prob(x).sum().backward()

    return Runner("pclayer", structure, circuit.num_parameters(),
                  {"forward": forward, "forward+backward": forward_backward, "EM step": lambda: em.step(x)},
                  log_likelihood=forward)


def pclayer_runners(sizes: Sizes, x: torch.Tensor, hmm_tables, structures: list[str]) -> list[Runner]:
    out = []
    if "hmm" in structures:
        init, trans, emis = hmm_tables
        root = pc.structures.hmm(sizes.num_vars, sizes.num_states, sizes.num_cats, homogeneous=False,
                                 initial=init, transition=trans, emission=emis)
        out.append(_pclayer_runner("hmm", pc.compile(root), x))
    if "hclt" in structures:
        root = pc.structures.hclt(x, sizes.num_states, sizes.num_cats, seed=0)
        out.append(_pclayer_runner("hclt", pc.compile(root), x))
    if "rat-spn" in structures:
        depth = sizes.num_vars.bit_length() - 1
        root = pc.structures.rat_spn(sizes.num_vars, sizes.num_cats, depth, 1, sizes.rat_states, seed=0)
        out.append(_pclayer_runner("rat-spn", pc.compile(root), x))
    if "cp-tree" in structures:
        root = pc.summate(_cp_tree(list(range(sizes.num_vars)), sizes.cp_units, sizes.num_cats), num_nodes=1)
        out.append(_pclayer_runner("cp-tree", pc.compile(root), x))
    return out


def _cp_tree(variables: list[int], units: int, num_cats: int) -> pc.NodeGroup:
    """Balanced binary tree of CP layers: each child region goes through its own dense sum
    (units x units), then the two are multiplied elementwise (cirkit's ``cp`` layers)."""
    if len(variables) == 1:
        return pc.inputs(variables[0], units, pc.Categorical(num_cats), generator=torch.Generator().manual_seed(variables[0]))
    half = len(variables) // 2
    left = pc.summate(_cp_tree(variables[:half], units, num_cats), num_nodes=units)
    right = pc.summate(_cp_tree(variables[half:], units, num_cats), num_nodes=units)
    return pc.multiply(left, right)


# ----------------------------------------------------------------------------- cirkit


def cirkit_runners(sizes: Sizes, x: torch.Tensor, hmm_tables, structures: list[str]) -> list[Runner]:
    from cirkit.backend.torch.em_optimizer import EM
    from cirkit.pipeline import PipelineContext, compile as cirkit_compile
    from cirkit.templates import data_modalities, pgms

    def build(symbolic):
        with PipelineContext(backend="torch", semiring="lse-sum", fold=True, optimize=True):
            return cirkit_compile(symbolic)

    def runner(structure: str, cc) -> Runner:
        optimizer = EM(cc, lr=0.1, pseudocount=0.0)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return cc(x).flatten()

        def forward_backward() -> None:
            cc.zero_grad(set_to_none=True)
            cc(x).sum().backward()

        def em_step() -> None:
            optimizer.zero_grad()
            cc(x).sum().backward()
            optimizer.step()

        tasks = {"forward": forward, "forward+backward": forward_backward, "EM step": em_step}
        notes = []
        reference = forward()  # before the EM probe below changes the parameters
        try:
            em_step()
        except NotImplementedError as error:  # cirkit 0.3.1 has no EM for Tucker layers
            del tasks["EM step"]
            notes.append(f"cirkit {structure}: no EM step ({error})")
        return Runner("cirkit", structure, sum(p.numel() for p in cc.parameters()), tasks,
                      log_likelihood=lambda: reference, notes=notes)

    categorical = {"name": "categorical", "args": {"num_categories": sizes.num_cats}}
    out = []
    if "hmm" in structures:
        t = sizes.num_vars
        cc = build(pgms.hmm(list(range(t)), input_layer="categorical", num_latent_states=sizes.num_states,
                            input_layer_kwargs={"num_categories": sizes.num_cats}))
        _load_cirkit_hmm(cc, hmm_tables, t)
        out.append(runner("hmm", cc))
    if "hclt" in structures:
        cc = build(data_modalities.tabular_data("chow-liu-tree", data=x, input_layers=categorical,
                                                num_input_units=sizes.num_states, sum_product_layer="cp",
                                                num_sum_units=sizes.num_states))
        out.append(runner("hclt", cc))
    if "rat-spn" in structures:
        cc = build(data_modalities.tabular_data("random-binary-tree", num_features=sizes.num_vars,
                                                input_layers=categorical, num_input_units=sizes.rat_states,
                                                sum_product_layer="tucker", num_sum_units=sizes.rat_states))
        out.append(runner("rat-spn", cc))
    if "cp-tree" in structures:
        cc = build(data_modalities.tabular_data("random-binary-tree", num_features=sizes.num_vars,
                                                input_layers=categorical, num_input_units=sizes.cp_units,
                                                sum_product_layer="cp", num_sum_units=sizes.cp_units))
        out.append(runner("cp-tree", cc))
    return out


def _load_cirkit_hmm(cc, hmm_tables, num_vars: int) -> None:
    """Copy pclayer's HMM tables into cirkit's folded HMM (softmax-parameterised log-weights).

    Layer 0 holds the emissions of all positions (fold order = its ``scope_idx``); sum
    layer ``k`` (k = 1..T-1) sits above position ``T - k`` and holds transition ``T-1-k``;
    sum layer ``T`` is the initial distribution.
    """
    init, trans, emis = hmm_tables
    params = dict(cc.named_parameters())
    with torch.no_grad():
        order = cc.layers[0].scope_idx.flatten()
        params["_nodes.0.probs._nodes.0._ptensor"].copy_(emis[order].log())
        for k in range(1, num_vars):
            params[f"_nodes.{k}.weight._nodes.0._ptensor"].copy_(trans[num_vars - 1 - k].log()[None])
        params[f"_nodes.{num_vars}.weight._nodes.0._ptensor"].copy_(init.log()[None, None])


# ----------------------------------------------------------------------------- SPFlow


def spflow_runners(sizes: Sizes, x: torch.Tensor, hmm_tables, structures: list[str]) -> list[Runner]:
    """SPFlow 1.1.0: the HMM built by hand from Categorical leaves, Sum and ElementwiseProduct
    modules, with pclayer's tables (sum logits are (features, in, out, repetitions))."""
    from spflow.learn.expectation_maximization import expectation_maximization
    from spflow.meta import Scope
    from spflow.modules.leaves import Categorical
    from spflow.modules.products import ElementwiseProduct
    from spflow.modules.sums import Sum

    if "hmm" not in structures:
        return []
    init, trans, emis = (t.float() for t in hmm_tables)
    h, k, t_len = sizes.num_states, sizes.num_cats, sizes.num_vars

    def leaf(t: int):
        return Categorical(Scope([t]), out_channels=h, K=k, probs=emis[t].reshape(1, h, 1, k))

    chain, sums = leaf(t_len - 1), []
    for t in range(t_len - 2, -1, -1):
        sums.append((t, Sum(chain, out_channels=h)))
        chain = ElementwiseProduct([leaf(t), sums[-1][1]])
    root = Sum(chain, out_channels=1)
    with torch.no_grad():
        root.logits.copy_(init.log().reshape(1, h, 1, 1))
        for t, module in sums:
            module.logits.copy_(trans[t].log().t().reshape(1, h, h, 1))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return root.log_likelihood(x).flatten()

    def forward_backward() -> None:
        root.zero_grad(set_to_none=True)
        root.log_likelihood(x).sum().backward()

    runner = Runner("spflow", "hmm", sum(p.numel() for p in root.parameters()),
                    {"forward": forward, "forward+backward": forward_backward,
                     "EM step": lambda: expectation_maximization(root, x, max_steps=1)},
                    log_likelihood=forward)
    runner.notes.append("spflow: HMM only (built by hand); its EM step is full-batch expectation_maximization(max_steps=1)")
    return [runner]


# ----------------------------------------------------------------------------- SparC


def _sparc_hmm(hmm_tables):
    """SparC 0.8.2 HMM built from its node classes with pclayer's tables, in the topology of
    ``sparc.structures.HMM``: sum node ``i`` above position ``t + 1`` holds row ``i`` of
    transition ``t`` over that position's chain nodes; chain node ``i`` at ``t`` is
    emission ``(t, i)`` times that sum; the root mixes chain 0 under the initial table."""
    from sparc.nodes import CategoricalInputNode, ProductNode, SumNode

    init, trans, emis = hmm_tables
    t_len, h = emis.shape[0], emis.shape[1]
    chain = [CategoricalInputNode(t_len - 1, emis[t_len - 1, i].tolist()) for i in range(h)]
    for t in range(t_len - 2, -1, -1):
        sums = [SumNode(chain, trans[t, i].tolist()) for i in range(h)]
        chain = [ProductNode([CategoricalInputNode(t, emis[t, i].tolist()), sums[i]]) for i in range(h)]
    return SumNode(chain, init.tolist())


def sparc_runners(sizes: Sizes, x: torch.Tensor, hmm_tables, structures: list[str]) -> list[Runner]:
    """SparC 0.8.2 (float64 Cython, one loop per edge): the HMM with pclayer's tables, its own
    ``HCLT`` and, for ``cp-tree``, its ``RAT_SPN`` (index-aligned products, i.e. a tree of CP
    layers with one more sum at the top). Tasks run on the flattened ``CompiledCircuit``; it has
    no EM, so its learning step (full-batch gradient, ``sparc.optim.apply_grads``,
    ``refresh_parameters``) is timed in the EM column and labelled as such."""
    import numpy as np
    import sparc
    from sparc.nodes import CategoricalInputNode, SumNode
    from sparc.optim import apply_grads, iter_nodes
    from sparc.structures import HCLT, RAT_SPN

    sparc.set_num_threads(torch.get_num_threads())  # its OpenMP team (forward only)
    data = np.ascontiguousarray(x.numpy(), dtype=np.int32)

    def runner(structure: str, root) -> Runner:
        compiled = root.compile()

        def forward() -> torch.Tensor:
            return torch.from_numpy(compiled.log_likelihood(data))

        def gradient_step() -> None:
            _, grads = compiled.mean_log_likelihood_and_grad(data)
            apply_grads(root, grads, 0.1, ascent=True)
            compiled.refresh_parameters()

        num_params = sum(len(n.parameters_list()) if isinstance(n, SumNode) else len(n.probabilities_list())
                         for n in iter_nodes(root) if isinstance(n, (SumNode, CategoricalInputNode)))
        return Runner("sparc", structure, num_params,
                      {"forward": forward, "forward+backward": lambda: compiled.mean_log_likelihood_and_grad(data),
                       "EM step": gradient_step},
                      log_likelihood=forward, substitutes={"EM step": "gradient step"})

    out = []
    if "hmm" in structures:
        out.append(runner("hmm", _sparc_hmm(tuple(t.double() for t in hmm_tables))))
    if "hclt" in structures:
        out.append(runner("hclt", HCLT(data, sizes.num_states, num_bins=sizes.num_cats, num_cats=sizes.num_cats,
                                       seed=0)))
    if "cp-tree" in structures:
        depth = sizes.num_vars.bit_length() - 1
        out.append(runner("cp-tree", RAT_SPN(sizes.num_vars, sizes.cp_units, depth, 1, num_cats=sizes.num_cats,
                                             seed=0)))
    notes = ["sparc: float64; no EM, so its EM cell times one projected-gradient ascent step "
             "(mean_log_likelihood_and_grad + sparc.optim.apply_grads + refresh_parameters)"]
    if "cp-tree" in structures:
        notes.append("sparc: its cp-tree is RAT_SPN with index-aligned products (one extra sum at the top)")
    if "rat-spn" in structures:
        notes.append("sparc: no rat-spn row (its RAT_SPN has no cross-product regions to match cirkit's tucker layers)")
    if out:
        out[0].notes += notes
    return out


BUILDERS: dict[str, Callable[..., list[Runner]]] = {
    "pclayer": pclayer_runners, "cirkit": cirkit_runners, "spflow": spflow_runners, "sparc": sparc_runners}


# ----------------------------------------------------------------------------- measurement


def _vm_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_rss_mb(library: str, structure: str, sizes: Sizes, threads: int) -> float | None:
    """Peak RSS (MB, VmHWM) of a fresh process that builds ``library``'s ``structure`` and runs
    forward+backward twice: a separate process, so allocator caches of the other runs do not hide it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", f"{library}:{structure}",
           "--threads", str(threads), "--batch", str(sizes.batch), "--states", str(sizes.num_states),
           "--vars", str(sizes.num_vars), "--cats", str(sizes.num_cats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return float(done.stdout.strip().splitlines()[-1])


def _memory_probe(library: str, structure: str, sizes: Sizes) -> None:
    x = torch.randint(0, sizes.num_cats, (sizes.batch, sizes.num_vars), generator=torch.Generator().manual_seed(1))
    (runner,) = BUILDERS[library](sizes, x, _random_tables(sizes, seed=0), [structure])
    runner.tasks["forward+backward"]()
    runner.tasks["forward+backward"]()
    print(_vm_kib("VmHWM") / 1024)


def matmul_floor(sizes: Sizes, repeats: int) -> float:
    """Median seconds of the bare float32 products an HMM forward needs: (B,H) @ (H,H) with
    the T-1 transition matrices of the inhomogeneous HMM."""
    b, h, t = sizes.batch, sizes.num_states, sizes.num_vars
    a, w = torch.rand(b, h), torch.rand(t - 1, h, h)
    out = torch.empty(b, h)

    def run() -> None:
        for step in range(t - 1):
            torch.mm(a, w[step], out=out)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


TASKS = ["forward", "forward (repeat)", "forward+backward", "EM step"]
"""Columns of the report; "forward (repeat)" is the runner's forward called again right after
its "forward", which follows the previous round's EM step (changed parameters)."""


def _timed_tasks(runner: Runner) -> list[tuple[str, Callable[[], object]]]:
    """The runner's tasks in timing order, with the forward repeated right after itself."""
    out = []
    for task, fn in runner.tasks.items():
        out.append((task, fn))
        if task == "forward":
            out.append(("forward (repeat)", fn))
    return out


def time_interleaved(runners: list[Runner], repeats: int) -> dict[tuple[str, str, str], float]:
    """Median seconds per (library, structure, task); every round runs every task once."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    for r in runners:  # warm-up (allocator, lazy init)
        for fn in r.tasks.values():
            fn()
    try:
        from tqdm import tqdm
        rounds = tqdm(range(repeats), desc="timing rounds")
    except ImportError:
        rounds = range(repeats)
    for _ in rounds:
        for r in runners:
            for task, fn in _timed_tasks(r):
                start = time.perf_counter()
                fn()
                samples.setdefault((r.library, r.structure, task), []).append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in samples.items()}


# ----------------------------------------------------------------------------- report


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def write_report(out_dir: Path, runners: list[Runner], medians, memory, agreement: list[str], skipped: list[str],
                 floor: float, threads: int, repeats: int, load: tuple[float, float]) -> Path:
    tasks = TASKS
    lines = [
        "# pclayer vs peers (CPU)",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; torch {torch.__version__}, "
        f"{threads} torch threads; median of {repeats} interleaved rounds; load average before/after: "
        f"{load[0]:.2f} / {load[1]:.2f}.",
        "Versions: " + ", ".join(f"{n} {_version(d) or 'absent'}" for n, d in
                                 (("pclayer", "pclayer"), ("libcirkit", "libcirkit"), ("spflow", "spflow"),
                                  ("sparc-pc", "sparc-pc"))) + ".",
        "",
        "| structure | library | params | " + " | ".join(tasks) + " | peak RSS (f+b, own process) | pclayer speed-up ("
        + " / ".join(tasks) + ") |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for r in runners:
        row = [r.structure, r.library, f"{r.num_params / 1e6:.2f} M"]
        row += [_fmt(medians.get((r.library, r.structure, t))) + (f" ({r.substitutes[t]})" if t in r.substitutes else "")
                for t in tasks]
        mem = memory.get((r.library, r.structure))
        row.append("-" if mem is None else f"{mem / 1024:.2f} GB")
        ratios = []
        for t in tasks:
            ours, theirs = medians.get(("pclayer", r.structure, t)), medians.get((r.library, r.structure, t))
            ratios.append(f"{theirs / ours:.1f}x" if ours and theirs and r.library != "pclayer" else "")
        row.append(" / ".join(ratios) if r.library != "pclayer" else "")
        lines.append("| " + " | ".join(row) + " |")
    hmm_fwd = medians.get(("pclayer", "hmm", "forward"))
    hmm_repeat = medians.get(("pclayer", "hmm", "forward (repeat)"))
    lines += ["", f"Bare matrix products of the HMM forward (T-1 products (B,H)@(H,H), one per transition matrix): "
              f"{_fmt(floor)}" + (f"; pclayer's HMM forward runs at {floor / hmm_repeat:.0%} of that speed "
                                  f"({floor / hmm_fwd:.0%} for the first forward after a parameter update)."
                                  if hmm_fwd and hmm_repeat else ".")]
    if agreement:
        lines += ["", "Log-likelihood agreement (same parameters):", ""] + [f"- {a}" for a in agreement]
    notes = [n for r in runners for n in r.notes] + skipped
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    path = out_dir / "peers.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plots(out_dir: Path, runners: list[Runner], medians) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    structures = sorted({r.structure for r in runners})
    libraries = list(dict.fromkeys(r.library for r in runners))
    for task in TASKS:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(libraries), 1)
        for i, lib in enumerate(libraries):
            vals = [medians.get((lib, s, task), float("nan")) * 1e3 for s in structures]
            ax.bar([j + i * width for j in range(len(structures))], vals, width, label=lib)
        ax.set_xticks([j + width * (len(libraries) - 1) / 2 for j in range(len(structures))], structures)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log scale)")
        ax.set_title(f"{task}: lower is better")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"peers_{task.replace('+', '_').replace(' ', '_').replace('(', '').replace(')', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--structures", default="hmm,hclt,rat-spn,cp-tree",
                        help="comma list of hmm, hclt, rat-spn, cp-tree")
    parser.add_argument("--libraries", default="pclayer,cirkit,spflow,sparc", help="comma list")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for peers.md and PNGs")
    parser.add_argument("--batch", type=int, default=Sizes.batch)
    parser.add_argument("--states", type=int, default=Sizes.num_states)
    parser.add_argument("--vars", type=int, default=Sizes.num_vars)
    parser.add_argument("--cats", type=int, default=Sizes.num_cats)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = Sizes(num_vars=args.vars, num_states=args.states, num_cats=args.cats, batch=args.batch)
    if args.memory_probe:
        _memory_probe(*args.memory_probe.split(":"), sizes)
        return
    structures = args.structures.split(",")
    libraries = args.libraries.split(",")
    load_before = os.getloadavg()[0]

    x = torch.randint(0, sizes.num_cats, (sizes.batch, sizes.num_vars), generator=torch.Generator().manual_seed(1))
    tables = _random_tables(sizes, seed=0)
    runners: list[Runner] = []
    skipped: list[str] = []
    peers = {"cirkit": "libcirkit", "spflow": "spflow", "sparc": "sparc-pc"}
    for lib in libraries:
        if lib in peers and _version(peers[lib]) is None:
            skipped.append(f"{lib}: not installed (pip install {peers[lib]}); skipped")
            continue
        if lib not in BUILDERS:
            skipped.append(f"{lib}: installed, but this script has no adapter for it (see docs/performance.md)")
            continue
        start = time.perf_counter()
        runners += BUILDERS[lib](sizes, x, tables, structures)
        print(f"built {lib} circuits in {time.perf_counter() - start:.1f} s")

    agreement = []
    ll = {(r.library, r.structure): r.log_likelihood() for r in runners if r.log_likelihood is not None}
    if ("pclayer", "hmm") in ll:
        for (lib, structure), value in ll.items():
            if structure == "hmm" and lib != "pclayer":
                diff = (value.double() - ll[("pclayer", "hmm")].double()).abs().max().item()
                agreement.append(f"HMM, pclayer vs {lib}: max |delta log p| = {diff:.2e} over {sizes.batch} rows "
                                 f"(mean log p = {ll[('pclayer', 'hmm')].mean().item():.2f})")

    medians = time_interleaved(runners, args.repeats)
    floor = matmul_floor(sizes, args.repeats)
    memory = {(r.library, r.structure): peak_rss_mb(r.library, r.structure, sizes, args.threads) for r in runners}
    args.out.mkdir(parents=True, exist_ok=True)
    report = write_report(args.out, runners, medians, memory, agreement, skipped, floor, args.threads,
                          args.repeats, (load_before, os.getloadavg()[0]))
    plots = write_plots(args.out, runners, medians)
    print(report.read_text())
    print("wrote", report, *plots)


if __name__ == "__main__":
    main()
