"""The exact-oracle experiment: the factorization barrier when the denoiser is perfect.

Pipeline (each phase gets a fixed share of ``minutes``, see :data:`BUDGET`):

1. **Teacher**: a ``teacher_states``-state HMM over windows of ``W`` characters of the corpus, fitted by EM
   (:func:`~diffusion.demo.oracle.teacher.fit_teacher`). It is the data distribution from here on.
2. **Oracle backbone**: :class:`~diffusion.demo.oracle.teacher.ExactOracle`, the teacher's exact conditional
   marginals. A perfect denoiser: its only error is the factorization.
3. **Students**: CoDD layers (homogeneous HMMs of ``student_states`` states) trained with
   :func:`diffusion.train_codd` on teacher samples with the oracle frozen. All students see the same training rows
   and masks (the oracle's answers are memoized) and the same number of epochs.
4. **Gap table** on fresh teacher samples, for every (mask ratio, student): (a) one-step = the product of the
   exact marginals, (b) sequential = the teacher's exact conditional ``log p(x^M | x^U)`` (the true conditional
   entropy on average), (c) CoDD = the student layer's exact ``log p_hat(x^M | x_t)``; perplexity per masked
   token and the fraction of the gap closed ``(a - c) / (a - b)`` with bootstrap intervals over windows.
5. **Few-step generation**: ``W``-token blocks sampled from scratch with ``s`` denoising steps, plain (oracle
   marginals) and with the largest student, scored by the teacher's exact log-likelihood of the samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion.demo import report
from diffusion.demo.backbone import random_crops
from diffusion.demo.corpus import Corpus, check_size, load_corpus_path, load_default_corpus
from diffusion.demo.few_step import generation_steps
from diffusion.demo.gap import GapScores, summarise, timed_batches
from diffusion.demo.oracle import plots
from diffusion.demo.oracle.teacher import ExactOracle, conditional_nll, fit_teacher
from diffusion.demo.pipeline import build_layer
from diffusion.demo.tokenizer import CharTokenizer
from diffusion.generate import generate
from diffusion.layer import CoDDLayer
from diffusion.train import train_codd

BUDGET = {"teacher": 0.20, "students": 0.45, "gap": 0.17, "generation": 0.18}
"""Fractions of ``minutes`` per phase (the students' share includes the oracle's answers on their training rows)."""


class OracleSettingsError(ValueError):
    """An oracle-experiment setting out of range."""


@dataclass
class OracleSettings:
    """Settings of the oracle experiment; the command line sets ``corpus``, ``minutes`` and ``out``."""

    out: Path = Path("codd-oracle")
    corpus: str | None = None
    minutes: float = 12.0
    seed: int = 0
    window: int = 32
    teacher_states: int = 512
    teacher_windows: int = 16384
    student_states: tuple[int, ...] = (8, 32, 128, 512)
    ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    train_rows: int = 8192
    """Most teacher samples the students train on (fewer when the oracle is too slow for the budget)."""
    codd_batch: int = 64
    codd_lr: float = 0.05
    eval_windows: int = 2048
    eval_batch: int = 128
    generation_samples: int = 256
    steps_list: tuple[int, ...] | None = None
    """Denoising steps per block; default: powers of two below ``window``, and ``window``."""
    bootstrap: int = 2000
    threads: int = 1
    plots: bool = True

    def generation_steps(self) -> tuple[int, ...]:
        """Steps-per-block settings of the few-step table (see :func:`diffusion.demo.few_step.generation_steps`)."""
        return generation_steps(self.window, self.steps_list)

    def validate(self) -> None:
        """Raise :class:`OracleSettingsError` naming the first setting out of range."""
        if not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes) and self.minutes > 0):
            raise OracleSettingsError(f"minutes: expected a positive number, got {self.minutes!r}")
        for name in ("window", "teacher_states", "teacher_windows", "train_rows", "codd_batch", "eval_windows",
                     "eval_batch", "generation_samples", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OracleSettingsError(f"{name}: expected a positive int, got {value!r}")
        if self.window < 2:
            raise OracleSettingsError(f"window: expected at least 2 positions, got {self.window}")
        if not self.student_states or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                          for s in self.student_states):
            raise OracleSettingsError(f"student_states: expected positive ints, got {self.student_states!r}")
        if not self.ratios or not all(0 < r < 1 for r in self.ratios):
            raise OracleSettingsError(f"ratios: expected mask ratios in (0, 1), got {self.ratios}")
        if any(s < 1 or s > self.window for s in self.generation_steps()):
            raise OracleSettingsError(f"steps_list: expected steps in [1, window={self.window}], got {self.steps_list}")


def train_students(oracle: ExactOracle, data: torch.Tensor, settings: OracleSettings, vocab_size: int,
                   seconds: float) -> tuple[dict[int, CoDDLayer], list[dict]]:
    """Train one CoDD layer per ``settings.student_states`` on ``data`` (N, W) with the oracle frozen.

    Every student runs :func:`train_codd` with the same seed (hence the same masks, whose oracle answers are
    memoized) for one epoch, then all run the same number of further epochs, as many as the rest of ``seconds``
    allows from the measured cost of the first epoch.

    Returns:
        The trained layers (eval mode) by number of states, and one record per student (states, epochs,
        seconds, losses).
    """
    layers, records, costs = {}, [], []
    spent = 0.0
    for states in settings.student_states:
        layer = build_layer(settings.window, states, vocab_size, oracle.mask_id, settings.seed + states, torch.device("cpu"))
        oracle_before = oracle.seconds
        started = time.perf_counter()
        history = train_codd(layer, oracle, data, epochs=1, batch_size=settings.codd_batch, lr=settings.codd_lr,
                             cache_logits=True, seed=settings.seed, progress=True)
        elapsed = time.perf_counter() - started
        spent += elapsed
        costs.append(elapsed - (oracle.seconds - oracle_before))
        layers[states] = layer
        records.append({"states": states, "parameters": sum(p.numel() for p in layer.parameters()), "epochs": 1,
                        "seconds": elapsed, "epoch_loss": list(history["epoch_loss"])})
    extra = int((seconds - spent) / max(sum(costs), 1e-9))
    if extra >= 1:
        for layer, record in zip(layers.values(), records):
            started = time.perf_counter()
            history = train_codd(layer, oracle, data, epochs=extra, batch_size=settings.codd_batch,
                                 lr=settings.codd_lr, cache_logits=True, seed=settings.seed, progress=True)
            record["epochs"] += extra
            record["seconds"] += time.perf_counter() - started
            record["epoch_loss"] += list(history["epoch_loss"])
    for layer in layers.values():
        layer.eval()
    return layers, records


@torch.no_grad()
def score_gap(teacher, oracle: ExactOracle, layers: dict[int, CoDDLayer], windows: torch.Tensor, *,
              ratios: tuple[float, ...], batch_size: int, seconds: float, seed: int) -> dict[tuple[float, int], GapScores]:
    """Score batches of ``windows`` (N, W) at every ratio until ``seconds`` have passed (at least one batch).

    ``k = max(1, round(r W))`` positions are masked uniformly at random per window; (a), (b) and the CoDD score
    of every layer are computed on the same masks. Returns a :class:`GapScores` per (ratio, student states).
    """
    generator = torch.Generator().manual_seed(seed)
    width = windows.shape[1]
    parts: dict[tuple[float, int], list[tuple[torch.Tensor, ...]]] = {}
    for x_0 in timed_batches(windows, batch_size, seconds, "gap table (exact oracle)"):
        rows = torch.arange(x_0.shape[0])[:, None]
        for ratio in ratios:
            k = max(1, round(ratio * width))
            chosen = torch.rand(x_0.shape, generator=generator).argsort(dim=1)[:, :k]
            masked = torch.zeros_like(x_0, dtype=torch.bool)
            masked[rows, chosen] = True
            x_t = torch.where(masked, torch.full_like(x_0, oracle.mask_id), x_0)
            log_marginals = oracle(x_t)
            one_step = -(log_marginals.gather(-1, x_0[..., None])[..., 0] * masked).sum(1).double()
            sequential = conditional_nll(teacher, x_0, masked)
            for states, layer in layers.items():
                codd = -layer.log_prob(x_0, log_marginals, x_t).double()
                parts.setdefault((ratio, states), []).append((one_step, sequential, codd))
    return {key: GapScores(ratio=key[0], masked_per_window=max(1, round(key[0] * width)),
                           one_step=torch.cat([p[0] for p in value]), sequential=torch.cat([p[1] for p in value]),
                           codd=torch.cat([p[2] for p in value])) for key, value in parts.items()}


def _perplexity(nll: torch.Tensor, width: int, resamples: int, seed: int) -> dict:
    """Perplexity per token of summed NLLs (N,) of ``width``-token samples, with a 95 % bootstrap interval."""
    n = nll.numel()
    index = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    boot = torch.exp(nll[index].mean(1) / width)
    return {"value": float(torch.exp(nll.mean() / width)),
            "ci": [float(torch.quantile(boot, 0.025)), float(torch.quantile(boot, 0.975))]}


@torch.no_grad()
def run_generation(teacher, oracle: ExactOracle, layer: CoDDLayer, *, states: int, samples: int, steps_list: tuple[int, ...],
                   resamples: int, seed: int) -> dict:
    """Sample ``samples`` blocks of ``W`` tokens from scratch per number of steps, plain and with ``layer`` (a
    student of ``states`` states).

    Temperature 1 and random remasking: with ``W`` steps the plain sampler draws one token per step from its exact
    conditional, i.e. exact ancestral sampling from the teacher. Every sample is scored by the teacher's exact
    log-likelihood; the reference is fresh teacher samples (the teacher's entropy rate).

    Returns:
        ``{"rows": [{"steps", "plain": {"perplexity": {value, ci}}, "codd": {...}}], "reference": {...}}``.
    """
    width = teacher.num_vars
    empty = torch.zeros(samples, 0, dtype=torch.long)
    rows = []
    for steps in tqdm(steps_list, desc="few-step generation (oracle)", unit="setting", leave=False):
        row: dict = {"steps": steps}
        for name, with_layer in (("plain", False), ("codd", True)):
            drawn = generate(oracle, empty, gen_length=width, block_length=width, steps=steps, remasking="random",
                             temperature=1.0, layer=layer if with_layer else None, mask_id=oracle.mask_id,
                             generator=torch.Generator().manual_seed(seed + steps))
            nll = -teacher.log_prob(drawn).double()
            row[name] = {"perplexity": _perplexity(nll, width, resamples, seed)}
        rows.append(row)
    reference = teacher.sample(samples, generator=torch.Generator().manual_seed(seed + 999))
    nll = -teacher.log_prob(reference).double()
    return {"rows": rows, "reference": {"perplexity": _perplexity(nll, width, resamples, seed)}, "samples": samples,
            "student_states": states}


def _corpus_windows(corpus: Corpus, tokenizer: CharTokenizer, window: int, count: int, seed: int) -> torch.Tensor:
    tokens = tokenizer.encode(corpus.train)
    return random_crops(tokens, window, count, torch.Generator().manual_seed(seed))


def run_oracle(settings: OracleSettings) -> dict:
    """Run the whole oracle experiment; write ``results.json`` (and PNG plots) into ``settings.out``."""
    settings.validate()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    budget = {phase: share * settings.minutes * 60 for phase, share in BUDGET.items()}
    if settings.plots:
        report.require_matplotlib()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_default_corpus() if settings.corpus is None else load_corpus_path(settings.corpus)
    check_size(corpus, settings.window)
    tokenizer = CharTokenizer.fit(corpus.train)
    vocab, width = tokenizer.vocab_size, settings.window
    print(f"corpus: {corpus.name}: {len(corpus.train):,} training characters; vocabulary {vocab} tokens")

    # 1. Teacher.
    windows = _corpus_windows(corpus, tokenizer, width, settings.teacher_windows, settings.seed)
    t0 = time.perf_counter()
    teacher, teacher_ll = fit_teacher(windows, states=settings.teacher_states, vocab_size=vocab,
                                      seconds=budget["teacher"], seed=settings.seed)
    teacher_seconds = time.perf_counter() - t0
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    test_windows = random_crops(tokenizer.encode(corpus.test), width, 1024, torch.Generator().manual_seed(settings.seed))
    with torch.no_grad():
        test_nll = float(-teacher.log_prob(test_windows).mean()) / width
    entropy_rate = float(-teacher.log_prob(teacher.sample(1024, generator=torch.Generator().manual_seed(1))).mean()) / width
    print(f"teacher: {settings.teacher_states}-state HMM over {width} positions, {len(teacher_ll)} EM epochs in "
          f"{teacher_seconds:.0f} s; test-split NLL {test_nll:.3f} nats/char; entropy rate {entropy_rate:.3f} nats/char")

    # 2-3. Oracle and students.
    probe = teacher.sample(64, generator=torch.Generator().manual_seed(2))
    probe = torch.where(torch.rand(probe.shape, generator=torch.Generator().manual_seed(3)) < 0.5,
                        tokenizer.mask_id, probe)
    timer = ExactOracle(teacher, tokenizer.mask_id)
    timer(probe)
    per_row = timer.seconds / probe.shape[0]
    train_oracle = ExactOracle(teacher, tokenizer.mask_id, memoize=True)
    rows = max(settings.codd_batch, min(settings.train_rows, int(0.4 * budget["students"] / per_row)))
    train_data = teacher.sample(rows, generator=torch.Generator().manual_seed(settings.seed + 3))
    layers, student_records = train_students(train_oracle, train_data, settings, vocab, budget["students"])
    oracle = ExactOracle(teacher, tokenizer.mask_id)  # evaluation rows are all new: no memo

    # 4. Gap table.
    eval_data = teacher.sample(settings.eval_windows, generator=torch.Generator().manual_seed(settings.seed + 4))
    scores = score_gap(teacher, oracle, layers, eval_data, ratios=settings.ratios, batch_size=settings.eval_batch,
                       seconds=budget["gap"], seed=settings.seed)
    gap_rows = []
    for (ratio, states), value in sorted(scores.items()):
        gap_rows.append({"student_states": states, **summarise(value, resamples=settings.bootstrap, seed=settings.seed)})
    print("\nExact oracle: perplexity per masked token on teacher samples (95 % bootstrap intervals over windows)")
    print(plots.oracle_gap_table(gap_rows))

    # 5. Few-step generation with the largest student; the batch is sized from a timed oracle and layer call.
    steps_list = settings.generation_steps()
    largest = max(layers)
    t0 = time.perf_counter()
    with torch.no_grad():
        layers[largest](oracle(probe), probe, generator=torch.Generator().manual_seed(0))
    per_step_row = (time.perf_counter() - t0) / probe.shape[0] + per_row  # one plain step plus one CoDD step
    samples = max(8, min(settings.generation_samples, int(budget["generation"] / (sum(steps_list) * per_step_row * 1.3))))
    generation = run_generation(teacher, oracle, layers[largest], states=largest, samples=samples, steps_list=steps_list,
                                resamples=settings.bootstrap, seed=settings.seed)
    print(f"\nFew-step generation of {samples} blocks of {width} tokens from scratch, scored by the teacher "
          f"(CoDD: {largest}-state student)")
    print(plots.generation_table(generation))

    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "budget_seconds": budget,
        "corpus": {"name": corpus.name, "train_characters": len(corpus.train)},
        "tokenizer": {"vocab_size": vocab, "characters": tokenizer.characters},
        "teacher": {"states": settings.teacher_states, "window": width, "train_windows": settings.teacher_windows,
                    "em_epochs": len(teacher_ll), "train_ll_per_window": teacher_ll, "train_seconds": teacher_seconds,
                    "test_nll_per_char": test_nll, "entropy_rate_per_char": entropy_rate},
        "oracle": {"train_rows": rows, "posterior_seconds": train_oracle.seconds,
                   "rows_computed": train_oracle.calls},
        "students": student_records,
        "gap": gap_rows,
        "generation": generation,
        "total_seconds": time.perf_counter() - started,
    }
    report.write_json(results, out / "results.json")
    if settings.plots:
        plots.plot_gap_closed(gap_rows, out / "gap_closed.png")
        plots.plot_generation(generation, out / "generation.png")
    print(f"\nwrote {out / 'results.json'}" + (f", {out / 'gap_closed.png'}, {out / 'generation.png'}"
                                               if settings.plots else "")
          + f" in {results['total_seconds'] / 60:.1f} min")
    return results
