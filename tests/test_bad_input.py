"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import numpy as np
import pclayer as pc
import pytest
import torch


@pytest.fixture(scope="module")
def circuit() -> pc.TensorCircuit:
    """Three variables with 2, 3 and 2 categories (num_cats = 3)."""
    a = pc.inputs(0, 2, pc.Categorical(2))
    b = pc.inputs(1, 2, pc.Categorical(3))
    c = pc.inputs(2, 2, pc.Bernoulli())
    return pc.compile(pc.summate(pc.multiply(a, b, c), num_nodes=1))


@pytest.fixture(scope="module")
def gaussian_circuit() -> pc.TensorCircuit:
    g = pc.inputs(0, 2, pc.Gaussian())
    k = pc.inputs(1, 2, pc.Categorical(2))
    return pc.compile(pc.summate(pc.multiply(g, k), num_nodes=1))


GOOD_X = torch.tensor([[0, 2, 1], [1, 0, 0]])


def _shape_pattern(shape: torch.Size) -> str:
    """Regex of a shape as printed in error messages, e.g. ``(3,)`` or ``(2, 4)``."""
    return r"\(" + r",\s?".join(str(s) for s in shape) + (r",\)" if len(shape) == 1 else r"\)")

# ---------------------------------------------------------------------------------------
# x
# ---------------------------------------------------------------------------------------


def test_x_must_be_a_tensor(circuit):
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor of shape \(B, 3\), got list"):
        circuit.log_prob([[0, 1, 1]])


@pytest.mark.parametrize("x", [torch.zeros(3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                               torch.zeros(1, 2, 3, dtype=torch.long)])
def test_x_wrong_shape(circuit, x):
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3\), got " + _shape_pattern(x.shape)):
        circuit.log_prob(x)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_x_wrong_dtype(circuit, dtype):
    with pytest.raises(TypeError, match=f"x: expected an integer or float tensor, got {dtype}"):
        circuit.log_prob(torch.zeros(2, 3, dtype=dtype))


@pytest.mark.parametrize("value, var", [(-1, 0), (2, 0), (3, 1), (7, 2)])
def test_x_out_of_range_category(circuit, value, var):
    x = GOOD_X.clone()
    x[1, var] = value
    with pytest.raises(ValueError, match=rf"x: value {value} at row 1, variable {var} is out of range \[0, "):
        circuit.log_prob(x)
    for query in (circuit.posterior, circuit.mpe):
        with pytest.raises(ValueError, match="is out of range"):
            query(x, torch.zeros_like(x, dtype=torch.bool))


def test_out_of_range_values_are_fine_where_missing(circuit):
    x = GOOD_X.clone()
    x[1, 1] = 99
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[1, 1] = True
    clean = GOOD_X.clone()
    torch.testing.assert_close(circuit.log_prob(x, missing), circuit.log_prob(clean, missing))


def test_x_non_integer_values_for_discrete_variables(circuit):
    x = GOOD_X.double()
    x[0, 1] = 1.5
    with pytest.raises(ValueError, match=r"x: expected integer category values for discrete variables, got 1.5 at \(0, 1\)"):
        circuit.log_prob(x)


def test_x_nan_at_observed_entries(circuit):
    x = GOOD_X.double()
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x: NaN at observed entry \(1, 2\); mark missing entries with missing=True"):
        circuit.log_prob(x)
    with pytest.raises(ValueError, match=r"x: NaN at observed entry \(1, 2\)"):
        circuit.sample(x=x, missing=torch.zeros(2, 3, dtype=torch.bool))
    missing = torch.zeros(2, 3, dtype=torch.bool)
    missing[1, 2] = True
    torch.testing.assert_close(circuit.log_prob(x, missing), circuit.log_prob(GOOD_X, missing))


def test_gaussian_circuits_need_float_x_and_no_posterior(gaussian_circuit):
    with pytest.raises(TypeError, match=r"x: the circuit has continuous variables \[0\]; expected a float tensor, got torch.int64"):
        gaussian_circuit.log_prob(torch.zeros(1, 2, dtype=torch.long))
    x = torch.tensor([[float("nan"), 1.0]])
    with pytest.raises(ValueError, match=r"x: NaN at observed entry \(0, 0\)"):
        gaussian_circuit.log_prob(x)
    with pytest.raises(ValueError, match="circuit: posterior is defined for discrete variables only"):
        gaussian_circuit.posterior(torch.zeros(1, 2))
    soft = torch.zeros(1, 2, 2)
    soft[0, 0, 1] = 1.0
    with pytest.raises(ValueError, match="soft_evidence: expected zeros for continuous variables"):
        gaussian_circuit.log_prob(torch.zeros(1, 2), soft_evidence=soft)


