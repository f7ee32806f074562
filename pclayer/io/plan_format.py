"""The plan as JSON-able data for pclayer's file format, and back.

Only the plain structure is stored (optimisation fields are recomputed by the passes at
load). Layers are dicts tagged by ``"type"``; tensors are handed to a callback that stores
them and returns a reference.

Format versions:
  1. (pclayer 0.1) input buckets carry ``"kind"`` (``"table"``, ``"indicator"``,
     ``"gaussian"``) and the banks are implied by their name prefixes.
  2. input buckets carry ``"distribution"`` (a class name of :mod:`pclayer.distributions`) and
     the structure lists every bank with its role. Version-1 files are migrated on load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pclayer.plan import (Bank, DenseBucket, InputBucket, InputLayerSpec, LayerSpec, Plan, ProductLayerSpec, Segment,
                          SparseBucket, SumLayerSpec)

Store = Callable[[torch.Tensor], object]
Fetch = Callable[[object], torch.Tensor]

_V1_KINDS = {"table": "Categorical", "indicator": "Indicator", "gaussian": "Gaussian"}


def _sources(sources: list[Segment], store: Store) -> list:
    return [[segment.layer, store(segment.index)] for segment in sources]


def layer_to_dict(spec: LayerSpec, store: Store) -> dict:
    """JSON-able dict of one layer spec (plain fields only)."""
    if isinstance(spec, InputLayerSpec):
        return {"type": "input", "buckets": [
            {"distribution": b.distribution, "key": b.key, "num_nodes": b.num_nodes, "num_cats": b.num_cats,
             "group_bank": store(b.group_bank), "group_var": store(b.group_var)} for b in spec.buckets]}
    if isinstance(spec, ProductLayerSpec):
        return {"type": "product", "sources": _sources(spec.sources, store), "children": store(spec.children),
                "padded": spec.padded}
    return {"type": "sum", "sources": _sources(spec.sources, store),
            "dense": [{"key": b.key, "children": store(b.children), "group_bank": store(b.group_bank)} for b in spec.dense],
            "sparse": [{"key": b.key, "children": store(b.children)} for b in spec.sparse]}


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    return value


def layer_from_dict(data: dict, fetch: Fetch) -> LayerSpec:
    """The layer spec of :func:`layer_to_dict`'s output (either format version)."""
    kind = data["type"]
    if kind == "input":
        buckets = []
        for b in data["buckets"]:
            name = b["distribution"] if "distribution" in b else _V1_KINDS[b["kind"]]
            buckets.append(InputBucket(str(name), str(b["key"]), _int(b["num_nodes"], "num_nodes"),
                                       _int(b["num_cats"], "num_cats"), fetch(b["group_bank"]), fetch(b["group_var"])))
        return InputLayerSpec(buckets)
    sources = [Segment(_int(layer, "source layer"), fetch(index)) for layer, index in data["sources"]]
    if kind == "product":
        return ProductLayerSpec(sources, fetch(data["children"]), bool(data["padded"]))
    if kind == "sum":
        return SumLayerSpec(sources,
                            [DenseBucket(str(b["key"]), fetch(b["children"]), fetch(b["group_bank"])) for b in data["dense"]],
                            [SparseBucket(str(b["key"]), fetch(b["children"])) for b in data["sparse"]])
    raise ValueError(f"layer type: expected 'input', 'product' or 'sum', got {kind!r}")


def bank_to_dict(bank: Bank) -> dict:
    return {"role": bank.role, "distribution": bank.distribution, "learnable": bank.learnable, "mask": bank.mask}


def banks_from_dict(data: dict) -> dict[str, Bank]:
    return {str(name): Bank(str(name), str(b["role"]), b["distribution"], bool(b["learnable"]), b["mask"])
            for name, b in data.items()}


def banks_of_version_1(layers: list[LayerSpec], params: dict, fixed: dict) -> dict[str, Bank]:
    """The banks of a version-1 plan, which named them by prefix (``sum_``, ``sparse_``, and
    input banks recognised through the input layer's buckets)."""
    banks: dict[str, Bank] = {}
    for spec in layers:
        if isinstance(spec, InputLayerSpec):
            for bucket in spec.buckets:
                banks[bucket.key] = Bank(bucket.key, "input", bucket.distribution, learnable=bucket.key in params)
    for key in params:
        if key.startswith("sparse_"):
            banks[key] = Bank(key, "sparse_sum", mask=f"{key}_mask")
        elif key.startswith("sum_"):
            banks[key] = Bank(key, "dense_sum")
    unknown = set(params) - set(banks)
    if unknown:
        raise ValueError(f"params: version-1 plan has parameters {sorted(unknown)} of no known bank")
    return banks


def plan_to_dict(plan: Plan, store: Store) -> dict:
    """The structure of ``plan`` (without parameter values) as JSON-able data."""
    return {"num_vars": plan.num_vars, "var_cats": list(plan.var_cats), "root": list(plan.root),
            "layers": [layer_to_dict(spec, store) for spec in plan.layers],
            "banks": {name: bank_to_dict(bank) for name, bank in plan.banks.items()}}


def plan_from_dict(data: dict, params: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], fetch: Fetch) -> Plan:
    """A plain :class:`Plan` from :func:`plan_to_dict`'s output (or a version-1 structure)."""
    layers = [layer_from_dict(layer, fetch) for layer in data["layers"]]
    banks = banks_from_dict(data["banks"]) if "banks" in data else banks_of_version_1(layers, params, fixed)
    root = data["root"]
    return Plan(num_vars=_int(data["num_vars"], "num_vars"), var_cats=[_int(k, "var_cats") for k in data["var_cats"]],
                layers=layers, root=(_int(root[0], "root"), _int(root[1], "root")), banks=banks,
                params=params, fixed=fixed)
