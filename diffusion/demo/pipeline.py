"""The demo pipeline: corpus -> tokenizer -> backbone -> CoDD layer -> gap table -> few-step generation -> report.

Every phase gets a fixed fraction of the ``minutes`` budget (see :data:`BUDGET`); phases that loop (backbone and
CoDD training, the gap table) stop when their share is spent, and the generation phase sizes its batch from a
timed backbone call.

The backbone comes from one of three places (see :func:`obtain_backbone`): the strong backbone shipped with the
package (default, when it was trained on this corpus with this shape), a backbone saved in ``--out`` by an earlier
run with the same corpus, shape, seed *and training budget*, or fresh training within the budget (always with
``train_backbone=True`` unless such a saved one exists). When no training is needed, the backbone's share of the
budget is given to the other phases in proportion to their shares (:func:`phase_budgets`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import pclayer
from diffusion.demo import report
from diffusion.demo.backbone import (
    BackboneConfig, MaskedDiffusionTransformer, load_backbone, random_crops, save_backbone, train_backbone,
)
from diffusion.demo.corpus import Corpus, CorpusError, check_size, load_corpus_path, load_default_corpus
from diffusion.demo.few_step import backbone_calls, generation_steps, run_generation
from diffusion.demo.gap import evaluation_windows, run_gap, summarise
from diffusion.demo.quality import lexicon
from diffusion.demo.shipped import SHIPPED, WeightsError, corpus_hash, load_weights, read_record, recorded_validation_nll
from diffusion.demo.tokenizer import CharTokenizer
from diffusion.layer import CoDDLayer
from diffusion.train import train_codd

BUDGET = {"backbone": 0.45, "codd": 0.20, "gap": 0.20, "generation": 0.15}
"""Fractions of ``--minutes`` given to each phase."""


class SettingsError(ValueError):
    """A demo setting (command-line option) out of range."""


@dataclass
class DemoSettings:
    """Everything the demo needs; the command line sets the first nine fields."""

    out: Path = Path("codd-demo")
    corpus: str | None = None
    seed: int = 0
    minutes: float = 12.0
    window: int = 32
    states: int = 256
    device: str = "cpu"
    threads: int = 1
    """Torch CPU threads (one is fastest on a shared machine and keeps runs reproducible)."""
    train_backbone: bool = False
    """Train a backbone from scratch within the budget instead of using the shipped one."""
    prefix: int | None = None
    """Clean context characters before the window (default: ``window``)."""
    dim: int = 128
    depth: int = 3
    heads: int = 4
    backbone_batch: int = 32
    codd_batch: int = 64
    codd_lr: float = 0.05
    eval_windows: int = 4096
    eval_batch: int = 128
    generation_prompts: int = 64
    ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    steps_list: tuple[int, ...] | None = None
    """Denoising steps per block; default: the powers of two below ``window``, and ``window`` itself."""
    bootstrap: int = 2000
    plots: bool = True

    def generation_steps(self) -> tuple[int, ...]:
        """Steps-per-block settings of the few-step table (see :func:`diffusion.demo.few_step.generation_steps`)."""
        return generation_steps(self.window, self.steps_list)

    def validate(self) -> None:
        """Raise :class:`SettingsError` naming the first setting out of range."""
        if not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes) and self.minutes > 0):
            raise SettingsError(f"minutes: expected a positive number, got {self.minutes!r}")
        for name in ("window", "states", "threads", "dim", "depth", "heads", "backbone_batch", "codd_batch", "eval_windows",
                     "eval_batch", "generation_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name}: expected a positive int, got {value!r}")
        if self.window < 2:
            raise SettingsError(f"window: expected at least 2 positions, got {self.window}")
        if self.prefix is not None and (not isinstance(self.prefix, int) or self.prefix < 0):
            raise SettingsError(f"prefix: expected a non-negative int, got {self.prefix!r}")
        if self.dim % self.heads:
            raise SettingsError(f"heads: expected a divisor of dim {self.dim}, got {self.heads}")
        if not all(0 < r < 1 for r in self.ratios):
            raise SettingsError(f"ratios: expected mask ratios in (0, 1), got {self.ratios}")
        if self.steps_list is not None and any(s < 1 or s > self.window for s in self.steps_list):
            raise SettingsError(f"steps_list: expected steps in [1, window={self.window}], got {self.steps_list}")


def resolve_device(name: str) -> torch.device:
    """The torch device ``name``, or :class:`SettingsError` when it does not exist or is unavailable here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SettingsError(f"device: {name!r} is not a torch device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device: {name!r} requested but CUDA is not available on this machine")
    return device


