"""Tests for grassq.optim: Riemannian SGD on Grassmann bases and with_grassmann."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grassq import grassmann as G
from grassq import optim
from grassq.heads import projection_logits

RETRACTIONS = ["qr", "qr_cholesky", "polar", "exp"]


def np_qf(a):
  q, r = np.linalg.qr(a)
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def np_retract(name, s, step):
  """Independent float64 numpy references of the four retractions."""
  if name in ("qr", "qr_cholesky"):
    return np_qf(s + step)
  if name == "polar":
    u, _, vt = np.linalg.svd(s + step, full_matrices=False)
    return u @ vt
  u, sig, vt = np.linalg.svd(step, full_matrices=False)
  return s @ vt.T @ np.diag(np.cos(sig)) @ vt + u @ np.diag(np.sin(sig)) @ vt


def rng_normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape)


def random_bases_np(seed, c, n, k):
  return np.stack([np_qf(a) for a in rng_normal(seed, (c, n, k))])


def run_steps(tx, params, grads):
  """Applies tx for each gradient in `grads` (a list); returns the params after each."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


# --- orthonormality ------------------------------------------------------------------


@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_orthonormal_after_every_step_for_1000_steps(retraction):
  tx = optim.riemannian_sgd(0.1, momentum=0.9, retraction=retraction)
  bases = G.random_bases(jax.random.key(0), 10, 32, 4)
  key = jax.random.key(1)

  @jax.jit
  def run(bases):
    def step(carry, i):
      bases, state = carry
      grads = jax.random.normal(jax.random.fold_in(key, i), bases.shape)
      updates, state = tx.update(grads, state, bases)
      bases = optax.apply_updates(bases, updates)
      return (bases, state), G.orthonormality_error(bases)
    (bases, _), errors = jax.lax.scan(step, (bases, tx.init(bases)), jnp.arange(1000))
    return bases, errors

  new, errors = run(bases)
  assert errors.shape == (1000,)
  assert float(errors.max()) <= 1e-5, float(errors.max())
  assert new.dtype == jnp.float32
  # The bases did move (so the test is not vacuous): subspaces far from the start.
  assert float(G.principal_angles(bases, new).max()) > 0.5


def test_transport_rule_orthonormal_and_its_momentum_stays_horizontal():
  tx = optim.riemannian_sgd(0.1, momentum_rule="transport")
  bases = G.random_bases(jax.random.key(0), 3, 16, 4)
  state = tx.init(bases)
  for i in range(20):
    grads = jax.random.normal(jax.random.key(i), bases.shape)
    updates, state = jax.jit(tx.update)(grads, state, bases)
    bases = optax.apply_updates(bases, updates)
    assert float(G.orthonormality_error(bases)) <= 1e-5
    np.testing.assert_allclose(jnp.swapaxes(bases, -1, -2) @ state.momentum, 0.0, atol=1e-5)


# --- exact steps against numpy references ----------------------------------------------


@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_zero_step_is_identity(retraction):
  bases = G.random_bases(jax.random.key(2), 4, 12, 3)
  tx = optim.riemannian_sgd(0.1, retraction=retraction)
  updates, _ = tx.update(jnp.zeros_like(bases), tx.init(bases), bases)
  assert float(jnp.abs(updates).max()) <= 1e-6
  # A purely vertical direction S A does not move the subspace either.
  vertical = bases @ jax.random.normal(jax.random.key(3), (4, 3, 3))
  updates, _ = tx.update(vertical, tx.init(bases), bases)
  assert float(jnp.abs(updates).max()) <= 1e-5


@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_one_step_without_momentum_matches_numpy(retraction):
  lr = 0.3
  s = random_bases_np(4, 3, 10, 4)
  e = rng_normal(5, s.shape)
  with jax.enable_x64(True):
    tx = optim.riemannian_sgd(lr, momentum=0.0, retraction=retraction)
    params = jnp.asarray(s)
    updates, _ = tx.update(jnp.asarray(e), tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, updates))
  assert new.dtype == np.float64
  for i in range(3):
    xi = e[i] - s[i] @ (s[i].T @ e[i])
    np.testing.assert_allclose(new[i], np_retract(retraction, s[i], -lr * xi), atol=1e-12)


def torch_style_loop(s, grads, lr, mu, rule="paper"):
  """The paper's optimizer written out by hand (float64, one subspace)."""
  buf = None
  out = []
  for e in grads:
    buf = e.copy() if buf is None else mu * buf + e
    xi = buf - s @ (s.T @ buf)
    s = np_qf(s - lr * xi)
    if rule == "transport":
      buf = xi - s @ (s.T @ xi)
    out.append(s)
  return out


