"""Hidden Markov models as circuits."""

from __future__ import annotations

import torch

from pclayer.distributions import Categorical, random_probabilities
from pclayer.nodes import InputGroup, NodeGroup, SumGroup, inputs, multiply, summate


def _explicit(value: object, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
    if torch.isnan(tensor).any():
        raise ValueError(f"{name}: expected no NaN")
    if (tensor < 0).any():
        raise ValueError(f"{name}: expected non-negative probabilities, got a minimum of {tensor.min().item():.4g}")
    sums = tensor.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        raise ValueError(f"{name}: expected rows summing to 1, got sums in [{sums.min().item():.6g}, {sums.max().item():.6g}]")
    return tensor


def hmm(num_vars: int, num_states: int, num_cats: int, *, homogeneous: bool = True,
        initial: object | None = None, transition: object | None = None, emission: object | None = None,
        seed: int | None = None) -> NodeGroup:
    """A hidden Markov model over variables ``0..num_vars-1`` as a circuit.

    ``p(x) = sum_z initial[z_0] prod_t transition[z_t, z_{t+1}] prod_t emission[z_t, x_t]``.
    The circuit is built from the last position backwards, so the root sums over
    ``z_0`` and top-down sampling draws ``z_0, z_1, ...`` in order (forward filtering,
    backward sampling). Sum nodes of position ``t`` are the hidden states ``z_t``.

    Args:
        num_vars: sequence length T.
        num_states: hidden states H.
        num_cats: categories K of every observed variable.
        homogeneous: tie transition and emission parameters across positions.
        initial: optional (H,) initial distribution.
        transition: optional (H, H) transition matrix, row = from-state; with
            ``homogeneous=False`` also (T-1, H, H).
        emission: optional (H, K) emission matrix; with ``homogeneous=False`` also (T, H, K).
        seed: seed of the random initialisation of parameters not given explicitly.

    Returns:
        The root group (one node).
    """
    for name, value in (("num_vars", num_vars), ("num_states", num_states), ("num_cats", num_cats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    h, k, t_len = num_states, num_cats, num_vars
    per_position = not homogeneous
    initial_p = _explicit(initial, "initial", (h,))
    trans_shape = (t_len - 1, h, h) if per_position and transition is not None and torch.as_tensor(transition).ndim == 3 else (h, h)
    emit_shape = (t_len, h, k) if per_position and emission is not None and torch.as_tensor(emission).ndim == 3 else (h, k)
    transition_p = _explicit(transition, "transition", trans_shape)
    emission_p = _explicit(emission, "emission", emit_shape)

    def emission_params(t: int) -> dict | None:
        if emission_p is None:
            return None
        return {"probs": emission_p[t] if emission_p.ndim == 3 else emission_p}

    def transition_params(t: int) -> torch.Tensor | None:
        if transition_p is None:
            return None
        return transition_p[t] if transition_p.ndim == 3 else transition_p

    first_emission: InputGroup | None = None
    first_transition: SumGroup | None = None

    def emit(t: int) -> InputGroup:
        nonlocal first_emission
        if homogeneous and first_emission is not None:
            return inputs(t, h, Categorical(k), tie=first_emission, name=f"emission[{t}]")
        group = inputs(t, h, Categorical(k), params=emission_params(t), name=f"emission[{t}]", generator=generator)
        first_emission = first_emission or group
        return group

    chain: NodeGroup = emit(t_len - 1)
    for t in range(t_len - 2, -1, -1):
        if homogeneous and first_transition is not None:
            step = summate(chain, num_nodes=h, tie=first_transition, name=f"transition[{t}]")
        else:
            step = summate(chain, num_nodes=h, params=transition_params(t), name=f"transition[{t}]", generator=generator)
            first_transition = first_transition or step
        chain = multiply(emit(t), step, name=f"state[{t}]")
    init = initial_p[None] if initial_p is not None else random_probabilities((1, h), generator)
    return summate(chain, num_nodes=1, params=init, name="initial")
