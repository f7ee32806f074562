"""diffusion as a drop-in for LLaDA, Dream and MDLM code (issue 12), on stand-ins that keep
their call signatures and conventions (tests/diffusion_standins.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import diffusion
import pclayer as pc
from diffusion import CoDDLayer, adapters, apply_to_block, codd_loss, generate, train_codd, windowed_loss
from tests.diffusion_standins import (
    LLADA_EOS, LLADA_EOT, LLADA_MASK, LLADA_VOCAB, TinyDream, TinyDreamGenerator, TinyLLaDA, TinyMDLM, dream_sample,
    dream_with_codd, llada_generate, loglinear_sigma,
)

ALWAYS = float("inf")


def hmm_layer(window: int, vocab: int, mask_id: int, seed: int = 0, **kwargs) -> CoDDLayer:
    return CoDDLayer(pc.compile(pc.structures.hmm(window, 3, vocab, seed=seed), dtype=torch.float64), mask_id=mask_id,
                     **kwargs)


def no_mask_bias(strength: float = -8.0) -> torch.Tensor:
    bias = torch.zeros(LLADA_VOCAB)
    bias[LLADA_MASK] = strength
    return bias


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts (pad token 0) and their attention mask."""
    prompt = torch.tensor([[0, 0, 3, 4], [5, 2, 6, 1]])
    return prompt, (prompt != 0).long().index_put((torch.tensor([1]), torch.tensor([0])), torch.tensor(1))


# ----------------------------------------------------------------------------- point 1: the gate


def test_generate_warns_when_the_gate_disables_the_layer_on_every_step():
    model = adapters.llada_logits(TinyLLaDA(bias=no_mask_bias()))
    prompt = torch.tensor([[1, 2]])
    layer = hmm_layer(4, LLADA_VOCAB, LLADA_MASK)  # default gate 1.0
    with pytest.warns(UserWarning, match="gate .* disabled the CoDD layer on every step") as record:
        coupled_never = generate(model, prompt, gen_length=8, block_length=4, steps=2, layer=layer)
    assert len(record) == 1  # once per call, not once per step
    plain = generate(model, prompt, gen_length=8, block_length=4, steps=2, mask_id=LLADA_MASK)
    assert torch.equal(coupled_never, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, prompt, gen_length=8, block_length=4, steps=2, layer=layer, gate=ALWAYS)
        generate(model, prompt, gen_length=8, block_length=4, steps=4, layer=layer)  # later steps have ratio < 1


def test_dream_hook_warns_once_per_generation_when_never_coupled():
    model = TinyDreamGenerator(TinyDream())
    prompt = torch.tensor([[1, 2, 3]])
    layer = hmm_layer(4, LLADA_VOCAB, LLADA_MASK)  # gate 1.0 with one step: never coupled
    with pytest.warns(UserWarning, match="disabled the CoDD layer on every step") as record:
        dream_with_codd(model, layer, prompt, None, max_new_tokens=6, steps=1)
    assert len(record) == 1
    hook = adapters.dream_logits_hook(layer)  # without the tokens hook: the warning comes with the next generation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.diffusion_generate(prompt, max_new_tokens=6, steps=1, generation_logits_hook_func=hook)
    with pytest.warns(UserWarning, match="disabled the CoDD layer"):
        model.diffusion_generate(prompt, max_new_tokens=6, steps=1, generation_logits_hook_func=hook)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dream_with_codd(model, hmm_layer(4, LLADA_VOCAB, LLADA_MASK, gate=ALWAYS), prompt, None, 6, 1)
        assert not bool((out == LLADA_MASK).any())


# ----------------------------------------------------------------------------- point 2: the mask id


@pytest.mark.parametrize("mode", ["latent", "marginal", "sample", "any_order"])
def test_layer_output_never_chooses_an_in_vocabulary_mask(mode):
    vocab, mask = 5, 2
    layer = hmm_layer(3, vocab, mask, mode=mode, gate=0.5)
    logits = torch.zeros(3, 3, vocab, dtype=torch.float64)
    logits[..., mask] = 10.0  # the backbone favours the mask
    x_t = torch.tensor([[mask, 0, 1], [mask, mask, 0], [mask, mask, mask]])  # ratios 1/3 (coupled), 2/3, 1 (plain)
    out = layer(logits, x_t, torch.Generator().manual_seed(0))
    masked = x_t == mask
    assert bool((out[..., mask][masked] == -torch.inf).all())
    assert bool((out.argmax(-1)[masked] != mask).all())
    assert torch.equal(out[~masked], logits[~masked])
    probs = layer(logits, x_t, torch.Generator().manual_seed(0), normalize=True).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_0: contains the mask id"):
        layer.log_prob(torch.tensor([[mask, 0, 1]]), logits[:1], x_t[:1])


