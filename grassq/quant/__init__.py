"""HAWQV3 quantization: quantizers, QAT layers and models, dyadic integer arithmetic.

`dyadic` turns a real scale into multiplier * 2^-shift on the host; `requantize`
applies it to int32 accumulators with integers only (round half up, exact).
The quantizers (`quantize_weight`, `fake_quant`, ...) follow HAWQV3: symmetric
per-channel weights, unsigned activations after ReLU, int32 biases.
`grassq.quant.qat` holds the QAT layers, `grassq.quant.qresnet` the QAT ResNets,
`grassq.quant.qinception` the QAT InceptionV3,
`grassq.quant.intops` the integer-only primitives (conv, pools, int4 packing, isqrt).
"""

from grassq.quant import cost, intops, program, qat, qinception, qresnet

from grassq.quant.dyadic import (
    MAX_SHIFT,
    MIN_SHIFT,
    REQUANTIZE_BITS,
    dyadic,
    requantize,
    requantize_reference,
)
from grassq.quant.quantizers import (
    SUPPORTED_BITS,
    activation_scale,
    fake_quant,
    fake_quant_weight,
    qrange,
    quantize_activation,
    quantize_bias,
    quantize_weight,
    round_ste,
    weight_scale,
)

__all__ = [
    "cost",
    "intops",
    "program",
    "qat",
    "qinception",
    "qresnet",
    "MAX_SHIFT",
    "MIN_SHIFT",
    "REQUANTIZE_BITS",
    "SUPPORTED_BITS",
    "activation_scale",
    "dyadic",
    "fake_quant",
    "fake_quant_weight",
    "qrange",
    "quantize_activation",
    "quantize_bias",
    "quantize_weight",
    "requantize",
    "requantize_reference",
    "round_ste",
    "weight_scale",
]
