"""Riemannian optax transforms for Grassmann bases, and a whole-model combinator.

The bases of a `GrassmannHead` (parameter `bases`, shape (C, n, k)) live on the
Grassmann manifold. `riemannian_sgd` is the optimizer of the GCR paper's code:
a torch-style momentum buffer of the Euclidean gradient E (buf = E at step 1,
then buf <- momentum * buf + E), the horizontal projection
xi = (I - S S^T) buf, and the retraction S <- qf(S - lr * xi). Its updates are
`S_new - S`, so `optax.apply_updates` lands on the manifold; the learning rate
lives inside it, and it must be the LAST transform applied to the bases (a
transform after it, e.g. weight decay or clipping, would move S off the manifold).

`with_grassmann` builds the optimizer of a whole model: Riemannian for the
Grassmann leaves, any optax optimizer for the rest, which never sees the bases
(so no weight decay and no gradient clipping on them).

Non-finite gradients: these transforms do not check their input. One NaN or inf
in a class's gradient makes its bases (S - lr·xi is NaN, and so is the QR of it)
and its momentum buffer NaN for good, silently. Guard them as any optax
optimizer: ``optax.apply_if_finite(riemannian_sgd(...), max_consecutive_errors)``
skips a step whose gradients are not all finite (bases and momentum unchanged:
its zero update keeps S on the manifold) and counts such steps in its state;
after ``max_consecutive_errors`` of them in a row it lets the update through, as
optax documents. `grassq.train`'s loop guards the whole model's update instead
(loss, gradients, parameters and BatchNorm statistics) and is on by default.

Example (a training loop's optimizer, in the user's own optax code)::

  >>> import jax, optax, grassq.optim
  >>> from grassq.grassmann import random_bases
  >>> params = {"backbone": {"kernel": jax.numpy.ones((3, 16))},
  ...           "head": {"bases": random_bases(jax.random.key(0), 10, 16, 4)}}
  >>> grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
  >>> tx = grassq.optim.with_grassmann(optax.adamw(1e-3, weight_decay=0.05),
  ...                                  grassq.optim.riemannian_sgd(0.1))
  >>> opt_state = tx.init(params)
  >>> updates, opt_state = tx.update(grads, opt_state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> float(grassq.grassmann.orthonormality_error(params["head"]["bases"])) < 1e-5
  True
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from grassq import grassmann

Schedule = Union[float, Callable[[jax.Array], jax.Array]]

RETRACTIONS = {
    "qr": grassmann.retract_qr,  # Householder on CPUs, CholeskyQR2 on GPUs/TPUs: the same Q
    "qr_householder": functools.partial(grassmann.retract_qr, method="householder"),
    "qr_cholesky": functools.partial(grassmann.retract_qr, method="cholesky"),
    "polar": grassmann.retract_polar,
    "exp": grassmann.exp_map,
}

MOMENTUM_RULES = ("paper", "transport")

GRASSMANN, EUCLIDEAN = "grassmann", "euclidean"


def _retraction(name):
  if name not in RETRACTIONS:
    raise ValueError(
        f"unknown retraction {name!r}; available: {', '.join(sorted(RETRACTIONS))}")
  return RETRACTIONS[name]


def _learning_rate(learning_rate, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


def _require_params(params, who):
  if params is None:
    raise ValueError(
        f"{who} needs the current bases: call update(updates, state, params) with params")


def _check_tree(params, atol):
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    grassmann.check_bases(leaf, atol=atol,
                          name=f"bases {jax.tree_util.keystr(path) or '(root)'}")


def _step(bases, direction, lr, retract):
  """(new bases, tangent step xi) for one Riemannian step along -direction."""
  dtype = bases.dtype
  s = grassmann._as_float(bases)
  xi = grassmann.project_tangent(s, grassmann._as_float(direction))
  new = retract(s, -lr * xi)
  return new.astype(dtype), xi


class ScaleByGrassmannState(NamedTuple):
  """State of `scale_by_grassmann`: the step count (for schedules)."""
  count: jax.Array


def scale_by_grassmann(learning_rate: Schedule, retraction: str = "qr",
                       atol: float = 1e-4) -> optax.GradientTransformation:
  """Riemannian step on Grassmann bases from a Euclidean direction.

  For each leaf S (orthonormal bases, (..., n, k)) with incoming update D (a
  Euclidean gradient or momentum), computes xi = (I - S S^T) D and
  S_new = retract(S, -lr * xi), and returns S_new - S. Must be the last
  transform applied to the bases.

  Args:
    learning_rate: float or optax schedule (a function of the step count).
    retraction: "qr" (the sign-fixed QR factor, by Householder on CPUs and by
      CholeskyQR2 on GPUs/TPUs, where batched Householder QR is ~100x slower),
      "qr_householder" / "qr_cholesky" (either method everywhere), "polar" or
      "exp" (geodesic).
    atol: init checks max |S^T S - I| <= atol for concrete params.

  Returns:
    An `optax.GradientTransformation`; `update` requires `params`.
  """
  retract = _retraction(retraction)

  def init_fn(params):
    _check_tree(params, atol)
    return ScaleByGrassmannState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    _require_params(params, "scale_by_grassmann")
    lr = _learning_rate(learning_rate, state.count)
    updates = jax.tree_util.tree_map(
        lambda d, s: _step(s, d, lr, retract)[0] - s, updates, params)
    return updates, ScaleByGrassmannState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


class TransportMomentumState(NamedTuple):
  """State of the "transport" momentum rule: step count and tangent momentum."""
  count: jax.Array
  momentum: Any


def _transport_sgd(learning_rate, momentum, retraction, atol):
  """Momentum kept in the tangent space, moved to each new point by projection."""
  retract = _retraction(retraction)

  def init_fn(params):
    _check_tree(params, atol)
    return TransportMomentumState(count=jnp.zeros([], jnp.int32),
                                  momentum=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    _require_params(params, "riemannian_sgd")
    lr = _learning_rate(learning_rate, state.count)

    def leaf(e, buf, s):
      new, xi = _step(s, momentum * buf + e, lr, retract)
      transported = grassmann.project_tangent(grassmann._as_float(new), xi)
      return new - s, transported.astype(buf.dtype)

    out = jax.tree_util.tree_map(leaf, updates, state.momentum, params)
    treedef = jax.tree_util.tree_structure(updates)
    new_updates, new_buf = jax.tree_util.tree_transpose(
        treedef, jax.tree_util.tree_structure((0, 0)), out)
    return new_updates, TransportMomentumState(
        count=optax.safe_increment(state.count), momentum=new_buf)

  return optax.GradientTransformation(init_fn, update_fn)


def riemannian_sgd(learning_rate: Schedule, momentum: float = 0.9,
                   retraction: str = "qr", momentum_rule: str = "paper",
                   atol: float = 1e-4) -> optax.GradientTransformation:
  """Riemannian SGD with momentum for Grassmann bases (the GCR optimizer).

  With the defaults this is exactly the paper's code: buf = E at step 1, then
  buf <- momentum * buf + E (PyTorch SGD: no dampening, no Nesterov; this is
  `optax.trace`, whose zero-initialized buffer gives the same buf_1 = E);
  xi = (I - S S^T) buf; S <- retract(S - lr * xi). No weight decay.

  Args:
    learning_rate: float or optax schedule.
    momentum: momentum coefficient; 0 gives plain Riemannian SGD.
    retraction: "qr", "qr_householder", "qr_cholesky", "polar" or "exp" (see
      `scale_by_grassmann`).
    momentum_rule: "paper" (Euclidean buffer, projected at each step) or
      "transport" (the buffer is the tangent step xi, re-projected onto the
      tangent space at the new point after each step: vector transport by
      projection).
    atol: init rejects bases with max |S^T S - I| > atol.

  Returns:
    An `optax.GradientTransformation` over a pytree of bases; updates are
    S_new - S and `update` requires `params`. Use it as the last (only)
    transform of the bases, e.g. inside `with_grassmann`.
  """
  if momentum_rule not in MOMENTUM_RULES:
    raise ValueError(
        f"unknown momentum_rule {momentum_rule!r}; available: {', '.join(MOMENTUM_RULES)}")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum={momentum} must be in [0, 1)")
  if momentum_rule == "transport" and momentum > 0:
    return _transport_sgd(learning_rate, momentum, retraction, atol)
  rsgd = scale_by_grassmann(learning_rate, retraction, atol)
  if momentum == 0:
    return rsgd
  return optax.chain(optax.trace(decay=momentum, nesterov=False), rsgd)


def _has_bases_key(path):
  for key in path:
    name = getattr(key, "key", getattr(key, "name", None))
    if name == "bases":
      return True
  return False


def grassmann_labels(params, is_grassmann: Optional[Callable[[Any], Any]] = None):
  """Labels "grassmann" / "euclidean" for each leaf of `params`.

  Args:
    params: parameter pytree (linen params dict, nnx.State, ...).
    is_grassmann: None (a leaf is Grassmann when its path has a key named
      "bases") or a function params -> pytree of bools with the structure of
      params.

  Returns:
    A pytree of strings with the structure of `params`.
  """
  if is_grassmann is None:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: GRASSMANN if _has_bases_key(path) else EUCLIDEAN, params)
  return jax.tree_util.tree_map(lambda b: GRASSMANN if b else EUCLIDEAN,
                                is_grassmann(params))


def with_grassmann(euclidean_tx: optax.GradientTransformation,
                   grassmann_tx: optax.GradientTransformation,
                   is_grassmann: Optional[Callable[[Any], Any]] = None,
                   ) -> optax.GradientTransformationExtraArgs:
  """Whole-model optimizer: `grassmann_tx` for the bases, `euclidean_tx` for the rest.

  Built on `optax.partition`: each transform sees only its own leaves, so
  weight decay, gradient clipping, etc. in `euclidean_tx` never touch the bases.
  Works inside jit, with schedules, and wrapped in `optax.MultiSteps`.

  Args:
    euclidean_tx: any optax optimizer (sgd, adamw, lamb, a chain...).
    grassmann_tx: e.g. `riemannian_sgd(0.1)`; must end with a Riemannian step.
    is_grassmann: see `grassmann_labels` (default: leaves under a key "bases").

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires `params`.
  """
  return optax.partition(
      {GRASSMANN: grassmann_tx, EUCLIDEAN: euclidean_tx},
      functools.partial(grassmann_labels, is_grassmann=is_grassmann))