def test_generate_never_commits_an_in_vocabulary_mask():
    favour_mask = TinyLLaDA(bias=-no_mask_bias(3.0))  # the mask has the largest logit nearly everywhere
    prompt = torch.tensor([[1, 2], [3, 4]])
    layer = hmm_layer(4, LLADA_VOCAB, LLADA_MASK, gate=ALWAYS)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        for with_layer in (None, layer):
            out = generate(adapters.llada_logits(favour_mask), prompt, gen_length=8, block_length=4, steps=4,
                           temperature=1.0, remasking="random", layer=with_layer, mask_id=LLADA_MASK, generator=g)
            assert not bool((out == LLADA_MASK).any())


# ----------------------------------------------------------------------------- point 3: mismatched mask ids


def test_mismatched_mask_ids_are_refused():
    layer = hmm_layer(4, LLADA_VOCAB, LLADA_MASK)
    with pytest.raises(ValueError, match="mask_id: 8 differs from layer.mask_id 9"):
        generate(adapters.llada_logits(TinyLLaDA()), torch.tensor([[1]]), gen_length=4, block_length=4, steps=4,
                 layer=layer, mask_id=8)


# ----------------------------------------------------------------------------- point 4: padding and LLaDA's options


@pytest.mark.parametrize("options", [
    {},
    {"cfg_scale": 1.5},
    {"logits_eos_inf": True},
    {"confidence_eos_eot_inf": True},
    {"cfg_scale": 0.5, "logits_eos_inf": True, "confidence_eos_eot_inf": True},
])
@pytest.mark.parametrize("with_layer", [False, True])
def test_generate_equals_lladas_own_loop_on_a_padded_batch(options, with_layer):
    model = TinyLLaDA(bias=no_mask_bias())
    prompt, attention_mask = padded_prompts()
    layer = hmm_layer(4, LLADA_VOCAB, LLADA_MASK, gate=ALWAYS, mode="marginal") if with_layer else None
    theirs = llada_generate(model, prompt, attention_mask, steps=8, gen_length=8, block_length=4, layer=layer,
                            **options)
    ours = generate(adapters.llada_logits(model), prompt, attention_mask=attention_mask, gen_length=8, block_length=4,
                    steps=8, mask_id=LLADA_MASK, layer=layer, eos_id=LLADA_EOS, eot_id=LLADA_EOT, **options)
    assert torch.equal(ours, theirs)
    # The padded row generates what its prompt alone generates: the mask reached the model.
    alone = generate(adapters.llada_logits(model), prompt[:1, 2:], gen_length=8, block_length=4, steps=8,
                     mask_id=LLADA_MASK, layer=layer, eos_id=LLADA_EOS, eot_id=LLADA_EOT, **options)
    assert torch.equal(ours[0, 4:], alone[0, 2:])


def test_llada_options_change_what_is_generated():
    bias = no_mask_bias()
    bias[LLADA_EOS] = 2.0
    bias[LLADA_EOT] = 1.0
    model = adapters.llada_logits(TinyLLaDA(bias=bias))
    prompt = torch.tensor([[1, 2, 3]])
    kwargs = {"gen_length": 8, "block_length": 8, "steps": 8, "mask_id": LLADA_MASK, "eos_id": LLADA_EOS,
              "eot_id": LLADA_EOT}
    plain = generate(model, prompt, **kwargs)
    assert bool((plain == LLADA_EOS).any())
    assert not bool((generate(model, prompt, logits_eos_inf=True, **kwargs) == LLADA_EOS).any())
    calls = []

    def recording(x):
        calls.append(x.clone())
        return model(x)

    late = generate(recording, prompt, confidence_eos_eot_inf=True, **kwargs)
    ends = ((late[0] == LLADA_EOS) | (late[0] == LLADA_EOT)).nonzero().flatten().tolist()
    others = [i for i in range(3, 11) if i not in ends]
    first_step = {i: next(s for s, x in enumerate(calls + [late]) if x[0, i] != LLADA_MASK) for i in range(3, 11)}
    assert ends and max(first_step[i] for i in others) <= min(first_step[i] for i in ends)
    assert not torch.equal(generate(model, prompt, cfg_scale=2.0, **kwargs), plain)


