"""Classification heads: features (B, n) -> logits (B, C), always float32.

Heads are small Flax linen modules registered by name in `HEADS`, so a model
can take its head as a string (`make_head("cosine", 10, scale=16.0)`).
`GrassmannHead` (GCR, ICCV 2023) represents each class by a k-dim subspace;
its logits are `projection_logits`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.experimental import checkify

from grassq import grassmann

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


def projection_logits(features, bases, scale=25.0, check=False):
  """Grassmann class representation logits: scale * ||S_c^T x / ||x|| ||.

  Computed in float32 (features are cast up). Norms are safe norms, so value and
  gradient are finite at x = 0 (logits ~0 there) and where a projection is 0.
  For orthonormal bases, logits lie in [0, scale] (up to rounding) and do not
  change under x -> c x (c != 0) or S_c -> S_c Q (Q orthogonal k x k).

  A row of features with a NaN or inf gives NaN logits for that row only. With
  `check=True` a `jax.experimental.checkify` check on the features and bases is
  added; run the caller under `checkify.checkify(...)` (jit inside or outside)
  to get the error back instead of silent NaNs.

  Args:
    features: (..., n) features, typically (B, n).
    bases: (C, n, k) orthonormal bases, one subspace per class.
    scale: fixed logit scale gamma (25 in the paper).
    check: add checkify checks for non-finite features/bases.

  Returns:
    (..., C) float32 logits.

  Raises:
    ValueError: if the shapes do not match.
  """
  features = jnp.asarray(features)
  bases = jnp.asarray(bases)
  if bases.ndim != 3:
    raise ValueError(f"bases must have shape (C, n, k); got shape {bases.shape}")
  if features.ndim < 1 or features.shape[-1] != bases.shape[1]:
    raise ValueError(
        f"features of shape {features.shape} do not match bases of shape {bases.shape}: "
        f"need features (..., n) with n = bases.shape[1] = {bases.shape[1]}")
  features = features.astype(jnp.float32)
  bases = bases.astype(jnp.float32)
  if check:
    checkify.check(jnp.all(jnp.isfinite(features)),
                   "projection_logits: features contain NaN or inf")
    checkify.check(jnp.all(jnp.isfinite(bases)),
                   "projection_logits: bases contain NaN or inf")
  x = safe_normalize(features, axis=-1)
  proj = jnp.einsum("...n,cnk->...ck", x, bases)
  return scale * safe_norm(proj, axis=-1)


class GrassmannHead(nn.Module):
  """Grassmann class representation head (GCR): one k-dim subspace per class.

  Parameter `bases` of shape (num_classes, n, subspace_dim) is float32 whatever
  `dtype` is, initialized to uniformly random subspaces. Train it with
  `grassq.optim.riemannian_sgd` (via `grassq.optim.with_grassmann`) so it stays
  orthonormal; logits are `projection_logits(features, bases, scale)`.

  Attributes:
    num_classes: number of classes C.
    subspace_dim: dimension k of each class subspace, 1 <= k <= n (8 by
      default; the paper uses 8 for ResNet-50-D).
    scale: fixed logit scale gamma (25 in the paper).
    dtype: accepted for interface symmetry; the head always computes in float32.
    check: add checkify checks for non-finite features (see `projection_logits`).
  """
  num_classes: int
  subspace_dim: int = 8
  scale: float = 25.0
  dtype: Dtype = jnp.float32
  check: bool = False

  @nn.compact
  def __call__(self, features):
    n = features.shape[-1]
    if not 0 < self.subspace_dim <= n:
      raise ValueError(
          f"GrassmannHead: subspace_dim={self.subspace_dim} must satisfy "
          f"0 < subspace_dim <= n = {n} (features shape {features.shape})")
    if self.num_classes <= 0:
      raise ValueError(f"GrassmannHead: num_classes={self.num_classes} must be positive")

    def init(key, shape, dtype=jnp.float32):
      return grassmann.random_bases(key, *shape, dtype=dtype)

    bases = self.param("bases", init, (self.num_classes, n, self.subspace_dim),
                       jnp.float32)
    return projection_logits(features, bases, self.scale, check=self.check)


# name -> module class; `make_head` calls cls(num_classes=..., **kwargs), so a head
# registers with one line, e.g. HEADS["grassmann"] = GrassmannHead.
HEADS = {
    "linear": LinearHead,
    "cosine": CosineHead,
}
HEADS["grassmann"] = GrassmannHead


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
