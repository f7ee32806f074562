"""Most probable explanation by max-product decoding."""

from __future__ import annotations

import torch

from pclayer.layers import ArgmaxChooser
from pclayer.queries.evidence import prepare, require_positive
from pclayer.representations import MAX_PRODUCT
from pclayer.topdown import top_down
from pclayer.topk import TopKEvidence


@torch.no_grad()
def mpe(circuit, x: torch.Tensor, missing: torch.Tensor | None = None,
        soft_evidence: torch.Tensor | TopKEvidence | None = None) -> torch.Tensor:
    """Max-product decoding: the missing values of the best joint assignment of
    (missing variables, latent choices of the sum nodes) under the weighted distribution.

    On an HMM this is the Viterbi decoding; on deterministic circuits it is the exact
    ``argmax_x`` of :func:`log_prob`.

    Returns:
        (B, num_vars): observed entries unchanged, missing ones decoded.

    Raises:
        ZeroProbabilityError: for rows whose evidence has probability zero.
    """
    ev = prepare(circuit, x, missing, soft_evidence)
    tables = circuit.tables()
    values = circuit.evaluate(MAX_PRODUCT, ev.x, ev.missing, ev.soft_evidence, tables, keep=True)
    require_positive(values.root(circuit), "mpe")
    x_out, _ = top_down(circuit, values, tables, ev.x, ev.missing, ev.soft_evidence, ArgmaxChooser(), None)
    return torch.where(missing, x_out.to(x.dtype), x) if missing is not None else x.clone()
