"""HAWQV3 mixed precision: Hutchinson Hessian traces, sensitivities, and the bit-allocation ILP.

`layer_sensitivities(model, variables, batches, key)` estimates each layer's Hessian trace in the
BN-folded coordinates the quantizers use and scores Omega = trace × ||Q_b(W) − W||² per bit-width;
`cost_tables` gives size / BOPs / latency per layer and bit-width; `allocate_bits` solves the ILP
(cvxpy, HiGHS) under any budgets at once and returns the per-layer bit dict that
`grassq.quant.qresnet.quantized(..., bits=...)` and ``config.quant.bits`` take.
"""

from grassq.mixed.hessian import (
    TraceEstimate,
    folded_loss,
    folded_weights,
    hutchinson_trace,
    layer_sensitivities,
    sensitivity,
)
from grassq.mixed.ilp import (
    BUDGET_FRACTIONS,
    allocate_bits,
    budget_from_fraction,
    cost_tables,
    tied_layers,
)

__all__ = [
    "BUDGET_FRACTIONS",
    "TraceEstimate",
    "allocate_bits",
    "budget_from_fraction",
    "cost_tables",
    "folded_loss",
    "folded_weights",
    "hutchinson_trace",
    "layer_sensitivities",
    "sensitivity",
    "tied_layers",
]
