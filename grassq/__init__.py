"""grassq: Grassmann class representation and HAWQV3 integer-only quantization in JAX/Flax."""

__version__ = "0.1.0"
