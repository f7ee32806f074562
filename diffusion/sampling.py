"""Token choice and remasking confidences of a masked-diffusion sampler (LLaDA / Dream rules)."""

from __future__ import annotations

import torch

REMASKING = ("low_confidence", "random", "margin", "entropy", "topprob")


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Tokens (B, L): ``argmax(logits / T + Gumbel)`` computed in float64 (greedy at T = 0).

    Same choice as LLaDA's ``exp(logits) / (-log u)^T`` but in log space, so large logits
    cannot overflow; ``-inf`` logits are never chosen.
    """
    scores = logits.to(torch.float64)
    if temperature > 0:
        u = torch.rand(scores.shape, generator=generator, dtype=torch.float64, device=scores.device)
        u = u.clamp(min=torch.finfo(torch.float64).tiny)
        scores = scores - temperature * torch.log(-torch.log(u))
    return scores.argmax(dim=-1)


def confidence(logits: torch.Tensor, tokens: torch.Tensor, rule: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) float64 confidence of choosing ``tokens``; higher is committed first.

    Rules: ``low_confidence`` p(token); ``random`` U(0, 1); ``margin`` top-1 minus top-2
    probability; ``entropy`` minus the entropy of the position; ``topprob`` the largest
    probability. Probabilities are ``softmax(logits)`` in float64.
    """
    if rule not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {rule!r}")
    if rule == "random":
        return torch.rand(tokens.shape, generator=generator, dtype=torch.float64, device=tokens.device)
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    if rule == "low_confidence":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if rule == "topprob":
        return probs.amax(-1)
    if rule == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return -torch.special.entr(probs).sum(-1)


def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to commit per step: each row's masked count split evenly, the
    remainder on the first steps (LLaDA's schedule)."""
    total = masked.sum(dim=1, keepdim=True)
    base, remainder = total // steps, total % steps
    counts = base.expand(-1, steps).clone()
    counts += (torch.arange(steps, device=masked.device)[None] < remainder).long()
    return counts


def top_positions(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: each row's ``counts[b]`` highest-scoring positions."""
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return ranks < counts[:, None]