def phase_budgets(minutes: float, backbone_ready: bool) -> dict[str, float]:
    """Seconds per phase: :data:`BUDGET` shares of ``minutes``; with ``backbone_ready`` the backbone's share goes to
    the other phases in proportion to their own shares (the backbone phase gets 0)."""
    total = minutes * 60
    if not backbone_ready:
        return {phase: share * total for phase, share in BUDGET.items()}
    rest = 1.0 - BUDGET["backbone"]
    return {phase: 0.0 if phase == "backbone" else share / rest * total for phase, share in BUDGET.items()}


def shipped_backbone_fits(config: BackboneConfig, corpus_digest: str, characters: str, prefix: int,
                          stem: Path = SHIPPED) -> bool:
    """Whether the backbone shipped at ``stem`` was trained on this corpus and tokenizer with this shape and prefix."""
    try:
        record = read_record(stem)
    except WeightsError:
        return False
    return (record.get("config") == asdict(config) and record.get("corpus") == corpus_digest
            and record.get("characters") == characters and record.get("prefix") == prefix)


def obtain_backbone(settings: DemoSettings, config: BackboneConfig, metadata: dict, train_tokens: torch.Tensor,
                    prefix: int, out: Path, shipped: Path = SHIPPED) -> tuple[MaskedDiffusionTransformer, dict]:
    """The run's backbone and how it was obtained.

    Without ``settings.train_backbone``, the shipped backbone is used when it fits (:func:`shipped_backbone_fits`).
    Otherwise a backbone saved in ``out`` is reused when its corpus, tokenizer, shape, seed and training budget
    (``metadata``, which holds ``budget_seconds``) all match; else one is trained within
    ``metadata["budget_seconds"]`` and saved. Prints which, and why.

    Returns:
        The model (eval mode, CPU) and ``{"source": "shipped" | "reused" | "trained", "train_seconds",
        "history", ...}`` (the shipped record under ``"record"``).
    """
    if not settings.train_backbone and shipped_backbone_fits(config, metadata["corpus"], metadata["characters"],
                                                             prefix, shipped):
        model, record = load_weights(shipped)
        print(f"backbone: the shipped strong backbone ({record['steps']} steps, {record['train_minutes']:.0f} min of "
              f"training; recorded validation NLL {record['validation_nll']:.3f}); --train-backbone retrains one")
        return model, {"source": "shipped", "train_seconds": 0.0, "history": [], "record": record}
    checkpoint = out / "backbone.pt"
    model = load_backbone(checkpoint, config, metadata)
    if model is not None:
        print(f"backbone: reusing {checkpoint} (same corpus, shape, seed and training budget of "
              f"{metadata['budget_seconds']:.0f} s)")
        return model, {"source": "reused", "train_seconds": 0.0, "history": []}
    reason = "--train-backbone" if settings.train_backbone else "no shipped backbone fits this corpus and shape"
    if checkpoint.is_file():
        reason += f"; {checkpoint} does not match this run (corpus, shape, seed or training budget)"
    print(f"backbone: training for {metadata['budget_seconds']:.0f} s ({reason})")
    model = MaskedDiffusionTransformer(config)
    started = time.perf_counter()
    history = train_backbone(model, train_tokens, seconds=metadata["budget_seconds"], prefix=prefix,
                             batch_size=settings.backbone_batch, seed=settings.seed)
    seconds = time.perf_counter() - started
    save_backbone(model, checkpoint, metadata)
    print(f"backbone: trained {history[-1]['step']} steps in {seconds:.0f} s, saved to {checkpoint}")
    return model, {"source": "trained", "train_seconds": seconds, "history": history}