@pytest.mark.parametrize("rule", ["paper", "transport"])
def test_momentum_rule_matches_hand_written_loop(rule):
  lr, mu = 0.2, 0.9
  s = random_bases_np(6, 1, 9, 3)[0]
  grads = [rng_normal(7 + t, s.shape) for t in range(6)]
  with jax.enable_x64(True):
    tx = optim.riemannian_sgd(lr, momentum=mu, momentum_rule=rule)
    got = run_steps(tx, jnp.asarray(s), [jnp.asarray(g) for g in grads])
  want = torch_style_loop(s, grads, lr, mu, rule)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-11)
  # The rules do differ (so each comparison above can fail).
  other = torch_style_loop(s, grads, lr, mu, "transport" if rule == "paper" else "paper")
  assert np.abs(other[-1] - want[-1]).max() > 1e-4
  # And the first step has no dampening: buf_1 = E, not (1 - mu) E.
  np.testing.assert_allclose(np.asarray(got[0]), torch_style_loop(s, grads[:1], lr, 0.0)[0],
                             atol=1e-11)


def test_update_is_horizontal_to_first_order():
  bases = G.random_bases(jax.random.key(8), 2, 20, 5)
  grads = jax.random.normal(jax.random.key(9), bases.shape)
  xi = G.project_tangent(bases, grads)
  for lr in (1e-2, 1e-3):
    tx = optim.scale_by_grassmann(lr)
    updates, _ = tx.update(grads, tx.init(bases), bases)
    # updates = -lr xi + O(lr^2), and S^T xi = 0.
    assert float(jnp.abs(updates + lr * xi).max()) <= 10 * lr**2
    assert float(jnp.abs(jnp.swapaxes(bases, -1, -2) @ updates).max()) <= 10 * lr**2


def test_loss_decreases():
  features = jax.random.normal(jax.random.key(10), (64, 16))
  labels = jax.random.randint(jax.random.key(11), (64,), 0, 5)
  bases = G.random_bases(jax.random.key(12), 5, 16, 3)

  def loss(b):
    logits = projection_logits(features, b)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad_fn = jax.jit(jax.value_and_grad(loss))
  l0, g = grad_fn(bases)
  tx = optim.riemannian_sgd(1e-3, momentum=0.0)
  updates, _ = tx.update(g, tx.init(bases), bases)
  assert float(loss(optax.apply_updates(bases, updates))) < float(l0)

  tx = optim.riemannian_sgd(0.05)
  state = tx.init(bases)
  for _ in range(50):
    _, g = grad_fn(bases)
    updates, state = tx.update(g, state, bases)
    bases = optax.apply_updates(bases, updates)
  assert float(loss(bases)) < 0.5 * float(l0)


def test_schedule_under_jit_matches_constant_steps():
  schedule = optax.linear_schedule(0.3, 0.0, transition_steps=4)
  bases = G.random_bases(jax.random.key(13), 2, 8, 2)
  grads = [jax.random.normal(jax.random.key(14 + t), bases.shape) for t in range(3)]
  got = run_steps(optim.riemannian_sgd(schedule, momentum=0.0), bases, grads)
  want, b = [], bases
  for t, g in enumerate(grads):
    tx = optim.riemannian_sgd(float(schedule(t)), momentum=0.0)
    u, _ = tx.update(g, tx.init(b), b)
    b = optax.apply_updates(b, u)
    want.append(b)
  np.testing.assert_allclose(got[-1], want[-1], atol=1e-6)
  assert not np.allclose(got[-1], run_steps(optim.riemannian_sgd(0.3, momentum=0.0),
                                            bases, grads)[-1], atol=1e-3)


# --- bad input -----------------------------------------------------------------------


