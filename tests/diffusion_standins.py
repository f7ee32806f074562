"""Tiny stand-ins reproducing the call signatures and conventions of the codebases the CoDD
layer plugs into (written from reading their published code, not copied):

* LLaDA (``generate.py`` of ML-GSAI/LLaDA): ``model(input_ids, attention_mask=None)`` returns an
  object with ``.logits`` aligned with positions; the mask id lies inside the vocabulary;
  ``generate(model, prompt, attention_mask, steps, gen_length, block_length, temperature,
  cfg_scale, remasking, mask_id, logits_eos_inf, confidence_eos_eot_inf)``.
* Dream (``modeling_dream.py`` / ``generation_utils.py``): ``model(input_ids, attention_mask,
  position_ids)`` where left-padded batches get a (B, 1, L, L) bool mask and position ids
  counted over real tokens, otherwise ``"full"`` and ``None``; output ``i`` predicts token
  ``i + 1`` and the sampler shifts right by one before ``generation_logits_hook_func(step, x,
  logits)``; ``generation_tokens_hook_func(step, x, logits)`` runs after each step.
* MDLM (``diffusion.py`` of kuleshov-group/mdlm): ``forward(x, sigma)`` returns SUBS
  log-probabilities (``-1e6`` in the mask column, one-hot rows at unmasked positions); the
  mask is an extra last column (GPT-2) or a vocabulary token (BERT); ``_ddpm_update``
  multiplies ``p(x_0)`` by the rate ``move_chance_t - move_chance_s`` (log-linear schedule).

The ``CODD:`` comments mark the lines a user adds to the real code; the README's section
"Using CoDD in an existing codebase" shows the same lines (a test checks they match).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from diffusion import adapters, apply_to_block

LLADA_VOCAB, LLADA_MASK, LLADA_EOS, LLADA_EOT = 10, 9, 7, 8


class TinyLLaDA(nn.Module):
    """Bidirectional toy mask predictor: token embedding + an embedding of the distance to
    the sequence end (unchanged by left padding) + mean of the attended tokens' embeddings
    (padding excluded by ``attention_mask``) -> logits over ``vocab`` (the mask id included,
    as LLaDA's vocabulary includes 126336). ``bias`` is added to the logits."""

    def __init__(self, vocab: int = LLADA_VOCAB, seed: int = 0, bias: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.token = nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.context = nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.position = nn.Parameter(torch.randn(64, 8, generator=g))
        self.out = nn.Parameter(torch.randn(8, vocab, generator=g))
        self.register_buffer("bias", torch.zeros(vocab) if bias is None else bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        keys = torch.ones_like(input_ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
        context = (self.context[input_ids] * keys[..., None]).sum(1, keepdim=True) / keys.sum(1, keepdim=True)[..., None]
        to_end = self.position[torch.arange(input_ids.shape[1] - 1, -1, -1)]
        return SimpleNamespace(logits=torch.tanh(self.token[input_ids] + to_end + context) @ self.out + self.bias)


@torch.no_grad()
def llada_generate(model, prompt, attention_mask=None, steps=8, gen_length=8, block_length=8, temperature=0.0,
                   cfg_scale=0.0, remasking="low_confidence", mask_id=LLADA_MASK, logits_eos_inf=False,
                   confidence_eos_eot_inf=False, layer=None):
    """LLaDA's batched ``generate`` loop (greedy or Gumbel, low_confidence or random), with the
    CoDD change marked. EOS/EOT ids are this toy vocabulary's."""
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype)], -1)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for num_block in range(num_blocks):
        block_start = prompt_length + num_block * block_length
        block_end = block_start + block_length
        masked_in_block = (x[:, block_start:block_end] == mask_id).sum(1, keepdim=True)
        schedule = (masked_in_block // per_block).repeat(1, per_block)
        schedule += torch.arange(per_block)[None] < masked_in_block % per_block
        for i in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                conditional, unconditional = model(torch.cat([x, un_x]), attention_mask=both_mask).logits.chunk(2)
                logits = unconditional + (cfg_scale + 1) * (conditional - unconditional)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            if logits_eos_inf:
                logits[:, :, LLADA_EOS] = -torch.inf
            if layer is not None:  # CODD: the two lines below
                start = prompt.shape[1] + num_block * block_length
                logits = apply_to_block(layer, logits, x, start, start + block_length)
            scores = logits.double()
            if temperature > 0:
                scores = scores - temperature * torch.log(-torch.log(torch.rand(scores.shape, dtype=torch.float64)))
            x0 = scores.argmax(-1)
            if confidence_eos_eot_inf:
                logits[:, :, [LLADA_EOS, LLADA_EOT]] = -torch.inf
            if remasking == "low_confidence":
                x0_p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, dtype=torch.float64)
            x0_p[:, block_end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            for row in range(batch):
                chosen = confidence[row].topk(int(schedule[row, i])).indices
                x[row, chosen] = x0[row, chosen]
    return x


class TinyDream(nn.Module):
    """Toy Dream model: ``forward(input_ids, attention_mask="full", position_ids=None)``; the
    hidden state mixes the token, its position and the mean of the attended tokens, so a
    left-padded row gives its unpadded logits only with Dream's 4-d mask and position ids.
    Output ``i`` predicts token ``i + 1`` (Dream shifts it)."""

    def __init__(self, vocab: int = LLADA_VOCAB, max_length: int = 64, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.token = nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.position = nn.Parameter(torch.randn(max_length, 8, generator=g))
        self.context = nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.out = nn.Parameter(torch.randn(8, vocab, generator=g))

    def forward(self, input_ids: torch.Tensor, attention_mask="full", position_ids=None):
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, -1)
        if isinstance(attention_mask, str):
            attend = torch.ones(batch, length, length, dtype=torch.bool)
        else:
            attend = attention_mask[:, 0]  # (B, L, L): query i may attend key j
        weights = attend.float()
        context = weights @ self.context[input_ids] / weights.sum(-1, keepdim=True).clamp_min(1)
        hidden = torch.tanh(self.token[input_ids] + self.position[position_ids] + context)
        return SimpleNamespace(logits=hidden @ self.out)


@torch.no_grad()
def dream_sample(model, input_ids, attention_mask, *, max_length, steps, mask_token_id=LLADA_MASK, eps=1e-3,
                 generation_logits_hook_func=lambda step, x, logits: logits,
                 generation_tokens_hook_func=lambda step, x, logits: x):
    """Dream's ``_sample`` with greedy ``maskgit_plus`` decoding (confidence = top probability)."""
    x = torch.nn.functional.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    if attention_mask is not None and bool((attention_mask == 0).any()):
        attention_mask = torch.nn.functional.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1)
        tok_idx = attention_mask.long().cumsum(-1) - 1
        tok_idx.masked_fill_(attention_mask == 0, 1)
        attention_mask = torch.logical_and(attention_mask.unsqueeze(1).unsqueeze(-2), attention_mask.unsqueeze(1).unsqueeze(-1))
    else:
        tok_idx, attention_mask = None, "full"
    timesteps = torch.linspace(1, eps, steps + 1)
    x = generation_tokens_hook_func(None, x, None)
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = model(x, attention_mask, tok_idx).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits = generation_logits_hook_func(i, x, logits)
        probs = torch.softmax(logits.double(), -1)
        confidence, x0 = probs.max(-1)
        t, s = timesteps[i], timesteps[i + 1]
        for row in range(x.shape[0]):
            positions = mask_index[row].nonzero().flatten()
            count = len(positions) if i == steps - 1 else int(len(positions) * (1 - s / t))
            if count:
                best = positions[confidence[row, positions].topk(count).indices]
                x[row, best] = x0[row, best]
        x = generation_tokens_hook_func(i, x, logits)
    return x


class TinyDreamGenerator:
    """The ``model.diffusion_generate`` entry point of a Dream model (greedy)."""

    def __init__(self, model: TinyDream):
        self.model = model

    def diffusion_generate(self, input_ids, attention_mask=None, *, max_new_tokens, steps,
                           generation_logits_hook_func=lambda step, x, logits: logits,
                           generation_tokens_hook_func=lambda step, x, logits: x):
        return dream_sample(self.model, input_ids, attention_mask, max_length=input_ids.shape[1] + max_new_tokens,
                            steps=steps, generation_logits_hook_func=generation_logits_hook_func,
                            generation_tokens_hook_func=generation_tokens_hook_func)


def dream_with_codd(model: TinyDreamGenerator, layer, input_ids, attention_mask, max_new_tokens, steps):
    """User code calling Dream with the CoDD hook (the README's change)."""
    hook = adapters.dream_logits_hook(layer)
    return model.diffusion_generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, steps=steps,
                                    generation_logits_hook_func=hook, generation_tokens_hook_func=hook.tokens_hook)