# ---------------------------------------------------------------------------------------
# missing and soft_evidence
# ---------------------------------------------------------------------------------------


def test_missing_wrong_dtype_and_shape(circuit):
    with pytest.raises(TypeError, match=r"missing: expected a bool tensor of shape \(2, 3\), got torch.int64"):
        circuit.log_prob(GOOD_X, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"missing: expected a bool tensor of shape \(2, 3\), got ndarray"):
        circuit.log_prob(GOOD_X, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"missing: expected shape \(2, 3\) \(same as x\), got \(2, 2\)"):
        circuit.log_prob(GOOD_X, torch.zeros(2, 2, dtype=torch.bool))


def test_soft_evidence_wrong_shape_and_dtype(circuit):
    with pytest.raises(ValueError, match=r"soft_evidence: expected shape \(B, num_vars, num_cats\) = \(2, 3, 3\), got \(2, 3, 2\)"):
        circuit.log_prob(GOOD_X, soft_evidence=torch.zeros(2, 3, 2))
    with pytest.raises(TypeError, match=r"soft_evidence: expected a float tensor of shape \(2, 3, 3\), got torch.int64"):
        circuit.log_prob(GOOD_X, soft_evidence=torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"soft_evidence: expected a float tensor of shape \(2, 3, 3\), got ndarray"):
        circuit.log_prob(GOOD_X, soft_evidence=np.zeros((2, 3, 3)))


def test_soft_evidence_nan_and_plus_infinity(circuit):
    soft = torch.zeros(2, 3, 3)
    soft[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"soft_evidence: NaN at \(1, 0, 2\)"):
        circuit.log_prob(GOOD_X, soft_evidence=soft)
    with pytest.raises(ValueError, match=r"soft_evidence: NaN at \(1, 0, 2\)"):
        circuit.posterior(GOOD_X, soft_evidence=soft)
    soft[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"soft_evidence: \+inf at \(1, 0, 2\); expected finite log-weights or -inf"):
        circuit.sample(x=GOOD_X, soft_evidence=soft)


# ---------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------


