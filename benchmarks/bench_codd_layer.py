"""Time one CoDD layer call on CPU at the paper's size, next to the dense products it needs.

V = 126,464 (LLaDA vocabulary), W = 32, H = 1024 hidden states (homogeneous HMM), B = 1,
half of the window masked. Reports the median of ``--repeats`` calls for the full
vocabulary and for ``--top-k`` evidence (passed to the circuit as ``pclayer.TopKEvidence``),
with the circuit's normalised tables cached (the steady state of inference: parameters
unchanged between calls), cold (right after an in-place update of the parameters, as after
each optimizer step: the tables are recomputed into their buffers) and on the first call
(the caches cleared, so every buffer is allocated afresh). Beside them: the floors, timed in
the same run into buffers touched before (no page faults): the dense (W x V) @ (V x H)
product of the soft evidence, one softmax pass over the (H x V) table (what a cold call must
add) and the W (1 x H) @ (H x H) chain products; the process's peak resident memory; the
top-k error of the normaliser log Z. Then one training step's ``codd_loss``
forward+backward (``--train-batch`` rows, default 2; 0 skips; each right after an in-place
parameter update, as in a training loop, after two warm-up steps) at the full vocabulary and with top-k candidates,
next to its dense-product floor (the forward's (B W x V) @ (V x H) product plus the emission
gradient's (H x B W) @ (B W x V) product).

The measured table, before and after the current release, is in the README (Performance).

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_codd_layer.py`` (needs about 8 GB of memory with the
training rows, 4.5 GB without).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import pclayer as pc
from diffusion import CoDDLayer, SparseLogits, codd_loss


def call_seconds(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times), statistics.median(times)


def timed_after_update(circuit: pc.TensorCircuit, fn) -> float:
    """Seconds of ``fn()`` right after an in-place update of every parameter (what an
    optimizer step does: the cached tables go stale and are recomputed into their buffers).
    The update itself (``add_(0.0)``, which bumps the version counters) is not timed."""
    with torch.no_grad():
        for parameter in circuit.parameters():
            parameter.add_(0.0)
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def call_seconds_of(fn, repeats: int) -> tuple[float, float]:
    """(best, median) of ``repeats`` values of ``fn()``, a function returning its own time."""
    times = [fn() for _ in range(repeats)]
    return min(times), statistics.median(times)


def median_seconds(fn, repeats: int) -> float:
    return call_seconds(fn, repeats)[1]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=126_464)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--states", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=2, help="batch of the training-step rows (0: skip them)")
    args = parser.parse_args()
    torch.manual_seed(0)
    v, w, h = args.vocab, args.window, args.states
    began = time.perf_counter()
    circuit = pc.compile(pc.structures.hmm(w, h, v, seed=0), dtype=torch.float32)
    print(f"build + compile: {time.perf_counter() - began:.1f}s, peak RSS {peak_rss_gb():.2f} GB")
    logits = torch.randn(1, w, v) * 4
    x_t = torch.randint(0, v, (1, w))
    x_t[:, ::2] = v  # mask id outside the vocabulary (MDLM style); half the window masked
    for name, top_k in (("full vocabulary", None), (f"top-{args.top_k}", args.top_k)):
        for mode in ("latent", "marginal"):
            layer = CoDDLayer(circuit, mask_id=v, temperature=0.5, gate=1.0, mode=mode, top_k=top_k)
            generator = torch.Generator().manual_seed(0)

            def first() -> None:
                circuit.clear_table_cache()
                layer(logits, x_t, generator)

            def cold() -> float:
                return timed_after_update(circuit, lambda: layer(logits, x_t, generator))

            with torch.no_grad():
                first_s = call_seconds(first, args.repeats)
                cold_s = call_seconds_of(cold, args.repeats)
                layer(logits, x_t, generator)  # fills the table cache
                warm_s = call_seconds(lambda: layer(logits, x_t, generator), args.repeats)
            print(f"layer call, {mode:8s} {name:16s}: best / median: cold tables {cold_s[0] * 1e3:7.1f} / {cold_s[1] * 1e3:7.1f} ms, "
                  f"cached tables {warm_s[0] * 1e3:7.1f} / {warm_s[1] * 1e3:7.1f} ms, first call {first_s[0] * 1e3:7.1f} / "
                  f"{first_s[1] * 1e3:7.1f} ms   (peak RSS so far {peak_rss_gb():.2f} GB)")
    with torch.no_grad():
        full = CoDDLayer(circuit, mask_id=v, temperature=0.5, top_k=None)
        truncated = CoDDLayer(circuit, mask_id=v, temperature=0.5, top_k=args.top_k)
        exact = full.evidence(logits, x_t)
        approx = truncated.evidence(logits, x_t)
        log_z = circuit.log_prob(exact.x, missing=exact.missing, soft_evidence=exact.soft)
        log_z_k = circuit.log_prob(approx.x, missing=approx.missing, soft_evidence=approx.soft)
        print(f"top-{args.top_k} error of log Z (evidence mass kept): {float(log_z - log_z_k):.3e} nats")
        emission = torch.rand(h, v)
        evidence = torch.rand(w, v)
        transition = torch.rand(h, h)
        chain = torch.rand(1, h)
        table = torch.empty_like(emission)  # the floors write into buffers touched before: no page faults
        matmul = median_seconds(lambda: evidence @ emission.t(), args.repeats)
        softmax_s = median_seconds(lambda: torch.softmax(emission, -1, out=table), args.repeats)
        chain_s = median_seconds(lambda: [chain @ transition for _ in range(w)], args.repeats)
        flops = 2 * w * v * h
        print(f"dense (W x V) @ (V x H): {matmul * 1e3:.1f} ms ({flops / matmul / 1e9:.0f} GFLOP/s); "
              f"softmax of the (H x V) table into a buffer (one normalise-and-exponentiate pass): {softmax_s * 1e3:.1f} ms; "
              f"W chain products (1 x H) @ (H x H): {chain_s * 1e3:.2f} ms")
    if args.train_batch:
        train_rows(circuit, args)
    print(f"threads {torch.get_num_threads()}, peak RSS {peak_rss_gb():.2f} GB")


def train_rows(circuit: pc.TensorCircuit, args: argparse.Namespace) -> None:
    """One training step's ``codd_loss`` forward+backward at the full vocabulary and with
    top-k candidates (cached logits, as ``train_codd(cache_logits=True, top_k=...)``), next
    to its dense-product floor: the (B W x V) @ (V x H) product of the forward and the
    (H x B W) @ (B W x V) product of the emission table's gradient."""
    v, w, h, batch = args.vocab, args.window, args.states, args.train_batch
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(batch, w, v, generator=generator) * 4
    x_0 = torch.randint(0, v, (batch, w), generator=generator)
    x_t = x_0.clone()
    x_t[:, ::2] = v
    top_values, top_indices = logits.topk(args.top_k, dim=-1)
    cases = {
        "full vocabulary": (None, logits, x_0),
        f"top-{args.top_k}": (args.top_k, SparseLogits(top_values, top_indices),
                              torch.where(x_t == v, top_indices[..., 0], x_0)),  # clean tokens among the candidates
    }
    for name, (top_k, evidence, clean) in cases.items():
        layer = CoDDLayer(circuit, mask_id=v, temperature=1.0, top_k=top_k)

        def step() -> float:  # as in a training loop: the parameters changed since the last step
            circuit.zero_grad(set_to_none=True)
            return timed_after_update(circuit, lambda: codd_loss(layer, clean, evidence, x_t).backward())

        step()
        step()  # two warm-up steps: the first steps after the inference rows pay for fresh memory
        best, median = call_seconds_of(step, args.repeats)
        print(f"codd_loss forward+backward, B = {batch}, {name:16s}: best / median {best * 1e3:7.1f} / {median * 1e3:7.1f} ms"
              f"   (peak RSS so far {peak_rss_gb():.2f} GB)")
    circuit.zero_grad(set_to_none=True)
    evidence = torch.rand(batch * w, v)
    emission = torch.rand(h, v)
    grad = torch.rand(h, batch * w)
    forward_out, gradient_out = torch.empty(batch * w, h), torch.empty(h, v)  # touched before: no page faults
    floor = median_seconds(lambda: (torch.mm(evidence, emission.t(), out=forward_out),
                                    torch.mm(grad, evidence, out=gradient_out)), args.repeats)
    print(f"training floor, B = {batch}: (B W x V) @ (V x H) plus (H x B W) @ (B W x V): {floor * 1e3:.1f} ms "
          f"({2 * 2 * batch * w * v * h / floor / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