NEG_INFINITY = -1e6


class TinyMDLM(nn.Module):
    """Toy MDLM ``Diffusion``: ``forward(x, sigma)`` with the SUBS parameterisation.

    ``mask_index = vocab_size`` and output width ``vocab_size + 1`` (GPT-2 setting) when
    ``mask_in_vocab`` is False; width ``vocab_size`` with ``[MASK] = mask_in_vocab_id`` (BERT
    setting) otherwise. Records the ``sigma`` of each call."""

    def __init__(self, vocab_size: int, *, mask_in_vocab: bool, seed: int = 2):
        super().__init__()
        self.vocab_size = vocab_size
        self.mask_index = 1 if mask_in_vocab else vocab_size
        width = vocab_size if mask_in_vocab else vocab_size + 1
        g = torch.Generator().manual_seed(seed)
        self.token = nn.Parameter(torch.randn(width, 8, generator=g))
        self.out = nn.Parameter(torch.randn(8, width, generator=g) * 2)
        self.sigmas: list[torch.Tensor] = []
        self.codd = None

    def use_codd(self, layer) -> None:
        """The README's change to MDLM's ``Diffusion.__init__``."""
        self.codd = adapters.mdlm_denoiser(self.forward, layer)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.sigmas.append(sigma)
        hidden = self.token[x] + self.token[x].mean(1, keepdim=True)
        logits = torch.tanh(hidden) @ self.out
        logits[:, :, self.mask_index] += NEG_INFINITY
        logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        unmasked = x != self.mask_index
        logits[unmasked] = NEG_INFINITY
        logits[unmasked, x[unmasked]] = 0
        return logits


    @torch.no_grad()
    def _ddpm_update(self, x: torch.Tensor, t: torch.Tensor, dt: float, generator: torch.Generator) -> torch.Tensor:
        """MDLM's ``_ddpm_update``: ``q(x_s) = p(x_0) * (move_chance_t - move_chance_s)``, the
        mask column set to ``move_chance_s``, a categorical draw, unmasked positions copied."""
        sigma_t, sigma_s = loglinear_sigma(t), loglinear_sigma(t - dt)
        move_t = (1 - torch.exp(-sigma_t))[:, None, None]
        move_s = (1 - torch.exp(-sigma_s))[:, None, None]
        unet_conditioning = sigma_t
        if self.codd is None:
            log_p_x0 = self.forward(x, unet_conditioning)
        else:  # CODD
            log_p_x0 = self.codd(x, unet_conditioning)
        q_xs = log_p_x0.exp() * (move_t - move_s)
        q_xs[:, :, self.mask_index] = move_s[:, :, 0]
        draws = (q_xs / -torch.log(torch.rand(q_xs.shape, generator=generator, dtype=q_xs.dtype) + 1e-10)).argmax(-1)
        return torch.where(x != self.mask_index, x, draws)


def loglinear_sigma(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """MDLM's log-linear noise: ``sigma(t) = -log(1 - (1 - eps) t)``."""
    return -torch.log1p(-(1 - eps) * t)