def test_tensors_on_another_device_are_rejected(circuit):
    meta_x = GOOD_X.to("meta")
    with pytest.raises(ValueError, match="x: expected a tensor on the circuit's device cpu, got meta"):
        circuit.log_prob(meta_x)
    with pytest.raises(ValueError, match="missing: expected a tensor on the circuit's device cpu, got meta"):
        circuit.log_prob(GOOD_X, torch.zeros(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="soft_evidence: expected a tensor on the circuit's device cpu, got meta"):
        circuit.posterior(GOOD_X, soft_evidence=torch.zeros(2, 3, 3, device="meta"))


def test_circuit_on_another_device_rejects_cpu_tensors():
    small = pc.compile(pc.inputs(0, 1, pc.Categorical(2)))
    meta = small.to("meta")
    assert meta.device.type == "meta"
    for query in (meta.log_prob, meta.posterior, meta.mpe):
        with pytest.raises(ValueError, match="x: expected a tensor on the circuit's device meta, got cpu"):
            query(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="x: expected a tensor on the circuit's device meta, got cpu"):
        meta.sample(x=torch.zeros(1, 1, dtype=torch.long), missing=torch.ones(1, 1, dtype=torch.bool, device="meta"))


# ---------------------------------------------------------------------------------------
# Sampling arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_sample_num_samples_must_be_a_positive_int(circuit, num_samples):
    with pytest.raises(ValueError, match=f"num_samples: expected a positive int, got {num_samples!r}"):
        circuit.sample(num_samples)


def test_sample_argument_combinations(circuit):
    with pytest.raises(ValueError, match="missing: only meaningful together with x"):
        circuit.sample(3, missing=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_samples: expected a positive int when x and soft_evidence are not given"):
        circuit.sample()
    with pytest.raises(ValueError, match="num_samples: x has 2 rows; expected num_samples equal to that or x with one row"):
        circuit.sample(5, x=GOOD_X)


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


def test_categorical_parameters_checked():
    with pytest.raises(ValueError, match=r"params\['probs'\]: expected non-negative probabilities, got a minimum of -0.1"):
        pc.inputs(0, 1, pc.Categorical(2), params={"probs": [[1.1, -0.1]]})
    with pytest.raises(ValueError, match=r"params\['probs'\]: expected each row to sum to 1, row 1 sums to 0.9"):
        pc.inputs(0, 2, pc.Categorical(2), params={"probs": [[0.5, 0.5], [0.5, 0.4]]})
    with pytest.raises(ValueError, match=r"params\['probs'\]: expected shape \(2, 3\), got \(2, 2\)"):
        pc.inputs(0, 2, pc.Categorical(3), params={"probs": [[0.5, 0.5], [0.5, 0.5]]})
    with pytest.raises(ValueError, match=r"params\['probs'\]: expected no NaN"):
        pc.inputs(0, 1, pc.Categorical(2), params={"probs": [[float("nan"), 1.0]]})


def test_bernoulli_and_gaussian_parameters_checked():
    with pytest.raises(ValueError, match=r"params\['p'\]: expected probabilities in \[0, 1\], got range \[-0.5, 0.5\]"):
        pc.inputs(0, 2, pc.Bernoulli(), params={"p": [0.5, -0.5]})
    with pytest.raises(ValueError, match=r"params\['p'\]: expected shape \(2,\), got \(3,\)"):
        pc.inputs(0, 2, pc.Bernoulli(), params={"p": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match=r"params\['std'\]: expected positive values, got a minimum of 0"):
        pc.inputs(0, 2, pc.Gaussian(), params={"mean": [0.0, 1.0], "std": [1.0, 0.0]})
    with pytest.raises(ValueError, match=r"params\['mean'\]: expected no NaN"):
        pc.inputs(0, 1, pc.Gaussian(), params={"mean": [float("nan")], "std": [1.0]})


def test_sum_parameters_checked():
    leaf = pc.inputs(0, 2, pc.Categorical(2))
    with pytest.raises(ValueError, match="params: expected non-negative probabilities, got a minimum of -0.5"):
        pc.summate(leaf, num_nodes=1, params=[[1.5, -0.5]])
    with pytest.raises(ValueError, match="params: expected each row to sum to 1, row 0 sums to 0.5"):
        pc.summate(leaf, num_nodes=1, params=[[0.25, 0.25]])
    with pytest.raises(ValueError, match=r"params: expected shape \(1, 2\), got \(2, 2\)"):
        pc.summate(leaf, num_nodes=1, params=[[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="params: expected no NaN in the weights of summate group 'mix'"):
        pc.summate(leaf, num_nodes=1, params=[[float("nan"), 1.0]], name="mix")
    edges = [[0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match=r"params: expected shape \(3,\) \(one weight per edge\), got \(2,\)"):
        pc.summate(leaf, num_nodes=2, edges=edges, params=[0.5, 0.5])
    with pytest.raises(ValueError, match="params: expected non-negative weights, got a minimum of -1"):
        pc.summate(leaf, num_nodes=2, edges=edges, params=[2.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="params: expected the weights of each node to sum to 1, node 1 sums to 0.5"):
        pc.summate(leaf, num_nodes=2, edges=edges, params=[0.5, 0.5, 0.5])


def test_hmm_builder_parameters_checked():
    with pytest.raises(ValueError, match=r"initial: expected shape \(2,\), got \(3,\)"):
        pc.structures.hmm(3, 2, 2, initial=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="transition: expected non-negative probabilities, got a minimum of -0.5"):
        pc.structures.hmm(3, 2, 2, transition=[[1.5, -0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"emission: expected rows summing to 1, got sums in \[0.5, 1\]"):
        pc.structures.hmm(3, 2, 2, emission=[[0.25, 0.25], [0.5, 0.5]])
    with pytest.raises(ValueError, match="emission: expected no NaN"):
        pc.structures.hmm(3, 2, 2, emission=[[float("nan"), 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="num_states: expected a positive int, got 0"):
        pc.structures.hmm(3, 0, 2)


# ---------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------


def test_non_smooth_sum_names_the_group_and_variables():
    a = pc.inputs(0, 2, pc.Categorical(2), name="leaf-a")
    b = pc.inputs(1, 2, pc.Categorical(2), name="leaf-b")
    ab = pc.multiply(a, b, name="ab")
    with pytest.raises(pc.StructureError, match=r"summate group 'mix' is not smooth: child 'ab' covers \{0, 1\} but child 'leaf-a' covers \{0\}"):
        pc.summate(ab, a, num_nodes=1, name="mix")


def test_non_decomposable_product_names_the_group_and_variables():
    a = pc.inputs(0, 2, pc.Categorical(2), name="leaf-a")
    b = pc.inputs(1, 2, pc.Categorical(2), name="leaf-b")
    ab = pc.multiply(a, b, name="ab")
    again = pc.inputs(1, 2, pc.Categorical(2), name="leaf-b2")
    with pytest.raises(pc.StructureError, match=r"multiply group 'bad' is not decomposable: child 'leaf-b2' shares variables \{1\} with an earlier child"):
        pc.multiply(ab, again, name="bad")


def test_other_structure_errors():
    a = pc.inputs(0, 2, pc.Categorical(2), name="a")
    b = pc.inputs(1, 3, pc.Categorical(2), name="b")
    with pytest.raises(pc.StructureError, match="multiply: children must have equal num_nodes without edges, got 'a': 2, 'b': 3"):
        pc.multiply(a, b)
    with pytest.raises(ValueError, match=r"edges: column 1 must index nodes of child 'b' in \[0, 3\)"):
        pc.multiply(a, b, edges=[[0, 3]])
    with pytest.raises(ValueError, match=r"edges: expected an integer array \(num_nodes, 2\)"):
        pc.multiply(a, b, edges=[[0.0, 1.0]])
    with pytest.raises(pc.StructureError, match=r"summate: sum nodes \[1\] have no edges"):
        pc.summate(a, num_nodes=2, edges=[[0, 0], [0, 1]])
    with pytest.raises(ValueError, match="edges: expected each \\(node, child\\) pair at most once"):
        pc.summate(a, num_nodes=1, edges=[[0, 0], [1, 1]])
    with pytest.raises(ValueError, match=r"edges: row 1 must index child nodes in \[0, 2\)"):
        pc.summate(a, num_nodes=1, edges=[[0], [2]])
    with pytest.raises(pc.StructureError, match="summate: expected at least one child group"):
        pc.summate(num_nodes=1)
    with pytest.raises(TypeError, match="multiply: child 1 must be a node group, got int"):
        pc.multiply(a, 3)
    mix = pc.summate(a, num_nodes=1, name="m1")
    with pytest.raises(pc.StructureError, match=r"tie: group 'm2' has parameter shape"):
        pc.summate(a, num_nodes=2, tie=mix, name="m2")
    with pytest.raises(ValueError, match="params: a tied group takes the parameters of the group it is tied to"):
        pc.summate(a, num_nodes=1, tie=mix, params=[[0.5, 0.5]])


def test_leaf_construction_errors():
    with pytest.raises(ValueError, match="var: expected a non-negative int variable index, got -1"):
        pc.inputs(-1, 2, pc.Categorical(2))
    with pytest.raises(ValueError, match="num_nodes: expected a positive int, got 0"):
        pc.inputs(0, 0, pc.Categorical(2))
    with pytest.raises(TypeError, match="dist: expected a pclayer distribution"):
        pc.inputs(0, 2, "categorical")
    with pytest.raises(ValueError, match=r"values: expected integers in \[0, 3\), got \[3\]"):
        pc.Indicator(3, values=(0, 3))
    with pytest.raises(ValueError, match=r"num_nodes: Indicator\(3\) without values needs num_nodes == 3, got 2"):
        pc.inputs(0, 2, pc.Indicator(3))
    with pytest.raises(ValueError, match="num_cats: expected a positive int, got 0"):
        pc.Categorical(0)


def test_compile_errors():
    a = pc.inputs(0, 2, pc.Categorical(2), name="a")
    c = pc.inputs(2, 2, pc.Categorical(2), name="c")
    with pytest.raises(pc.StructureError, match=r"root: the root group 'a' must have exactly one node, got 2"):
        pc.compile(a)
    gap = pc.summate(pc.multiply(a, c), num_nodes=1, name="gap")
    with pytest.raises(pc.StructureError, match=r"root 'gap' must cover variables 0..2; it misses \[1\]"):
        pc.compile(gap)
    b2 = pc.inputs(1, 2, pc.Categorical(2), name="b2")
    b3 = pc.inputs(1, 2, pc.Categorical(3), name="b3")
    mixed = pc.summate(pc.multiply(a, b2), pc.multiply(a, b3), num_nodes=1)
    with pytest.raises(pc.StructureError, match="input group 'b3': variable 1 has 3 categories here but 2 in another input group"):
        pc.compile(mixed)
    with pytest.raises(TypeError, match="root: expected a node group, got str"):
        pc.compile("root")


def test_infinite_gaussian_observation_is_rejected():
    root = pc.summate(pc.inputs(0, 2, pc.Gaussian()), num_nodes=1)
    circuit = pc.compile(root)
    with pytest.raises(ValueError, match=r"x: infinite value at observed entry \(0, 0\)"):
        circuit.log_prob(torch.tensor([[float("inf")]]))
