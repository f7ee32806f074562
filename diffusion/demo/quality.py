"""Held-out quality metrics of generated text that need no other model.

* **Sequential-model perplexity**: the backbone used as an exact left-to-right chain-rule model,
  ``log p(y | prompt) = sum_s log p_theta(y_s | prompt, y_<s, masks after s)``, one backbone call per position.
  Sequential decoding with one token per step samples from (approximately) this model, so lower is more coherent.
* **Lexicon hit rate**: the fraction of complete words of the generated text found in the training split's
  word list.
"""

from __future__ import annotations

import re

import torch

from diffusion.demo.backbone import MaskedDiffusionTransformer

WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def lexicon(text: str) -> frozenset[str]:
    """The set of lower-case words (letters, inner apostrophes) of ``text``."""
    return frozenset(WORD.findall(text.lower()))


def complete_words(prompt_tail: str, generated: str) -> list[str]:
    """Words lying wholly inside ``generated``: a word continuing the prompt (``prompt_tail`` ends in a letter and
    ``generated`` starts with one) or running into the end of the text is cut and not counted."""
    words = []
    for match in WORD.finditer(generated.lower()):
        if match.start() == 0 and prompt_tail[-1:].isalpha():
            continue
        if match.end() == len(generated):
            continue
        words.append(match.group())
    return words


def lexicon_hit_rate(prompts: list[str], samples: list[str], words: frozenset[str]) -> tuple[float, int]:
    """(fraction of complete generated words in ``words``, number of complete words)."""
    found = [w in words for p, s in zip(prompts, samples) for w in complete_words(p, s)]
    return (sum(found) / len(found) if found else float("nan")), len(found)


@torch.no_grad()
def sequential_nll(model: MaskedDiffusionTransformer, prompt: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """(B,) chain-rule NLL (nats) of ``generated`` (B, G) given ``prompt`` (B, P), left to right."""
    batch, length = generated.shape
    x = torch.cat([prompt, torch.full_like(generated, model.mask_id)], dim=1)
    offset = prompt.shape[1]
    nll = torch.zeros(batch, dtype=torch.float64)
    for s in range(length):
        log_probs = model(x)[:, offset + s].log_softmax(-1)
        nll -= log_probs.gather(-1, generated[:, s:s + 1])[:, 0].double()
        x[:, offset + s] = generated[:, s]
    return nll