def test_dream_adapter_rebuilds_dreams_mask_and_positions():
    model = TinyDream()
    prompt, attention_mask = padded_prompts()
    seen = []
    dream_sample(model, prompt, attention_mask, max_length=10, steps=3,
                 generation_logits_hook_func=lambda step, x, logits: seen.append((x.clone(), logits)) or logits)
    fn = adapters.dream_logits(model)
    full_mask = torch.cat([attention_mask, torch.ones(2, 6, dtype=torch.long)], 1)
    for x, logits in seen:
        assert torch.equal(fn(x, attention_mask=full_mask), logits)
        assert (fn(x) - logits).abs().max() > 0.05  # without the mask the padded row's logits differ
    ours = generate(fn, prompt, attention_mask=attention_mask, gen_length=6, block_length=6, steps=3,
                    mask_id=LLADA_MASK, remasking="topprob")
    alone = generate(fn, prompt[:1, 2:], gen_length=6, block_length=6, steps=3, mask_id=LLADA_MASK,
                     remasking="topprob")
    assert torch.equal(ours[0, 4:], alone[0, 2:])
    assert adapters.dream_attention(torch.ones(2, 3, dtype=torch.long)) == ("full", None)


# ----------------------------------------------------------------------------- point 5: MDLM


@pytest.mark.parametrize("mask_in_vocab", [False, True])
def test_mdlm_adapter_handles_both_mask_conventions_and_passes_sigma(mask_in_vocab):
    vocab = 6
    mdlm = TinyMDLM(vocab, mask_in_vocab=mask_in_vocab)
    x = torch.tensor([[0, mdlm.mask_index, mdlm.mask_index, 3]])
    fn = adapters.mdlm_logits(mdlm.forward, mask_index=mdlm.mask_index, vocab_size=vocab)
    out = fn(x)
    assert out.shape == (1, 4, vocab)
    torch.testing.assert_close(mdlm.sigmas[-1], loglinear_sigma(torch.tensor([0.5], dtype=torch.float64)))
    if mask_in_vocab:
        assert bool((out[..., mdlm.mask_index] == -torch.inf).all())
    sigma = torch.tensor([0.3])
    fn(x, sigma)
    assert mdlm.sigmas[-1] is sigma
    with pytest.raises(ValueError, match="mask_index"):
        adapters.mdlm_logits(mdlm.forward, mask_index=mdlm.mask_index, vocab_size=vocab + 3)(x)


@pytest.mark.parametrize("mask_in_vocab", [False, True])
def test_mdlm_denoiser_keeps_mdlms_schedule(mask_in_vocab):
    vocab, window, length, rows = 6, 8, 32, 16
    mdlm = TinyMDLM(vocab, mask_in_vocab=mask_in_vocab)
    layer = hmm_layer(window, vocab, mdlm.mask_index, gate=ALWAYS)
    codd = adapters.mdlm_denoiser(mdlm.forward, layer, torch.Generator().manual_seed(0))
    x = torch.full((rows, length), mdlm.mask_index)
    x[:, ::5] = torch.randint(0, vocab, (rows, 7), generator=torch.Generator().manual_seed(1)).clamp_min(2)
    sigma = loglinear_sigma(torch.full((rows,), 0.8))
    theirs, ours = mdlm.forward(x, sigma), codd(x, sigma)
    assert ours.shape == theirs.shape
    masked = x == mdlm.mask_index
    real = [t for t in range(ours.shape[-1]) if t != mdlm.mask_index]
    torch.testing.assert_close(ours[..., real].exp().sum(-1)[masked], torch.ones(int(masked.sum()), dtype=ours.dtype))
    assert torch.equal(ours[~masked], theirs[~masked]) and torch.equal(ours[..., mdlm.mask_index], theirs[..., mdlm.mask_index])
    unnormalised = apply_to_block(layer, adapters.mdlm_logits(mdlm.forward, mask_index=mdlm.mask_index,
                                                             vocab_size=vocab)(x, sigma), x, 0, length)
    assert float(unnormalised.detach().exp().sum(-1)[masked].max()) < 0.5  # the latent mode alone is far from normalised
    # MDLM's sampler from t = 1 to t = 0.5 in 8 steps of its schedule: about half the positions unmask.
    for with_codd in (False, True):
        if with_codd:
            mdlm.use_codd(layer)
        torch.manual_seed(3)
        g = torch.Generator().manual_seed(2)
        x = torch.full((rows, length), mdlm.mask_index)
        for step in range(8):
            x = mdlm._ddpm_update(x, torch.full((rows,), 1 - step / 16), 1 / 16, g)
        still_masked = float((x == mdlm.mask_index).double().mean())
        assert 0.35 < still_masked < 0.65, still_masked