def load_corpus(path: str | None) -> Corpus:
    """The default Shakespeare corpus, or the user's ``--corpus``."""
    return load_default_corpus() if path is None else load_corpus_path(path)


def build_layer(window: int, states: int, vocab_size: int, mask_id: int, seed: int, device: torch.device) -> CoDDLayer:
    """A CoDD layer over ``window`` positions: a homogeneous HMM with ``states`` hidden states (paper §6.2).

    The layer is never gated (``gate = inf``): the demo measures CoDD at every mask ratio, fully masked blocks
    included.
    """
    circuit = pclayer.compile(pclayer.structures.hmm(window, states, vocab_size, homogeneous=True, seed=seed))
    return CoDDLayer(circuit.to(device), mask_id=mask_id, gate=math.inf)


def train_layer(layer: CoDDLayer, backbone: MaskedDiffusionTransformer, train_tokens: torch.Tensor, *,
                settings: DemoSettings, seconds: float) -> list:
    """Train the layer's circuit with :func:`diffusion.train.train_codd` (backbone frozen) within ``seconds``.

    Data are random ``prefix + window`` crops of the training text with the prefix as prompt (never masked), as
    in the gap table. ``train_codd`` runs a fixed number of steps, so it is called in rounds: a probe of two
    steps, then rounds sized from the last measured time per step, each covering at most a quarter of the budget
    (so a slowdown of a busy machine overshoots the budget by at most about one round), until it is spent.

    Returns:
        The ``train_codd`` histories of the rounds.
    """
    window = layer.window
    seq_len = backbone.config.seq_len
    batch = settings.codd_batch
    generator = torch.Generator().manual_seed(settings.seed + 7)
    device = next(backbone.parameters()).device
    histories: list[dict] = []
    steps, spent, per_step = 2, 0.0, None
    while steps >= 2:
        data = random_crops(train_tokens, seq_len, steps * batch, generator).to(device)
        prompt_mask = torch.zeros_like(data, dtype=torch.bool)
        prompt_mask[:, : seq_len - window] = True
        t0 = time.perf_counter()
        histories.append(train_codd(layer, backbone, data, epochs=1, batch_size=batch, lr=settings.codd_lr,
                                    prompt_mask=prompt_mask, seed=settings.seed + len(histories), progress=True))
        elapsed = time.perf_counter() - t0
        spent += elapsed
        per_step = elapsed / steps
        steps = int(min(seconds - spent, seconds / 4) / per_step)
    return histories


