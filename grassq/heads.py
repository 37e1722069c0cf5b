"""Classification heads: features (B, n) -> logits (B, C), always float32.

Heads are small Flax linen modules registered by name in `HEADS`, so a model
can take its head as a string (`make_head("cosine", 10, scale=16.0)`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def safe_norm(x, axis=-1, keepdims=False, eps=1e-12):
  """Euclidean norm with a finite value and gradient everywhere.

  `jnp.linalg.norm` has a NaN gradient at 0. Here the squared norm is clamped
  from below at eps**2 before the square root, so the norm is `eps` at 0 and its
  gradient there is exactly 0.

  Args:
    x: array.
    axis: axis (or axes) to reduce.
    keepdims: keep the reduced axes with size 1.
    eps: smallest returned value.

  Returns:
    max(||x||, eps) reduced over `axis`.
  """
  x = jnp.asarray(x)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  return jnp.sqrt(jnp.maximum(sq, jnp.asarray(eps, sq.dtype) ** 2))


def safe_normalize(x, axis=-1, eps=1e-12):
  """x / ||x|| along `axis`; 0 maps to 0 with a finite gradient."""
  return x / safe_norm(x, axis=axis, keepdims=True, eps=eps)


class LinearHead(nn.Module):
  """Affine softmax classifier: logits = x W + b.

  Attributes:
    num_classes: number of classes C.
    dtype: compute dtype of the matmul; parameters and logits are float32.
  """
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, name="dense")(features)
    return logits.astype(jnp.float32)


class CosineHead(nn.Module):
  """Cosine-similarity classifier (normalized softmax).

  logits[b, c] = scale * <x_b / ||x_b||, w_c / ||w_c||>, so |logits| <= scale
  and logits do not change when a feature vector is scaled by c > 0.

  Attributes:
    num_classes: number of classes C.
    scale: fixed logit scale (gamma).
    dtype: accepted for interface symmetry; the head always computes in float32.
  """
  num_classes: int
  scale: float = 25.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    features = features.astype(jnp.float32)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (features.shape[-1], self.num_classes), jnp.float32)
    x = safe_normalize(features, axis=-1)
    w = safe_normalize(kernel, axis=0)
    return self.scale * (x @ w)


# name -> module class; `make_head` calls cls(num_classes=..., **kwargs), so a head
# registers with one line, e.g. HEADS["grassmann"] = GrassmannHead.
HEADS = {
    "linear": LinearHead,
    "cosine": CosineHead,
}


def make_head(name, num_classes, /, **kwargs):
  """Builds the head registered under `name` in `HEADS`.

  Args:
    name: a key of `HEADS` (positional only, so that kwargs may carry the
      Flax module `name`, e.g. name="head").
    num_classes: number of classes.
    **kwargs: remaining fields of that head (e.g. `scale`, `dtype`, `name`).

  Returns:
    An unbound Flax module.

  Raises:
    ValueError: if `name` is not registered.
  """
  if name not in HEADS:
    raise ValueError(
        f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}")
  return HEADS[name](num_classes=num_classes, **kwargs)
