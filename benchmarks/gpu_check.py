"""Verify the GPU story on this machine: every query, CoDD mode and EM step, on every backend.

For each backend route (``auto``, ``torch``, ``cuda``) the script compiles the same circuits on
``--device``, runs every query (``log_prob`` with missing values and soft evidence, its
gradient, ``posterior``, ``sample``, ``mpe``), one full-batch EM step and the four CoDD modes,
checks each result against a float64 reference computed on the CPU with the torch route, and
times each one (median of ``--repeats`` calls, synchronised). A route that cannot run here (no
GPU, no cupy) is reported as unavailable with the reason, not as a failure.

Writes ``OUT/gpu_report.json`` and ``OUT/gpu_report.md`` and prints the table; exits 1 when an
available route disagrees with the reference. ``--device cpu`` runs the whole script without a
GPU (CI runs it so, so the script is known to work the day a GPU exists). On a GPU machine:

    pip install -e ".[cuda]" && python benchmarks/gpu_check.py --device cuda --out gpu-check

Checks: values (``log_prob``, flows, posteriors, EM parameters, CoDD marginal logits) agree to
a float32 tolerance; samples keep their observed values and have finite probability, and
their per-variable frequencies match the posterior (total variation below a bound set by the
sample count); MPE completions score as high as the reference's (max-product ties may break
differently); CoDD latent and sample outputs are valid (finite logits at the chosen tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import pclayer as pc
from pclayer.learn import FullBatchEM
from pclayer.ops.dispatch import BackendUnavailableError, backend_info

ROUTES = ("auto", "torch", "cuda")
TOLERANCE = 2e-4


@dataclass
class Case:
    """One circuit and its query inputs (CPU tensors; moved to the device per route)."""

    name: str
    root: pc.NodeGroup
    x: torch.Tensor
    missing: torch.Tensor
    soft: torch.Tensor
    results: dict = field(default_factory=dict)


def _cases(quick: bool) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    states, length, cats, batch = (16, 8, 12, 64) if quick else (256, 32, 512, 256)
    cases = []
    for name, root in (("hmm", pc.structures.hmm(length, states, cats, seed=0)),
                       ("rat-spn", pc.structures.rat_spn(length, cats, 2, 2, max(4, states // 16), seed=0))):
        x = torch.randint(0, cats, (batch, length), generator=g)
        missing = torch.rand(batch, length, generator=g) < 0.5
        soft = torch.log_softmax(torch.randn(batch, length, cats, generator=g), -1)
        cases.append(Case(name, root, x, missing, soft))
    return cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int):
    """(result of the last call, median seconds)."""
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return result, statistics.median(times)


def _queries(circuit: pc.TensorCircuit, case: Case, device: torch.device, repeats: int) -> dict:
    """Every query on ``circuit``: {name: (result on the CPU, seconds)}."""
    x, missing, soft = case.x.to(device), case.missing.to(device), case.soft.to(device, circuit.dtype)
    out = {}

    def log_prob():
        with torch.no_grad():
            return circuit.log_prob(x, missing, soft)

    def flows():
        circuit.zero_grad(set_to_none=True)
        circuit.log_prob(x, missing, soft).sum().backward()
        return {key: p.grad.detach().clone() for key, p in circuit.params.items()}

    def sample():
        return circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator(device).manual_seed(1))

    runs = {"log_prob": log_prob, "flows": flows,
            "posterior": lambda: circuit.posterior(x, missing, soft), "sample": sample,
            "mpe": lambda: circuit.mpe(x, missing, soft)}
    for name, fn in runs.items():
        result, seconds = _timed(fn, device, repeats)
        out[name] = (_cpu(result), seconds)
    em = FullBatchEM(circuit, pseudocount=0.1)
    state = {k: v.detach().clone() for k, v in circuit.state_dict().items()}

    def em_step():
        circuit.load_state_dict(state)
        em.accumulate(x, missing, soft)
        em.step()
        return {key: torch.softmax(p.detach(), -1) for key, p in circuit.params.items()}

    result, seconds = _timed(em_step, device, repeats)
    out["EM step"] = (_cpu(result), seconds)
    circuit.load_state_dict(state)
    return out


def _codd(circuit: pc.TensorCircuit, case: Case, device: torch.device, repeats: int) -> dict:
    from diffusion import CoDDLayer

    cats = circuit.num_cats
    logits = (case.soft * 3).to(device, circuit.dtype)[:8]
    x_t = torch.where(case.missing[:8], torch.full_like(case.x[:8], cats), case.x[:8]).to(device)
    out = {}
    for mode in ("latent", "marginal", "sample", "any_order"):
        layer = CoDDLayer(circuit, mask_id=cats, temperature=0.5, gate=float("inf"), mode=mode)
        generator = torch.Generator(device).manual_seed(2)
        with torch.no_grad():
            result, seconds = _timed(lambda: layer(logits, x_t, generator), device, repeats)
        out[f"CoDD {mode}"] = (_cpu(result), seconds)
    return out


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def _max_error(a, b) -> float:
    if isinstance(a, dict):
        return max((_max_error(a[k], b[k]) for k in a), default=0.0)
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    return float((a[finite] - b[finite]).abs().max()) if bool(finite.any()) else 0.0


def _check(name: str, got, reference, case: Case, reference_circuit: pc.TensorCircuit) -> tuple[bool, str]:
    """(agrees, what was measured) for one query's result against the float64 reference."""
    x, missing, soft = case.x, case.missing, case.soft.double()
    if name == "sample":
        kept = bool((got[~missing] == x[~missing]).all())
        finite = bool(torch.isfinite(reference_circuit.log_prob(got, None, soft)).all())
        post = reference["posterior"]
        counts = torch.zeros_like(post).scatter_add_(2, got.unsqueeze(-1), torch.ones_like(post[..., :1]))
        distance = float((counts.mean(0) - post.mean(0)).abs().sum(-1).max() / 2)
        bound = 3.0 * (post.shape[-1] / len(x)) ** 0.5
        return kept and finite and distance < bound, f"observed kept: {kept}, TV of marginals {distance:.3f} (< {bound:.3f})"
    if name == "mpe":
        score = lambda decoded: reference_circuit.log_prob(decoded, None, soft).detach()  # noqa: E731
        gap = float((score(reference["mpe"]) - score(got)).max())
        return gap <= TOLERANCE * 10, f"score gap to the reference decoding {gap:.2e}"
    if name in ("CoDD latent", "CoDD sample"):
        ok = bool(torch.isfinite(got).any(-1).all())
        return ok, "every position has a finite logit"
    error = _max_error(got, reference[name])
    return error <= TOLERANCE, f"max abs error {error:.2e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (the dry run)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for gpu_report.json/.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small circuits (seconds on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no CUDA device; use --device cpu for the dry run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": str(device), "torch": torch.__version__, "backend_info": backend_info(), "cases": {}}
    failed = False
    for case in _cases(args.quick):
        reference_circuit = pc.compile(case.root, dtype=torch.float64, backend="torch")
        reference = {**_queries(reference_circuit, case, torch.device("cpu"), 1),
                     **_codd(reference_circuit, case, torch.device("cpu"), 1)}
        reference = {name: value for name, (value, _) in reference.items()}
        routes = {}
        for route in ROUTES:
            try:
                circuit = pc.compile(case.root, dtype=torch.float32, backend=route).to(device)
                results = {**_queries(circuit, case, device, args.repeats), **_codd(circuit, case, device, args.repeats)}
            except BackendUnavailableError as error:
                routes[route] = {"available": False, "reason": str(error)}
                continue
            cells = {}
            for name, (value, seconds) in results.items():
                ok, measured = _check(name, value, reference, case, reference_circuit)
                failed |= not ok
                cells[name] = {"ok": ok, "seconds": seconds, "measured": measured}
            routes[route] = {"available": True, "last_backend": circuit.runtime.last_backend, "queries": cells}
        report["cases"][case.name] = routes
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2))
    table = _markdown(report)
    (args.out / "gpu_report.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'gpu_report.json'} and {args.out / 'gpu_report.md'}")
    return 1 if failed else 0


def _markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device']} (torch {report['torch']})", "",
             f"CUDA kernels usable: {report['backend_info']['cuda_available']}"
             + (f" ({report['backend_info']['cuda_unavailable_reason']})" if not report['backend_info']['cuda_available'] else ""),
             "", "| case | query | " + " | ".join(ROUTES) + " |", "|---|---|" + "---|" * len(ROUTES)]
    for case, routes in report["cases"].items():
        names = next((r["queries"] for r in routes.values() if r["available"]), {})
        for name in names:
            cells = []
            for route in ROUTES:
                entry = routes[route]
                if not entry["available"]:
                    cells.append("unavailable")
                    continue
                cell = entry["queries"][name]
                cells.append(f"{'ok' if cell['ok'] else 'FAIL'} {cell['seconds'] * 1e3:.1f} ms")
            lines.append(f"| {case} | {name} | " + " | ".join(cells) + " |")
    for case, routes in report["cases"].items():
        for route, entry in routes.items():
            if not entry["available"]:
                lines.append(f"\n{case}, {route}: unavailable: {entry['reason']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
