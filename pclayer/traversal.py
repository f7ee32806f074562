"""The one bottom-up traversal of a compiled circuit, for every query.

:func:`traverse` runs the layers in order in one representation of
:mod:`pclayer.representations` and returns a :class:`LayerValues`: the root value for
likelihoods, marginals, posteriors and flows (through autograd), and every layer's
log-values for the top-down pass of sampling and MPE.

In the scaled representation each layer is computed in linear space when that is exact
(every entry at least the floor). A layer that is not falls back to log space for that layer
alone: its inputs are read as log-values (exact, since they passed the floor or are log
already), and its output is rescaled per row (each row shifted by its own maximum) so the
next layer continues in linear space whenever that row range allows. The pass is never
restarted, and only the layers that need it pay for log space.
"""

from __future__ import annotations

import torch

from pclayer.layers import LayerOutputs, ScaledOutputs, read_columns
from pclayer.representations import LOG_SUM, SCALED, ScaledValue, log_values, rescaled
from pclayer.runtime import DISABLED, Workspace
from pclayer.tables import Tables


class LayerValues:
    """Every layer's output of one traversal: a :class:`~pclayer.representations.ScaledValue`
    or a (B, n) log-value tensor per layer, with their log-values on demand."""

    def __init__(self, scaled: ScaledOutputs | None, logged: dict[int, torch.Tensor]):
        self.scaled = scaled
        self.logged = logged
        self.converted: dict[int, torch.Tensor] = {}
        self.pieces: dict[tuple[int, int, int], torch.Tensor] = {}

    def __getitem__(self, layer: int) -> torch.Tensor:
        """(B, n) log-values of ``layer`` (converted from linear space once, then kept)."""
        value = self.logged.get(layer)
        if value is None:
            value = self.converted.get(layer)
        if value is None:
            value = log_values(self.scaled.probs[layer], self.scaled.scales[layer])
            self.converted[layer] = value
        return value

    def columns(self, layer: int, start: int, length: int) -> torch.Tensor:
        """(B, length) log-values of columns ``start:start+length`` of ``layer``: only those
        columns are converted from linear space (once), so a reader of a few columns of a
        wide layer (an input layer) does not convert all of it."""
        whole = self.logged.get(layer)
        if whole is None:
            whole = self.converted.get(layer)
        if whole is not None:
            return whole if start == 0 and length == whole.shape[1] else whole.narrow(1, start, length)
        key = (layer, start, length)
        value = self.pieces.get(key)
        if value is None:
            value = log_values(read_columns(self.scaled.probs, layer, start, length), self.scaled.scales[layer])
            self.pieces[key] = value
        return value

    def root(self, circuit) -> torch.Tensor:
        """(B,) log-value of the root node."""
        layer, index = circuit.root
        if layer in self.logged:
            return self.logged[layer][:, index]
        return log_values(self.scaled.probs[layer][:, index:index + 1], self.scaled.scales[layer]).squeeze(1)


def traverse(circuit, representation, x: torch.Tensor, missing: torch.Tensor | None, evidence,
             tables: Tables, keep: bool = False) -> LayerValues:
    """Run every layer of ``circuit`` on validated inputs.

    Args:
        representation: :data:`~pclayer.representations.SCALED`, ``LOG_SUM`` or ``MAX_PRODUCT``.
        x, missing, evidence: validated query inputs (see :func:`pclayer.queries.evidence.prepare`).
        tables: the evaluation's normalised tables.
        keep: every layer's output is read afterwards (top-down pass): no buffer sharing and
            no fused layers, so every output stays materialised.
    """
    if representation is SCALED:
        return _scaled(circuit, x, missing, evidence, tables, keep)
    runtime = circuit.runtime
    log = tables.log
    outputs = LayerOutputs(circuit.output_cuts)
    layers = circuit.layer_sequence
    outputs.add(layers[0].log_forward(log, x, missing, evidence, representation, runtime))
    for layer in layers[1:]:
        outputs.add(layer.log_forward(outputs, log, representation, runtime))
    return LayerValues(None, dict(enumerate(outputs)))


def _workspace(circuit, x: torch.Tensor, keep: bool) -> Workspace:
    if keep or torch.is_grad_enabled() or circuit.plan.buffer_slots is None:
        return DISABLED
    key = (x.shape[0], circuit.dtype, x.device, torch.is_inference_mode_enabled())
    return circuit.runtime.workspace(key, circuit.plan.buffer_slots)


def _scaled(circuit, x, missing, evidence, tables: Tables, keep: bool) -> LayerValues:
    outputs = ScaledOutputs(circuit.output_cuts)
    values = LayerValues(outputs, {})
    workspace = _workspace(circuit, x, keep)
    runtime = circuit.runtime
    layers = circuit.layer_sequence
    count = len(layers)
    logged = values.logged
    placeholder = None
    i = 0
    while i < count:
        layer = layers[i]
        out: ScaledValue | torch.Tensor | None = None
        if i == 0:  # the input layer
            out = layer.scaled_forward(tables, x, missing, evidence, workspace, runtime)
        elif not logged or all(s not in logged for s in layer.source_layers):
            if not keep and i + 1 < count and layers[i + 1].fused_cross_products:
                fused = layers[i + 1].scaled_fused_forward(layer, outputs, tables, workspace, i + 1)
                if fused is not None:  # this layer's output is never read
                    placeholder = placeholder or ScaledValue(x.new_empty(0, 0, dtype=fused.p.dtype), None, 1.0)
                    outputs.add(placeholder)
                    outputs.add(fused)
                    i += 2
                    continue
            out = layer.scaled_forward(outputs, tables, workspace, i)
        if out is None:  # this layer alone in log space, then back to linear space per row
            out = layer.log_forward(values, tables.log, LOG_SUM, runtime)
        if isinstance(out, torch.Tensor):
            converted = rescaled(out)
            if converted is None:
                values.logged[i] = out
                out = ScaledValue(torch.ones_like(out[:, :1]).expand(-1, out.shape[1]), None, 1.0)  # never read
            else:
                out = converted
        outputs.add(out)
        i += 1
    return values
