"""Riemannian optax transforms for Grassmann bases, and a whole-model combinator.

The bases of a `GrassmannHead` (parameter `bases`, shape (C, n, k)) live on the
Grassmann manifold. `riemannian_sgd` is the GCR optimizer: a torch-style momentum
buffer of the Euclidean gradient E (buf = E at step 1, then
buf <- momentum * buf + E), the horizontal projection xi = (I - S S^T) buf, and a
retraction S <- R(S, -lr * xi). Its updates are `S_new - S`, so
`optax.apply_updates` lands on the manifold; the learning rate lives inside it,
and it must be the LAST transform applied to the bases (a transform after it,
e.g. weight decay or clipping, would move S off the manifold).

Two variants, on purpose:

* grassq's default (`riemannian_sgd(lr)`): the sign-fixed QR retraction
  S <- qf(S - lr * xi) every step. Orthonormal to rounding after every step and
  the basis never flips sign under the momentum buffer.
* the released code's update (`released_rsgd`, innerlee/GCR `gcr/rsgd.py`): the
  same buffer and projection, then the geodesic step computed through an SVD
  (`grassmann.geodesic`), and torch's unsigned QR only every
  `reorthonormalize_every` calls (5 in `RSGD`, 1 in its AdamW/LAMB wrappers),
  counted per Grassmann tensor over all of them and firing on the first call;
  the bases' learning rate is the main optimizer's current one times
  `lr_factor`. Tested against a float64 transcription of that step
  (tests/test_optim.py). docs/differences.md measures what the two change.

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
    # The geodesic without re-orthonormalizing: drifts off the manifold unless paired
    # with `reorthonormalize_every` (as the released code does).
    "geodesic": grassmann.geodesic,
}

# QR used by the periodic re-orthonormalization.
REORTH_QRS = {"signed": grassmann.orthonormalize, "unsigned": grassmann.qr_unsigned}

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


def _reorth(reorthonormalize_every, reorthonormalize_qr):
  """(period, qr) of the periodic re-orthonormalization, checked; period 0 turns it off."""
  if (not isinstance(reorthonormalize_every, int) or isinstance(reorthonormalize_every, bool)
      or reorthonormalize_every < 0):
    raise ValueError(f"reorthonormalize_every={reorthonormalize_every!r} must be an int >= 0 "
                     "(0: never)")
  if reorthonormalize_qr not in REORTH_QRS:
    raise ValueError(f"unknown reorthonormalize_qr {reorthonormalize_qr!r}; available: "
                     f"{', '.join(REORTH_QRS)}")
  return reorthonormalize_every, REORTH_QRS[reorthonormalize_qr]


def _step_tree(directions, params, count, lr, retract, reorth):
  """Riemannian steps along -direction for every leaf: (treedef, [(new bases, xi)]).

  With a period p (``reorth[0] > 0``), leaf i of L at step t is re-orthonormalized
  after its retraction when (t * L + i) % p == 0: the released code's counter, one
  tick per Grassmann tensor per call, shared by all of them, firing at 0.
  """
  period, qr = reorth
  leaves, treedef = jax.tree_util.tree_flatten(directions)
  bases = treedef.flatten_up_to(params)
  num = len(leaves)
  out = []
  for i, (d, s) in enumerate(zip(leaves, bases)):
    dtype = s.dtype
    s = grassmann._as_float(s)
    xi = grassmann.project_tangent(s, grassmann._as_float(d))
    new = retract(s, -lr * xi)
    if period:
      # (count * num + i) % period without int32 overflow for long runs
      tick = ((count % period) * (num % period) + i) % period
      new = jax.lax.cond(tick == 0, qr, lambda a: a, new)
    out.append((new.astype(dtype), xi))
  return treedef, out


class ScaleByGrassmannState(NamedTuple):
  """State of `scale_by_grassmann`: the step count (for schedules)."""
  count: jax.Array


def scale_by_grassmann(learning_rate: Schedule, retraction: str = "qr",
                       atol: float = 1e-4, reorthonormalize_every: int = 0,
                       reorthonormalize_qr: str = "signed") -> optax.GradientTransformation:
  """Riemannian step on Grassmann bases from a Euclidean direction.

  For each leaf S (orthonormal bases, (..., n, k)) with incoming update D (a
  Euclidean gradient or momentum), computes xi = (I - S S^T) D and
  S_new = retract(S, -lr * xi), and returns S_new - S. Must be the last
  transform applied to the bases.

  Args:
    learning_rate: float or optax schedule (a function of the step count).
    retraction: "qr" (the sign-fixed QR factor, by Householder on CPUs and by
      CholeskyQR2 on GPUs/TPUs, where batched Householder QR is ~100x slower),
      "qr_householder" / "qr_cholesky" (either method everywhere), "polar",
      "exp" (geodesic, re-orthonormalized every step) or "geodesic" (the
      geodesic alone, as the released code computes it; pair it with
      `reorthonormalize_every`).
    atol: init checks max |S^T S - I| <= atol for concrete params.
    reorthonormalize_every: 0 (never) or a period p: a QR of the new bases
      every p-th call per Grassmann leaf, the counter shared by all leaves (leaf
      i of L at step t fires when (t * L + i) % p == 0), as in the released code.
    reorthonormalize_qr: "signed" (`grassmann.orthonormalize`) or "unsigned"
      (LAPACK's Q as torch.linalg.qr returns it, the released code's choice:
      columns may flip sign).

  Returns:
    An `optax.GradientTransformation`; `update` requires `params`.
  """
  retract = _retraction(retraction)
  reorth = _reorth(reorthonormalize_every, reorthonormalize_qr)

  def init_fn(params):
    _check_tree(params, atol)
    return ScaleByGrassmannState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    _require_params(params, "scale_by_grassmann")
    lr = _learning_rate(learning_rate, state.count)
    treedef, out = _step_tree(updates, params, state.count, lr, retract, reorth)
    base = treedef.flatten_up_to(params)
    updates = treedef.unflatten([new - s for (new, _), s in zip(out, base)])
    return updates, ScaleByGrassmannState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


class TransportMomentumState(NamedTuple):
  """State of the "transport" momentum rule: step count and tangent momentum."""
  count: jax.Array
  momentum: Any


def _transport_sgd(learning_rate, momentum, retraction, atol, reorth):
  """Momentum kept in the tangent space, moved to each new point by projection."""
  retract = _retraction(retraction)

  def init_fn(params):
    _check_tree(params, atol)
    return TransportMomentumState(count=jnp.zeros([], jnp.int32),
                                  momentum=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    _require_params(params, "riemannian_sgd")
    lr = _learning_rate(learning_rate, state.count)
    directions = jax.tree_util.tree_map(lambda e, buf: momentum * buf + e, updates,
                                        state.momentum)
    treedef, out = _step_tree(directions, params, state.count, lr, retract, reorth)
    base = treedef.flatten_up_to(params)
    bufs = treedef.flatten_up_to(state.momentum)
    new_updates = treedef.unflatten([new - s for (new, _), s in zip(out, base)])
    new_buf = treedef.unflatten([
        grassmann.project_tangent(grassmann._as_float(new), xi).astype(b.dtype)
        for (new, xi), b in zip(out, bufs)])
    return new_updates, TransportMomentumState(
        count=optax.safe_increment(state.count), momentum=new_buf)

  return optax.GradientTransformation(init_fn, update_fn)


def riemannian_sgd(learning_rate: Schedule, momentum: float = 0.9,
                   retraction: str = "qr", momentum_rule: str = "paper",
                   atol: float = 1e-4, reorthonormalize_every: int = 0,
                   reorthonormalize_qr: str = "signed") -> optax.GradientTransformation:
  """Riemannian SGD with momentum for Grassmann bases (the GCR optimizer).

  The momentum buffer is the released code's (PyTorch SGD: buf = E at step 1,
  then buf <- momentum * buf + E, no dampening, no Nesterov; this is
  `optax.trace`, whose zero-initialized buffer gives the same buf_1 = E);
  xi = (I - S S^T) buf; S <- retract(S, -lr * xi). No weight decay. With the
  defaults the retraction is grassq's sign-fixed QR every step, which is NOT the
  released code's step; `released_rsgd` is (geodesic + periodic unsigned QR).

  Args:
    learning_rate: float or optax schedule. To couple the bases to the main
      optimizer's schedule as the released code does, pass
      ``lambda count: factor * schedule(count)`` (or use `released_rsgd`).
    momentum: momentum coefficient; 0 gives plain Riemannian SGD.
    retraction: "qr", "qr_householder", "qr_cholesky", "polar", "exp" or
      "geodesic" (see `scale_by_grassmann`).
    momentum_rule: "paper" (Euclidean buffer, projected at each step, as the
      paper and its code do) or "transport" (the buffer is the tangent step xi,
      re-projected onto the tangent space at the new point after each step:
      vector transport by projection).
    atol: init rejects bases with max |S^T S - I| > atol.
    reorthonormalize_every, reorthonormalize_qr: periodic QR after the
      retraction (see `scale_by_grassmann`); 0 (the default) never.

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
  reorth = _reorth(reorthonormalize_every, reorthonormalize_qr)
  _retraction(retraction)
  if momentum_rule == "transport" and momentum > 0:
    return _transport_sgd(learning_rate, momentum, retraction, atol, reorth)
  rsgd = scale_by_grassmann(learning_rate, retraction, atol, reorthonormalize_every,
                            reorthonormalize_qr)
  if momentum == 0:
    return rsgd
  return optax.chain(optax.trace(decay=momentum, nesterov=False), rsgd)


