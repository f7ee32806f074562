"""Few-step generation with and without the CoDD layer, scored by held-out metrics (see ``quality``)."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from diffusion.demo.backbone import MaskedDiffusionTransformer
from diffusion.demo.quality import lexicon_hit_rate, sequential_nll
from diffusion.generate import generate


class Timed:
    """Wraps a callable (the backbone, the layer), adding up its wall time and calls; other attributes pass
    through to the wrapped object."""

    def __init__(self, wrapped):
        self.wrapped = wrapped
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.wrapped(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


def generation_steps(window: int, steps_list: tuple[int, ...] | None) -> tuple[int, ...]:
    """Steps-per-block settings of a few-step table: ``steps_list``, or by default the powers
    of two below ``window`` and ``window`` itself."""
    if steps_list is not None:
        return tuple(steps_list)
    return tuple(2 ** i for i in range(window.bit_length()) if 2 ** i < window) + (window,)


def backbone_calls(steps_list: tuple[int, ...], window: int) -> int:
    """Backbone calls of :func:`run_generation`: generation (plain and CoDD) plus chain-rule scoring."""
    return 2 * sum(steps_list) + (2 * len(steps_list) + 1) * window


@torch.no_grad()
def run_generation(model: MaskedDiffusionTransformer, layer, prompts: torch.Tensor, references: torch.Tensor, *,
                   steps_list: tuple[int, ...], decode, words: frozenset[str], seed: int) -> dict:
    """Generate one ``W``-token block after each prompt for every number of steps, plain and with CoDD.

    Args:
        prompts: (N, P) clean prompt tokens; references: (N, W) the real continuations.
        steps_list: denoising steps per block, each in ``[1, W]``.
        decode: ids -> text; words: the training lexicon.

    Sampling uses temperature 1 and random remasking, so 32 steps of a 32-token block is exact ancestral
    sampling from the chain-rule model and fewer steps expose the factorization barrier.

    Returns:
        ``{"rows": [...], "reference": {...}, "samples": {...}}`` with per-step perplexity, lexicon hit rate and
        seconds per step of the backbone and of the layer.
    """
    window = references.shape[1]
    prompt_text = [decode(p) for p in prompts]
    rows, samples = [], {}
    for steps in tqdm(steps_list, desc="few-step generation", unit="setting", leave=False):
        row: dict = {"steps": steps}
        for name, with_layer in (("plain", False), ("codd", True)):
            timed_model = Timed(model)
            timed_layer = Timed(layer) if with_layer else None
            out = generate(timed_model, prompts, gen_length=window, block_length=window, steps=steps,
                           remasking="random", temperature=1.0, layer=timed_layer, mask_id=model.mask_id,
                           generator=torch.Generator().manual_seed(seed + steps))
            generated = out[:, prompts.shape[1]:]
            nll = sequential_nll(model, prompts, generated)
            texts = [decode(g) for g in generated]
            hit_rate, word_count = lexicon_hit_rate(prompt_text, texts, words)
            row[name] = {"perplexity": math.exp(float(nll.sum()) / generated.numel()),
                         "lexicon_hit_rate": hit_rate, "words": word_count}
            samples[f"{name}_{steps}_steps"] = texts[:4]
            if with_layer:
                row["seconds_per_step_layer"] = timed_layer.seconds / steps
            else:
                row["seconds_per_step_backbone"] = timed_model.seconds / steps
        rows.append(row)
    nll = sequential_nll(model, prompts, references)
    texts = [decode(r) for r in references]
    hit_rate, word_count = lexicon_hit_rate(prompt_text, texts, words)
    reference = {"perplexity": math.exp(float(nll.sum()) / references.numel()), "lexicon_hit_rate": hit_rate,
                 "words": word_count}
    samples["prompts"] = prompt_text[:4]
    samples["real_continuations"] = texts[:4]
    return {"rows": rows, "reference": reference, "samples": samples, "prompts": prompts.shape[0]}
