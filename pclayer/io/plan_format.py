"""The plan as JSON-able data for pclayer's file format, and back.

Only the plain structure is stored (optimisation fields, marked ``PASS`` in :mod:`pclayer.plan`,
are recomputed by the passes at load). Every plan record is a dict tagged by its class name
(``"type"``), so a new layer spec needs no code here; tensors are handed to a callback that
stores them and returns a reference.

Format versions:
  1. (pclayer 0.1) input buckets carry ``"kind"`` (``"table"``, ``"indicator"``,
     ``"gaussian"``) and the banks are implied by their name prefixes.
  2. records by class name with their plain fields (input buckets name their distribution
     class) and every bank with its role. Version-1 files are migrated on load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from pclayer import plan as plan_module
from pclayer.plan import (Bank, DenseBucket, InputBucket, InputLayerSpec, LayerSpec, Plan, ProductLayerSpec, Segment,
                          SparseBucket, SumLayerSpec)

Store = Callable[[torch.Tensor], object]
Fetch = Callable[[object], torch.Tensor]

_V1_KINDS = {"table": "Categorical", "indicator": "Indicator", "gaussian": "Gaussian"}


def _encode(value: object, store: Store) -> object:
    """JSON-able form of plan data: a plan dataclass becomes ``{"type": class name, field:
    value, ...}`` without its pass fields; tensors go through ``store``."""
    if isinstance(value, torch.Tensor):
        return store(value)
    if dataclasses.is_dataclass(value):
        out = {"type": type(value).__name__}
        for f in dataclasses.fields(value):
            if not f.metadata.get("pass"):
                out[f.name] = _encode(getattr(value, f.name), store)
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(v, store) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"plan: cannot store a value of type {type(value).__name__}")


_SCALARS = {"int": int, "str": str, "bool": bool}


def _record_type(name: object) -> type:
    """The plan dataclass called ``name`` (only records of :mod:`pclayer.plan` are accepted)."""
    cls = getattr(plan_module, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == plan_module.__name__
            and cls is not Plan and cls is not Bank):
        raise ValueError(f"layer type: {name!r} is not a record of pclayer.plan")
    return cls


def _decode(data: object, fetch: Fetch) -> object:
    """The inverse of :func:`_encode` (tensor references resolved with ``fetch``)."""
    if isinstance(data, dict) and "type" in data:
        cls = _record_type(data["type"])
        values = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("pass"):
                continue
            if f.name not in data:
                raise ValueError(f"{cls.__name__}: missing field {f.name!r}")
            value = data[f.name]
            if f.type == "torch.Tensor":
                value = fetch(value)
            elif f.type in _SCALARS:
                if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, _SCALARS[f.type]):
                    raise ValueError(f"{cls.__name__}.{f.name}: expected {f.type}, got {value!r}")
            else:
                value = _decode(value, fetch)
            values[f.name] = value
        return cls(**values)
    if isinstance(data, list):
        return [_decode(v, fetch) for v in data]
    return data


def layer_to_dict(spec: LayerSpec, store: Store) -> dict:
    """JSON-able dict of one layer spec (plain fields only; any layer spec of :mod:`pclayer.plan`)."""
    return _encode(spec, store)  # type: ignore[return-value]


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    return value


def layer_from_dict(data: dict, fetch: Fetch) -> LayerSpec:
    """The layer spec of :func:`layer_to_dict`'s output, or of a format-1 layer dict."""
    if data.get("type") in ("input", "product", "sum"):
        return _layer_of_version_1(data, fetch)
    spec = _decode(data, fetch)
    if not type(spec).__name__.endswith("LayerSpec"):
        raise ValueError(f"layer: expected a layer spec, got {type(spec).__name__}")
    return spec  # type: ignore[return-value]


def _layer_of_version_1(data: dict, fetch: Fetch) -> LayerSpec:
    """A format-1 layer dict (``"type"``: ``"input"``, ``"product"`` or ``"sum"``)."""
    kind = data["type"]
    if kind == "input":
        buckets = []
        for b in data["buckets"]:
            buckets.append(InputBucket(_V1_KINDS[b["kind"]], str(b["key"]), _int(b["num_nodes"], "num_nodes"),
                                       _int(b["num_cats"], "num_cats"), fetch(b["group_bank"]), fetch(b["group_var"])))
        return InputLayerSpec(buckets)
    sources = [Segment(_int(layer, "source layer"), fetch(index)) for layer, index in data["sources"]]
    if kind == "product":
        return ProductLayerSpec(sources, fetch(data["children"]), bool(data["padded"]))
    return SumLayerSpec(sources,
                        [DenseBucket(str(b["key"]), fetch(b["children"]), fetch(b["group_bank"])) for b in data["dense"]],
                        [SparseBucket(str(b["key"]), fetch(b["children"])) for b in data["sparse"]])


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