def released_rsgd(learning_rate: Schedule, momentum: float = 0.9,
                  reorthonormalize_every: int = 5, reorthonormalize_qr: str = "unsigned",
                  lr_factor: float = 1.0, atol: float = 1e-4) -> optax.GradientTransformation:
  """The released GCR code's Riemannian update (innerlee/GCR, `gcr/rsgd.py`).

  torch-style momentum buffer of the Euclidean gradient, xi = (I - S S^T) buf,
  the geodesic step S V cos(eta Sigma) V^T + U sin(eta Sigma) V^T with
  -eta xi = U Sigma V^T and eta = lr_factor * lr (`grassmann.geodesic`), and
  torch's unsigned QR every `reorthonormalize_every` calls per Grassmann tensor
  (a counter shared by all of them, firing on the first call). `RSGD` uses a
  period of 5 and lr_factor 1 (the bases follow the network's SGD schedule);
  its AdamW and LAMB wrappers use period 1 and give the bases the main
  optimizer's current learning rate times lr_factor (their configs:
  0.1 / 0.001 = 100 for Swin-T, 0.3 / 0.004 = 75 for DeiT3-S).

  Args:
    learning_rate: the main optimizer's learning rate or schedule.
    momentum: momentum coefficient.
    reorthonormalize_every: the period (0: never; the geodesic then drifts).
    reorthonormalize_qr: "unsigned" (released) or "signed".
    lr_factor: the bases' learning rate over `learning_rate`.
    atol: init rejects bases with max |S^T S - I| > atol.

  Returns:
    An `optax.GradientTransformation` (see `riemannian_sgd`).
  """
  if not lr_factor > 0:
    raise ValueError(f"lr_factor={lr_factor!r} must be > 0")
  if callable(learning_rate):
    lr = lambda count: lr_factor * learning_rate(count)
  else:
    lr = lr_factor * learning_rate
  return riemannian_sgd(lr, momentum, retraction="geodesic", momentum_rule="paper", atol=atol,
                        reorthonormalize_every=reorthonormalize_every,
                        reorthonormalize_qr=reorthonormalize_qr)


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
