"""grassq: Grassmann class representation and HAWQV3 integer-only quantization in JAX/Flax.

Top-level names are the ones users reach for most; the modules hold the rest:
`grassq.grassmann` (manifold geometry), `grassq.optim` (Riemannian optax transforms),
`grassq.models`, `grassq.data`, `grassq.train`, `grassq.analysis`.
"""

from grassq import grassmann, optim
from grassq.heads import CosineHead, GrassmannHead, LinearHead, projection_logits

__version__ = "0.1.0"

__all__ = [
    "CosineHead",
    "GrassmannHead",
    "LinearHead",
    "grassmann",
    "optim",
    "projection_logits",
]
