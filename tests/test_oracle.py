"""The exact-oracle experiment (``python -m diffusion.demo.oracle``): the oracle backbone and the exact scores
against brute-force enumeration of a small teacher, and a smoke run of the command line on a tiny configuration."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pclayer as pc
from diffusion.demo.oracle.cli import main
from diffusion.demo.oracle.experiment import OracleSettings, score_gap
from diffusion.demo.oracle.plots import plot_gap_closed
from diffusion.demo.oracle.teacher import ExactOracle, conditional_nll
from diffusion.layer import CoDDLayer

WIDTH, VOCAB, STATES = 4, 3, 3


def _teacher(seed: int) -> pc.TensorCircuit:
    return pc.compile(pc.structures.hmm(WIDTH, STATES, VOCAB, homogeneous=False, seed=seed), dtype=torch.float64)


def _joint(teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence (V^W, W) and its probability under the teacher, by enumeration."""
    everything = torch.tensor(list(itertools.product(range(VOCAB), repeat=WIDTH)))
    return everything, teacher.log_prob(everything).exp()


def _brute_conditionals(everything, probability, x_t, mask_id) -> torch.Tensor:
    """(B, W, V) p(x^i = v | visible tokens of x_t) by summing the joint over consistent sequences."""
    out = torch.zeros(x_t.shape[0], WIDTH, VOCAB, dtype=torch.float64)
    for b, row in enumerate(x_t):
        visible = row != mask_id
        consistent = (everything[:, visible] == row[visible]).all(1)
        weights = probability * consistent
        for i in range(WIDTH):
            for v in range(VOCAB):
                out[b, i, v] = weights[everything[:, i] == v].sum()
        out[b] /= weights.sum()
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), masks=st.lists(st.lists(st.booleans(), min_size=WIDTH, max_size=WIDTH),
                                                    min_size=1, max_size=6))
def test_oracle_equals_brute_force_conditionals(seed, masks):
    teacher = _teacher(seed)
    everything, probability = _joint(teacher)
    generator = torch.Generator().manual_seed(seed)
    x_0 = everything[torch.multinomial(probability, len(masks), replacement=True, generator=generator)]
    masked = torch.tensor(masks)
    x_t = torch.where(masked, VOCAB, x_0)
    oracle = ExactOracle(teacher, mask_id=VOCAB)
    expected = _brute_conditionals(everything, probability, x_t, VOCAB)
    assert torch.allclose(oracle(x_t).exp().double(), expected, atol=1e-5)
    # the exact sequential score is -log p(x^M | x^U), the chain rule of these conditionals
    consistent = (everything[:, None, :] == x_0[None]) | masked[None]
    marginal = (probability[:, None] * consistent.all(-1)).sum(0)
    full = teacher.log_prob(x_0).exp()
    assert torch.allclose(conditional_nll(teacher, x_0, masked), -(full / marginal).log(), atol=1e-9)


def test_memoized_oracle_computes_each_distinct_row_once():
    teacher = _teacher(0)
    x_t = torch.tensor([[0, VOCAB, 1, VOCAB], [VOCAB, 2, 2, 0], [0, VOCAB, 1, VOCAB]])
    memo, plain = ExactOracle(teacher, mask_id=VOCAB, memoize=True), ExactOracle(teacher, mask_id=VOCAB)
    assert torch.equal(memo(x_t), plain(x_t)) and torch.equal(memo(x_t[1:]), plain(x_t[1:]))
    assert memo.calls == 2 and plain.calls == 5


def test_oracle_rejects_bad_rows():
    oracle = ExactOracle(_teacher(0), mask_id=VOCAB)
    with pytest.raises(ValueError, match="x_t: expected a \\(B, 4\\)"):
        oracle(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="x_t: token ids"):
        oracle(torch.full((1, WIDTH), VOCAB + 1))


def test_a_uniform_student_closes_none_of_the_gap():
    """A student HMM with uniform parameters is a constant prior, so CoDD equals the one-step product exactly."""
    teacher = _teacher(1)
    uniform = pc.structures.hmm(WIDTH, 2, VOCAB, initial=torch.full((2,), 0.5), transition=torch.full((2, 2), 0.5),
                                emission=torch.full((2, VOCAB), 1 / VOCAB))
    layer = CoDDLayer(pc.compile(uniform, dtype=torch.float64), mask_id=VOCAB)
    windows = teacher.sample(64, generator=torch.Generator().manual_seed(0))
    scores = score_gap(teacher, ExactOracle(teacher, mask_id=VOCAB), {2: layer}, windows, ratios=(0.5, 0.75),
                       batch_size=32, seconds=60, seed=0)
    for value in scores.values():
        assert torch.allclose(value.codd, value.one_step, atol=1e-5)


def _tiny_corpus(folder) -> None:
    rng = random.Random(0)
    words = ["thee", "thou", "king", "love", "night", "sweet", "death", "crown"]
    for d in range(5):
        (folder / f"work{d}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(60)))


def test_oracle_cli_smoke_run_on_a_tiny_configuration(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _tiny_corpus(corpus)
    tiny = OracleSettings(window=8, teacher_states=8, teacher_windows=256, student_states=(2, 4), ratios=(0.25, 0.75),
                          train_rows=128, eval_windows=64, eval_batch=32, generation_samples=8, steps_list=(1, 8),
                          bootstrap=50)
    assert main(["--corpus", str(corpus), "--minutes", "0.05", "--out", str(tmp_path / "out")], tiny) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["mask_ratio"], r["student_states"]) for r in results["gap"]} == {(0.25, 2), (0.25, 4), (0.75, 2), (0.75, 4)}
    for row in results["gap"]:
        for key in ("one_step", "sequential", "codd"):
            value, (low, high) = row[key]["value"], row[key]["ci"]
            assert math.isfinite(value) and 1.0 <= low <= value <= high
        low, high = row["gap_closed"]["ci"]  # a ratio: its percentile interval need not contain the point estimate
        assert math.isfinite(row["gap_closed"]["value"]) and low <= high
    assert [r["steps"] for r in results["generation"]["rows"]] == [1, 8]
    assert (tmp_path / "out" / "gap_closed.png").stat().st_size > 0
    assert (tmp_path / "out" / "generation.png").stat().st_size > 0


def test_oracle_cli_rejects_a_bad_budget(tmp_path, capsys):
    assert main(["--minutes", "-1", "--out", str(tmp_path / "out")]) == 2
    assert "minutes" in capsys.readouterr().err


def test_gap_plot_accepts_a_point_estimate_outside_its_interval(tmp_path):
    """A percentile interval of a ratio can exclude its point estimate (tiny gaps); the plot must still draw."""
    rows = [{"mask_ratio": 0.2, "student_states": 2, "gap_closed": {"value": -665.0, "ci": [-115.0, 148.0]}},
            {"mask_ratio": 0.2, "student_states": 4, "gap_closed": {"value": 0.4, "ci": [0.3, 0.5]}}]
    plot_gap_closed(rows, tmp_path / "gap.png")
    assert (tmp_path / "gap.png").stat().st_size > 0