def run_demo(settings: DemoSettings) -> dict:
    """Run the whole demo and write ``results.json`` (and plots) into ``settings.out``; return the results."""
    settings.validate()
    device = resolve_device(settings.device)
    if settings.plots:
        report.require_matplotlib()
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    window = settings.window
    prefix = window if settings.prefix is None else settings.prefix
    seq_len = prefix + window
    torch.manual_seed(settings.seed)

    corpus = load_corpus(settings.corpus)
    check_size(corpus, seq_len)
    tokenizer = CharTokenizer.fit(corpus.train)
    train_tokens, validation_tokens, test_tokens = (tokenizer.encode(getattr(corpus, s))
                                                     for s in ("train", "validation", "test"))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"corpus: {corpus.name}: train {len(corpus.train):,} / validation {len(corpus.validation):,} / "
          f"test {len(corpus.test):,} characters; vocabulary {tokenizer.vocab_size} tokens (lower-cased characters)")

    # Backbone.
    config = BackboneConfig(tokenizer.vocab_size, seq_len, settings.dim, settings.depth, settings.heads)
    training_budget = phase_budgets(settings.minutes, backbone_ready=False)["backbone"]
    metadata = {"corpus": corpus_hash(corpus.train), "characters": tokenizer.characters, "seed": settings.seed,
                "prefix": prefix, "budget_seconds": training_budget}
    backbone, origin = obtain_backbone(settings, config, metadata, train_tokens, prefix, out)
    budget = phase_budgets(settings.minutes, backbone_ready=origin["source"] != "trained")
    backbone = backbone.to(device).eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    validation_nll = recorded_validation_nll(backbone, validation_tokens.to(device))
    print(f"backbone: validation NLL {validation_nll:.3f} nats per masked character (MDLM noising)")

    # CoDD layer.
    layer = build_layer(window, settings.states, tokenizer.vocab_size, tokenizer.mask_id, settings.seed, device)
    t0 = time.perf_counter()
    codd_history = train_layer(layer, backbone, train_tokens, settings=settings, seconds=budget["codd"])
    codd_seconds = time.perf_counter() - t0
    layer.eval()

    # Gap table.
    windows = evaluation_windows(test_tokens, seq_len, settings.eval_windows, settings.seed).to(device)
    scores = run_gap(backbone, layer, windows, window=window, ratios=settings.ratios, batch_size=settings.eval_batch,
                     seconds=budget["gap"], seed=settings.seed)
    gap_rows = [summarise(s, resamples=settings.bootstrap, seed=settings.seed) for s in scores]
    print("\nPerplexity per masked token on the test split (95 % bootstrap intervals over windows)")
    print(report.gap_table(gap_rows))
    if any(row["gap_closed"]["value"] > 1 for row in gap_rows):
        print("gap closed > 1: CoDD's one-step prediction beats the backbone's own chain rule")

    # Few-step generation.
    probe = evaluation_windows(test_tokens, seq_len, settings.generation_prompts, settings.seed + 1).to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        backbone(probe)
    per_row = (time.perf_counter() - t0) / probe.shape[0]
    calls = backbone_calls(settings.generation_steps(), window)
    prompts_count = max(4, min(settings.generation_prompts, int(budget["generation"] / (calls * per_row * 1.3))))
    probe = probe[:prompts_count]
    generation = run_generation(backbone, layer, probe[:, :prefix], probe[:, prefix:], steps_list=settings.generation_steps(),
                                decode=tokenizer.decode, words=lexicon(corpus.train), seed=settings.seed)
    print(f"\nFew-step generation of one {window}-character block after a {prefix}-character test prompt "
          f"({prompts_count} prompts, temperature 1, random remasking)")
    print(report.generation_table(generation["rows"]))
    print(f"real test continuations: perplexity {generation['reference']['perplexity']:.2f}, "
          f"lexicon hit rate {generation['reference']['lexicon_hit_rate']:.3f}")

    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "budget_seconds": budget,
        "corpus": {"name": corpus.name, "characters": {s: len(getattr(corpus, s)) for s in ("train", "validation", "test")},
                   "documents": {"train": corpus.train_documents, "validation": corpus.validation_documents,
                                 "test": corpus.test_documents}},
        "tokenizer": {"kind": "lower-cased characters", "vocab_size": tokenizer.vocab_size,
                      "characters": tokenizer.characters},
        "backbone": {"config": asdict(config), "parameters": sum(p.numel() for p in backbone.parameters()),
                     **origin, "validation_nll": validation_nll},
        "codd": {"states": settings.states, "window": window, "train_seconds": codd_seconds, "history": codd_history},
        "gap": gap_rows,
        "generation": generation,
        "total_seconds": time.perf_counter() - started,
    }
    report.write_json(results, out / "results.json")
    if settings.plots:
        report.plot_gap(gap_rows, out / "gap.png")
        report.plot_generation(generation["rows"], out / "generation.png", generation["reference"]["perplexity"])
    print(f"\nwrote {out / 'results.json'}" + (f", {out / 'gap.png'}, {out / 'generation.png'}" if settings.plots else "")
          + f" in {results['total_seconds'] / 60:.1f} min")
    return results


__all__ = ["BUDGET", "CorpusError", "DemoSettings", "SettingsError", "build_layer", "load_corpus", "obtain_backbone",
           "phase_budgets", "run_demo", "shipped_backbone_fits"]