def test_bad_input_rejected():
  tx = optim.riemannian_sgd(0.1)
  with pytest.raises(ValueError, match="not orthonormal"):
    tx.init({"bases": 2.0 * G.random_bases(jax.random.key(0), 2, 5, 2)})
  with pytest.raises(ValueError, match=r"\['bases'\].*0 < k <= n"):
    tx.init({"bases": jnp.ones((2, 3, 4))})
  with pytest.raises(ValueError, match="0 < k <= n"):
    tx.init(jnp.ones((2, 3, 0)))
  with pytest.raises(ValueError, match="non-finite"):
    tx.init(jnp.full((2, 3, 1), jnp.nan))
  for t in (tx, optim.scale_by_grassmann(0.1),
            optim.riemannian_sgd(0.1, momentum_rule="transport")):
    bases = G.random_bases(jax.random.key(0), 2, 5, 2)
    with pytest.raises(ValueError, match="params"):
      t.update(bases, t.init(bases))
  with pytest.raises(ValueError, match="unknown retraction 'cayley'"):
    optim.riemannian_sgd(0.1, retraction="cayley")
  with pytest.raises(ValueError, match="unknown momentum_rule"):
    optim.riemannian_sgd(0.1, momentum_rule="nesterov")
  with pytest.raises(ValueError, match="momentum"):
    optim.riemannian_sgd(0.1, momentum=1.0)


# --- with_grassmann ------------------------------------------------------------------


def model_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"backbone": {"kernel": jax.random.normal(k1, (5, 16)),
                       "bias": jax.random.normal(k2, (16,))},
          "head": {"bases": G.random_bases(k3, 4, 16, 3)}}


def random_grads(params, seed):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("rule", ["paper", "transport"])
def test_with_grassmann_splits_the_model(rule):
  params = model_params()
  grads = [random_grads(params, 100 + t) for t in range(3)]
  # A large weight decay: it must reach the backbone and never the bases.
  euclid = lambda: optax.adamw(1e-2, weight_decay=10.0)
  riem = lambda: optim.riemannian_sgd(0.1, momentum_rule=rule)
  got = run_steps(optim.with_grassmann(euclid(), riem()), params, grads)[-1]
  alone_e = run_steps(euclid(), params["backbone"], [g["backbone"] for g in grads])[-1]
  alone_g = run_steps(riem(), params["head"]["bases"],
                      [g["head"]["bases"] for g in grads])[-1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, got["backbone"], alone_e)
  np.testing.assert_array_equal(got["head"]["bases"], alone_g)
  assert float(G.orthonormality_error(got["head"]["bases"])) <= 1e-5
  # Sanity: adamw on the bases would indeed have moved them off the manifold.
  wrong = run_steps(euclid(), params, grads)[-1]
  assert float(G.orthonormality_error(wrong["head"]["bases"])) > 1e-2


def test_with_grassmann_custom_labels():
  params = {"w": jnp.ones((3, 2)), "subspaces": G.random_bases(jax.random.key(0), 2, 6, 2)}
  grads = random_grads(params, 1)
  tx = optim.with_grassmann(optax.sgd(0.1), optim.riemannian_sgd(0.1),
                            is_grassmann=lambda p: {"w": False, "subspaces": True})
  got = run_steps(tx, params, [grads])[-1]
  np.testing.assert_allclose(got["w"], params["w"] - 0.1 * grads["w"], rtol=1e-6)
  assert float(G.orthonormality_error(got["subspaces"])) <= 1e-5
  # Default labels would treat "subspaces" as Euclidean.
  assert optim.grassmann_labels(params) == {"w": "euclidean", "subspaces": "euclidean"}


def test_with_grassmann_multisteps_and_schedule_under_jit():
  params = model_params(1)
  grads = [random_grads(params, 200 + t) for t in range(4)]
  make = lambda: optim.with_grassmann(
      optax.chain(optax.clip_by_global_norm(1.0),
                  optax.sgd(optax.cosine_decay_schedule(0.1, 10), momentum=0.9)),
      optim.riemannian_sgd(optax.cosine_decay_schedule(0.2, 10)))
  got = run_steps(optax.MultiSteps(make(), every_k_schedule=2), params, grads)
  mean = lambda a, b: jax.tree_util.tree_map(lambda x, y: (x + y) / 2, a, b)
  want = run_steps(make(), params, [mean(grads[0], grads[1]), mean(grads[2], grads[3])])
  # Mini-steps leave params unchanged; every 2nd step applies the averaged gradient.
  jax.tree_util.tree_map(np.testing.assert_array_equal, got[0], params)
  for g, w in ((got[1], want[0]), (got[3], want[1])):
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-6), g, w)
  assert float(G.orthonormality_error(got[3]["head"]["bases"])) <= 1e-5


