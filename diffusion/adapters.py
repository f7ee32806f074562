"""Adapters from how diffusion-LM codebases produce logits to ``x (B, L) -> logits (B, L, V)``
aligned with positions, a Dream logits hook, and a CoDD denoiser for MDLM's sampler.

Conventions of the codebases (read from their published code):

* LLaDA: ``model(input_ids, attention_mask=...)`` returns an object with ``.logits``
  aligned with positions; the mask id (126336) lies inside the vocabulary.
* Dream: ``model(input_ids, attention_mask, position_ids)`` with, for left-padded batches,
  a 4-d boolean attention mask and position ids counted over the real tokens (``"full"``
  and ``None`` otherwise); position ``i`` is predicted at output ``i - 1``.
* MDLM: ``forward(x, sigma)`` returns log-probabilities (SUBS: the mask column holds
  ``-1e6``, unmasked positions are one-hot); the mask is an extra last column
  (GPT-2 / OpenWebText: ``mask_index = V``) or a vocabulary token (BERT / LM1B: ``[MASK]``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from diffusion.layer import CoDDLayer
from diffusion.windows import apply_to_block, block_couples, masked_span

LogitsFn = Callable[..., torch.Tensor]


def _check(name: str, logits: object, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 3 \
            or logits.shape[:2] != x.shape or (width is not None and logits.shape[2] != width):
        raise ValueError(f"{name}: expected float logits of shape ({x.shape[0]}, {x.shape[1]}, {width or 'V'}), "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}")
    return logits


def callable_logits(fn: LogitsFn) -> LogitsFn:
    """Any callable ``x -> logits (B, L, V)`` already aligned with positions, with its output
    checked; keyword arguments (e.g. ``attention_mask``) are forwarded."""
    return lambda x, **kwargs: _check("fn", fn(x, **kwargs), x)


def llada_logits(model: Callable) -> LogitsFn:
    """LLaDA: ``model(x, **kwargs).logits`` is aligned with positions. Keyword arguments
    (``attention_mask`` for padded batches, as LLaDA's ``generate`` passes it) are forwarded."""
    return lambda x, **kwargs: _check("model(x).logits", model(x, **kwargs).logits, x)


def shift_right(logits: torch.Tensor) -> torch.Tensor:
    """Dream's alignment: position ``i`` is predicted at output ``i - 1``, so shift right by
    one (the first position keeps its own output): ``cat([l[:, :1], l[:, :-1]], 1)``."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def dream_attention(attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | str, torch.Tensor | None]:
    """Dream's sampler's ``(attention_mask, position_ids)`` for a (B, L) 0/1 mask over the
    whole sequence: with padding, a (B, 1, L, L) bool mask (True where both tokens are
    real) and position ids ``cumsum(mask) - 1`` (1 at padding); without, ``("full", None)``."""
    if attention_mask is None or not bool((attention_mask == 0).any()):
        return "full", None
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    real = attention_mask.bool()
    return real[:, None, None, :] & real[:, None, :, None], positions


def dream_logits(model: Callable) -> LogitsFn:
    """Dream: ``model(x, mask, position_ids, **kwargs).logits`` shifted right by one (see
    :func:`shift_right`), where ``(mask, position_ids)`` are rebuilt from a (B, L) 0/1
    ``attention_mask`` keyword the way Dream's sampler builds them (:func:`dream_attention`),
    so left-padded batches give the logits Dream's own sampler sees."""

    def logits(x: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        mask, positions = dream_attention(attention_mask)
        return shift_right(_check("model(x).logits", model(x, mask, positions, **kwargs).logits, x))

    return logits


def _mdlm_to_vocab(out: torch.Tensor, x: torch.Tensor, mask_index: int, vocab_size: int) -> torch.Tensor:
    """MDLM's (B, L, V + 1) or (B, L, V) output as (B, L, V) logits: the extra mask column is
    dropped, an in-vocabulary mask column is set to ``-inf``."""
    if out.ndim == 3 and out.shape[-1] == vocab_size + 1 and mask_index == vocab_size:
        return _check("forward(x, sigma)", out, x, vocab_size + 1)[..., :vocab_size]
    if out.ndim == 3 and out.shape[-1] == vocab_size and 0 <= mask_index < vocab_size:
        out = _check("forward(x, sigma)", out, x, vocab_size).clone()
        out[..., mask_index] = -torch.inf
        return out
    raise ValueError(f"mask_index: expected either an extra last column (output width V + 1 = {vocab_size + 1}, "
                     f"mask_index = {vocab_size}) or an in-vocabulary [MASK] (width V = {vocab_size}, mask_index < "
                     f"{vocab_size}); got width {tuple(getattr(out, 'shape', ()))[-1:]} and mask_index {mask_index}")


def mdlm_sigma(x: torch.Tensor, mask_index: int, eps: float = 1e-3) -> torch.Tensor:
    """(B,) MDLM noise level for the current mask ratio ``r`` of each row under its
    log-linear schedule (``t = r``): ``sigma = -log(1 - (1 - eps) r)``."""
    ratio = (x == mask_index).to(torch.float64).mean(dim=1)
    return -torch.log1p(-(1 - eps) * ratio)


def mdlm_logits(forward: Callable, *, mask_index: int, vocab_size: int) -> LogitsFn:
    """MDLM: ``forward(x, sigma)`` returns log-probabilities over ``V + 1`` columns (mask
    last, GPT-2 setting; the column is dropped) or ``V`` columns with ``[MASK]`` inside
    (BERT setting; its column becomes ``-inf``). The returned function takes ``x`` and an
    optional ``sigma`` (B,); without it, :func:`mdlm_sigma` of the current mask ratio
    (MDLM models trained without time conditioning ignore it).

    Args:
        forward: MDLM's ``Diffusion.forward(x, sigma)``.
        mask_index: MDLM's ``mask_index``.
        vocab_size: ``V``, the CoDD layer's vocabulary (the token ids; the mask included
            when it is a vocabulary token).
    """

    def logits(x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return _mdlm_to_vocab(forward(x, mdlm_sigma(x, mask_index) if sigma is None else sigma), x, mask_index, vocab_size)

    return logits


def mdlm_denoiser(forward: Callable, layer: CoDDLayer, generator: torch.Generator | None = None) -> Callable:
    """A CoDD drop-in for MDLM's ``forward(x, sigma)`` inside its samplers.

    Returns ``(x, sigma) -> log p(x_0)`` of the same shape as ``forward``'s output: at
    masked positions the normalised log-probabilities of the CoDD product (every window
    ``[0, W), [W, 2W), ...`` of the sequence coupled, each with its own gate), so MDLM's
    ``_ddpm_update``, which multiplies ``p(x_0)`` by a rate, keeps its schedule; the mask
    column keeps MDLM's own value (SUBS: ``-1e6``) and unmasked positions keep MDLM's
    one-hot output. ``layer.mask_id`` must be MDLM's ``mask_index``.

    In MDLM's ``Diffusion._ddpm_update`` replace ``self.forward(x, unet_conditioning)``
    with ``codd(x, unet_conditioning)`` where ``codd = mdlm_denoiser(self.forward, layer)``.
    """
    mask_index, vocab = layer.mask_id, layer.vocab_size

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = forward(x, sigma)
        coupled = apply_to_block(layer, _mdlm_to_vocab(out, x, mask_index, vocab), x, 0, x.shape[1], generator,
                                 normalize=True).to(out.dtype)
        result = out.clone()
        result[..., :vocab] = coupled
        result[..., mask_index] = out[..., mask_index]
        return result

    return denoise


class DreamLogitsHook:
    """Dream's ``generation_logits_hook_func(step, x, logits) -> logits`` applying a CoDD
    layer (called by Dream's sampler after its shift).

    Every window holding masked positions is coupled: the windows ``[s, s + W),
    [s + W, s + 2W), ...`` from the first to the last masked position over the batch
    (:func:`diffusion.apply_to_block`). Pass :attr:`tokens_hook` as Dream's
    ``generation_tokens_hook_func`` too: when a generation ends (no masked position left)
    it warns if the gate disabled the layer on every step. Without it, the warning comes at
    the next generation's first step.
    """

    def __init__(self, layer: CoDDLayer, generator: torch.Generator | None = None):
        if not isinstance(layer, CoDDLayer):
            raise TypeError(f"layer: expected a diffusion.CoDDLayer, got {type(layer).__name__}")
        self.layer = layer
        self.generator = generator
        self._seen = False
        self._coupled = False

    def __call__(self, step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if step == 0:
            self._finish()
        start, stop = masked_span(x, self.layer.mask_id)
        self._seen = True
        self._coupled |= block_couples(self.layer, x, start, stop)
        return apply_to_block(self.layer, logits, x, start, stop, self.generator)

    def tokens_hook(self, step: int | None, x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Dream's ``generation_tokens_hook_func``: returns ``x`` unchanged; ends the
        generation's bookkeeping once no masked position is left."""
        if not bool((x == self.layer.mask_id).any()):
            self._finish()
        return x

    def _finish(self) -> None:
        if self._seen and not self._coupled:
            warnings.warn(f"dream_logits_hook: the gate ({self.layer.gate}) disabled the CoDD layer on every step of "
                          "the generation, so it equals Dream's plain sampler. A window is coupled only while its mask "
                          "ratio is below the gate; use gate > 1 (e.g. float('inf')) to couple every step",
                          UserWarning, stacklevel=3)
        self._seen = self._coupled = False


def dream_logits_hook(layer: CoDDLayer, generator: torch.Generator | None = None) -> DreamLogitsHook:
    """The :class:`DreamLogitsHook` of ``layer`` for Dream's ``diffusion_generate``."""
    return DreamLogitsHook(layer, generator)


__all__ = ["DreamLogitsHook", "callable_logits", "dream_attention", "dream_logits", "dream_logits_hook", "llada_logits",
           "mdlm_denoiser", "mdlm_logits", "mdlm_sigma", "shift_right"]