# ----------------------------------------------------------------------------- point 6: blocks longer than the window


def test_apply_to_block_couples_every_window_of_a_long_block():
    vocab, mask = 5, 5
    layer = hmm_layer(4, vocab, mask, gate=ALWAYS, mode="marginal")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 14, vocab, generator=g, dtype=torch.float64)
    x = torch.randint(0, vocab, (2, 14), generator=g)
    x[:, 2:13] = torch.where(torch.rand(2, 11, generator=g) < 0.6, mask, x[:, 2:13])
    out = apply_to_block(layer, logits, x, 2, 13)
    expected = logits.clone()
    for lo, hi in ((2, 6), (6, 10), (10, 13)):
        expected[:, lo:hi] = layer(logits[:, lo:hi], x[:, lo:hi])
    assert torch.equal(out, expected)
    assert diffusion.windowed_loss is windowed_loss
    with pytest.raises(ValueError, match="start, stop"):
        apply_to_block(layer, logits, x, 3, 20)


def test_dream_hook_couples_every_window_holding_masked_positions():
    vocab, mask = LLADA_VOCAB, LLADA_MASK
    layer = hmm_layer(4, vocab, mask, gate=ALWAYS, mode="marginal")
    hook = adapters.dream_logits_hook(layer)
    x = torch.tensor([[1, 2, mask, mask, 3, mask, mask, mask, 4, mask, 0, 0]])
    logits = torch.randn(1, 12, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = hook(0, x, logits)
    assert torch.equal(out, apply_to_block(layer, logits, x, 2, 10))
    assert torch.equal(out[:, :2], logits[:, :2]) and torch.equal(out[:, 10:], logits[:, 10:])
    assert not torch.allclose(out[0, 9], logits[0, 9])  # the third window, past the first one


# ----------------------------------------------------------------------------- point 7: batch size 0


def test_an_empty_batch_gives_an_empty_result():
    layer = hmm_layer(3, 4, 4, gate=ALWAYS)
    assert layer(torch.zeros(0, 3, 4), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 4)
    assert layer.log_prob(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, 4), torch.zeros(0, 2, dtype=torch.long)).shape == (0,)
    out = generate(lambda x: torch.zeros(*x.shape, 4), torch.zeros(0, 2, dtype=torch.long), gen_length=4, block_length=2,
                   steps=2, layer=layer)
    assert out.shape == (0, 6)
    with pytest.raises(ValueError, match="empty batch"):
        codd_loss(layer, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, 4), torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="data: expected at least one row"):
        train_codd(layer, lambda x: torch.zeros(*x.shape, 4), torch.zeros(0, 3, dtype=torch.long), progress=False)


# ----------------------------------------------------------------------------- point 8: training data with the mask


def test_train_codd_rejects_data_containing_the_mask_id():
    layer = hmm_layer(2, LLADA_VOCAB, LLADA_MASK)
    data = torch.tensor([[1, 2, 3, 4], [5, LLADA_MASK, 1, 1]])
    with pytest.raises(ValueError, match=r"data: rows \[1\] contain the mask id 9"):
        train_codd(layer, lambda x: torch.zeros(*x.shape, LLADA_VOCAB), data, progress=False)