def test_with_grassmann_in_a_jitted_train_step():
  features = jax.random.normal(jax.random.key(0), (32, 5))
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 4)
  params = model_params(2)
  tx = optim.with_grassmann(optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-2, 3, 20),
                                        weight_decay=0.05),
                            optim.riemannian_sgd(optax.cosine_decay_schedule(0.1, 20)))

  def loss_fn(p):
    h = jnp.tanh(features @ p["backbone"]["kernel"] + p["backbone"]["bias"])
    logits = projection_logits(h, p["head"]["bases"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = jax.jit(tx.init)(params)
  losses = []
  for _ in range(20):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert float(G.orthonormality_error(params["head"]["bases"])) <= 1e-5


def test_with_grassmann_nnx_optimizer():
  from flax import nnx

  from grassq.heads import GrassmannHead
  model = nnx.bridge.ToNNX(GrassmannHead(3, subspace_dim=2), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 6))
  nnx.bridge.lazy_init(model, x)
  tx = optim.with_grassmann(optax.adamw(1e-3, weight_decay=1.0), optim.riemannian_sgd(0.5))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = np.asarray(model.bases[...])
  grads = nnx.grad(lambda m: -m(x)[:, 0].mean())(model)
  optimizer.update(model, grads)
  after = np.asarray(model.bases[...])
  assert not np.allclose(before, after)
  assert float(G.orthonormality_error(after)) <= 1e-5


def test_readme_example_in_module_docstring_runs():
  result = doctest.testmod(optim, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 5 and result.failed == 0
  lines = [l for l in optim.__doc__.splitlines() if l.strip().startswith((">>>", "..."))]
  user_code = [l for l in lines if "tx" in l or "apply_updates" in l]
  assert len(user_code) <= 5


@pytest.mark.parametrize("momentum_rule", ["paper", "transport"])
def test_nonfinite_gradients_poison_the_bases_unless_guarded(momentum_rule):
  key = jax.random.key(3)
  params = {"head": {"bases": G.random_bases(key, 4, 12, 3)},
            "w": jnp.ones((5,))}
  good = jax.tree_util.tree_map(lambda p: 0.1 * jnp.sin(jnp.arange(p.size).reshape(p.shape)
                                                        + 1.0), params)
  bad = jax.tree_util.tree_map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
  rsgd = optim.riemannian_sgd(0.1, momentum_rule=momentum_rule)
  unguarded = optim.with_grassmann(optax.sgd(0.1), rsgd)
  guarded = optax.apply_if_finite(optim.with_grassmann(optax.sgd(0.1), rsgd), 3)
  for tx, poisoned in ((unguarded, True), (guarded, False)):
    state = tx.init(params)
    p = params
    for g in (good, bad, good):
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    finite = bool(jnp.all(jnp.isfinite(p["head"]["bases"])))
    assert finite is not poisoned
  assert int(state.total_notfinite) == 1
  assert float(jnp.max(G.orthonormality_error(p["head"]["bases"]))) < 1e-5
  # momentum untouched by the skipped step: the guarded run equals two good steps
  ref = params
  ref_state = unguarded.init(params)
  for g in (good, good):
    updates, ref_state = unguarded.update(g, ref_state, ref)
    ref = optax.apply_updates(ref, updates)
  np.testing.assert_allclose(p["head"]["bases"], ref["head"]["bases"], atol=1e-6)


# ----------------------------------------------------------------- the released update (issue 16)


def released_loop(bases_list, grads, lr, mu, period, lr_factor=1.0):
  """Independent float64 transcription of innerlee/GCR's RSGD step (gcr/rsgd.py).

  Per call and per Grassmann tensor, in order: torch momentum buffer (clone at the first
  call, then buf * mu + d_p), g = buf - S (S^T buf), SVD g = U s Vt, the geodesic
  (S Vt^T) cos(alpha s) Vt + U sin(alpha s) Vt with alpha = -lr * lr_factor, then
  np.linalg.qr's unsigned Q when the global counter % period == 0; the counter ticks once
  per tensor per call and starts at 0.
  """
  params = [b.copy() for b in bases_list]
  bufs = [None] * len(params)
  opt_iter = 0
  history = []
  for step_grads in grads:
    for i, (s, d) in enumerate(zip(params, step_grads)):
      bufs[i] = d.copy() if bufs[i] is None else bufs[i] * mu + d
      alpha = -lr * lr_factor
      new = np.empty_like(s)
      for c in range(s.shape[0]):
        p, b = s[c], bufs[i][c]
        g = b - p @ (p.T @ b)
        u, sv, vt = np.linalg.svd(g, full_matrices=False)
        new[c] = ((p @ vt.T) * np.cos(alpha * sv)[None] + u * np.sin(alpha * sv)[None]) @ vt
        if opt_iter % period == 0:
          new[c] = np.linalg.qr(new[c])[0]
      opt_iter += 1
      params[i] = new
    history.append([p.copy() for p in params])
  return history


@pytest.mark.parametrize("period,lr_factor", [(5, 1.0), (1, 3.0), (3, 1.0)])
def test_released_rsgd_matches_a_transcription_of_the_released_step(period, lr_factor):
  """Two Grassmann tensors (the counter is shared), 40 steps of random gradients, float64."""
  lr, mu, steps = 0.05, 0.9, 40
  bases = {"a": random_bases_np(11, 3, 9, 3), "b": random_bases_np(12, 2, 7, 2)}
  rng = np.random.default_rng(13)
  grads = [[rng.normal(size=bases[k].shape) for k in ("a", "b")] for _ in range(steps)]
  want = released_loop([bases["a"], bases["b"]], grads, lr, mu, period, lr_factor)
  with jax.enable_x64(True):
    tx = optim.released_rsgd(optax.constant_schedule(lr), mu, reorthonormalize_every=period,
                             lr_factor=lr_factor)
    params = jax.tree_util.tree_map(jnp.asarray, bases)
    state = tx.init(params)
    step = jax.jit(lambda g, st, p: tx.update(g, st, p))
    for t, g in enumerate(grads):
      updates, state = step({"a": jnp.asarray(g[0]), "b": jnp.asarray(g[1])}, state, params)
      params = optax.apply_updates(params, updates)
      for key, w in zip(("a", "b"), want[t]):
        np.testing.assert_allclose(np.asarray(params[key]), w, atol=1e-10, err_msg=f"{key} {t}")
  # grassq's default differs measurably from the released step on the same inputs
  default = optim.riemannian_sgd(lr, mu)
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(jnp.asarray, bases)
    state = default.init(params)
    for g in grads:
      updates, state = default.update({"a": jnp.asarray(g[0]), "b": jnp.asarray(g[1])},
                                      state, params)
      params = optax.apply_updates(params, updates)
  assert np.abs(np.asarray(params["a"]) - want[-1][0]).max() > 1e-3


def test_periodic_reorthonormalization_fires_on_the_shared_counter():
  """Without momentum and with a tiny step the geodesic is orthonormal to rounding; a
  deliberately non-orthonormal start shows exactly when the QR fires."""
  s = random_bases_np(21, 2, 8, 3)
  bases = {"a": s, "b": s.copy(), "c": s.copy()}
  tx = optim.riemannian_sgd(0.0, momentum=0.0, retraction="geodesic",
                            reorthonormalize_every=2, reorthonormalize_qr="unsigned", atol=2.0)
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a * 1.5), bases)  # ||col|| = 1.5
    state = tx.init(params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    fired = []
    for _ in range(2):
      updates, state = tx.update(zero, state, params)
      new = optax.apply_updates(params, updates)
      fired.append([float(G.orthonormality_error(new[k])) < 1e-10 for k in "abc"])
  # counters: step 0 -> 0, 1, 2; step 1 -> 3, 4, 5: period 2 fires at 0, 2, 4
  assert fired == [[True, False, True], [False, True, False]]


def test_signed_and_unsigned_reorthonormalization_span_the_same_subspace():
  s = random_bases_np(22, 3, 10, 4)
  a = rng_normal(23, s.shape) * 0.3
  signed = np.asarray(G.orthonormalize(s + a))
  unsigned = np.asarray(G.qr_unsigned(s + a))
  np.testing.assert_allclose(np.abs(signed), np.abs(unsigned), atol=1e-5)
  proj = lambda q: q @ np.swapaxes(q, -1, -2)
  np.testing.assert_allclose(proj(signed), proj(unsigned), atol=1e-5)
  np.testing.assert_allclose(np.asarray(G.geodesic(s, np.zeros_like(s))), s, atol=1e-6)


def test_released_rsgd_rejects_bad_settings():
  with pytest.raises(ValueError, match="reorthonormalize_every"):
    optim.released_rsgd(0.1, reorthonormalize_every=-1)
  with pytest.raises(ValueError, match="reorthonormalize_every"):
    optim.riemannian_sgd(0.1, reorthonormalize_every=2.5)
  with pytest.raises(ValueError, match="reorthonormalize_qr"):
    optim.released_rsgd(0.1, reorthonormalize_qr="householder")
  with pytest.raises(ValueError, match="lr_factor"):
    optim.released_rsgd(0.1, lr_factor=0.0)
  with pytest.raises(ValueError, match="unknown retraction"):
    optim.riemannian_sgd(0.1, retraction="cayley")
