"""Tests for projection_logits and GrassmannHead (grassq.heads)."""

import functools

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grassq import grassmann as G
from grassq import heads, optim
from grassq.heads import GrassmannHead, projection_logits
from grassq.models import create_model

C, N, K = 6, 16, 4
BASES = G.random_bases(jax.random.key(0), C, N, K)
_logits = jax.jit(projection_logits)


def np_logits(x, bases, scale=25.0):
  x = np.asarray(x, np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return scale * np.linalg.norm(np.einsum("bn,cnk->bck", x, np.asarray(bases, np.float64)),
                                axis=-1)


features = hnp.arrays(np.float32, (5, N),
                      elements=st.floats(-100, 100, width=32, allow_subnormal=False))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(x=features, c=st.floats(1e-2, 1e2), negative=st.booleans(),
                  seed=st.integers(0, 2**31 - 1))
def test_logits_bounded_and_invariant(x, c, negative, seed):
  hypothesis.assume(np.all(np.linalg.norm(x.astype(np.float64), axis=-1) > 1e-3))
  logits = np.asarray(_logits(x, BASES))
  assert logits.shape == (5, C) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, np_logits(x, BASES), atol=1e-4)
  # [0, scale] up to float32 rounding of ||S^T x_hat|| <= 1.
  assert np.all(logits >= 0) and np.all(logits <= 25.0 * (1 + 1e-6))
  # x -> c x, for c > 0 and c < 0.
  c = np.float32(-c if negative else c)
  np.testing.assert_allclose(_logits(c * x, BASES), logits, atol=1e-4)
  # S -> S Q for orthogonal Q: same subspace, same logits.
  q = np.linalg.qr(np.random.default_rng(seed).standard_normal((C, K, K)))[0]
  np.testing.assert_allclose(_logits(x, BASES @ q.astype(np.float32)), logits, atol=1e-4)


def test_logit_is_scale_for_features_in_the_subspace_and_zero_orthogonal():
  x = jnp.stack([BASES[2] @ jnp.arange(1.0, K + 1), jnp.zeros(N)])
  p = jnp.eye(N) - BASES[3] @ BASES[3].T
  x = x.at[1].set(p @ jnp.ones(N))  # orthogonal to subspace 3
  logits = projection_logits(x, BASES, scale=10.0)
  np.testing.assert_allclose(logits[0, 2], 10.0, rtol=1e-5)
  np.testing.assert_allclose(logits[1, 3], 0.0, atol=1e-5)


def test_finite_gradients_at_zero_features_and_zero_projection():
  # Row 0: x = 0. Row 1: x orthogonal to subspace 0, so ||S_0^T x|| = 0 exactly.
  bases = jnp.zeros((2, 4, 1)).at[0, 0, 0].set(1.0).at[1, 1, 0].set(1.0)
  x = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0]])
  logits = projection_logits(x, bases)
  assert np.all(np.isfinite(logits)) and float(logits[1, 0]) == pytest.approx(0.0, abs=1e-9)
  gx, gb = jax.grad(lambda x, b: projection_logits(x, b).sum(), argnums=(0, 1))(x, bases)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gb))
  # Through the module too.
  head = GrassmannHead(3, subspace_dim=2)
  params = head.init(jax.random.key(0), jnp.ones((2, 5)))
  g = jax.grad(lambda p, x: head.apply(p, x).sum(), argnums=(0, 1))(params, jnp.zeros((2, 5)))
  assert all(np.all(np.isfinite(l)) for l in jax.tree_util.tree_leaves(g))


def test_nan_features_give_nan_row_and_checkify_catches_them():
  x = jax.random.normal(jax.random.key(1), (3, N)).at[1, 4].set(jnp.nan)
  logits = _logits(x, BASES)
  assert np.all(np.isnan(logits[1]))
  assert np.all(np.isfinite(logits[0])) and np.all(np.isfinite(logits[2]))

  checked = jax.jit(checkify.checkify(functools.partial(projection_logits, check=True)))
  err, out = checked(x, BASES)
  assert err.get() is not None and "features contain NaN or inf" in err.get()
  with pytest.raises(checkify.JaxRuntimeError, match="features"):
    err.throw()
  err, out = checked(x.at[1, 4].set(1.0), BASES)
  assert err.get() is None
  np.testing.assert_allclose(out[0], logits[0])
  err, _ = checked(x.at[1, 4].set(jnp.inf), BASES)
  assert err.get() is not None
  err, _ = checked(x.at[1, 4].set(1.0), BASES.at[0, 0, 0].set(jnp.nan))
  assert "bases" in err.get()
  # Without check=True, no check is added.
  err, _ = jax.jit(checkify.checkify(projection_logits))(x, BASES)
  assert err.get() is None


def test_shape_errors_name_the_shapes():
  with pytest.raises(ValueError, match=r"\(4, 15\).*\(6, 16, 4\)"):
    projection_logits(jnp.ones((4, 15)), BASES)
  with pytest.raises(ValueError, match=r"\(16, 4\)"):
    projection_logits(jnp.ones((4, 16)), BASES[0])


# --- GrassmannHead -----------------------------------------------------------------


def test_grassmann_head_param_and_registry():
  assert heads.HEADS["grassmann"] is GrassmannHead
  head = heads.make_head("grassmann", C, subspace_dim=K, scale=10.0, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(2), (3, N)).astype(jnp.bfloat16)
  variables = head.init(jax.random.key(3), x)
  assert set(variables["params"]) == {"bases"}
  bases = variables["params"]["bases"]
  assert bases.shape == (C, N, K) and bases.dtype == jnp.float32
  assert float(G.orthonormality_error(bases)) <= 1e-5
  logits = head.apply(variables, x)
  assert logits.shape == (3, C) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, projection_logits(x, bases, 10.0), rtol=1e-6)
  other = head.init(jax.random.key(4), x)["params"]["bases"]
  assert float(G.principal_angles(bases, other).max()) > 0.1


@pytest.mark.parametrize("k", [0, -1, N + 1])
def test_grassmann_head_rejects_bad_subspace_dim(k):
  with pytest.raises(ValueError, match=f"subspace_dim={k}.*n = {N}"):
    GrassmannHead(C, subspace_dim=k).init(jax.random.key(0), jnp.ones((2, N)))


def test_grassmann_head_k_equals_n_gives_constant_logits():
  head = GrassmannHead(3, subspace_dim=N, scale=7.0)
  x = jax.random.normal(jax.random.key(5), (4, N))
  logits = head.apply(head.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(logits, 7.0, rtol=1e-5)


def test_grassmann_head_through_nnx_bridge():
  from flax import nnx
  linen_head = GrassmannHead(C, subspace_dim=K)
  x = jax.random.normal(jax.random.key(6), (3, N))
  model = nnx.bridge.ToNNX(linen_head, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, x)
  assert isinstance(model.bases, nnx.Param)
  bases = model.bases[...]
  assert bases.shape == (C, N, K) and bases.dtype == jnp.float32
  np.testing.assert_allclose(model(x), linen_head.apply({"params": {"bases": bases}}, x),
                             rtol=1e-6)
  grads = nnx.grad(lambda m: m(x).sum())(model)
  assert grads["bases"][...].shape == (C, N, K)


@pytest.fixture(scope="module")
def grassmann_resnet():
  model = create_model("resnet20", 10, head="grassmann", dtype=jnp.bfloat16,
                       head_kwargs={"subspace_dim": 4})
  x = jax.random.normal(jax.random.key(7), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(8), x)
  return model, variables, x


def test_grassmann_head_inside_create_model(grassmann_resnet):
  model, variables, x = grassmann_resnet
  bases = variables["params"]["head"]["bases"]
  assert bases.shape == (10, 64, 4) and bases.dtype == jnp.float32  # under bf16 compute
  logits, features = jax.jit(functools.partial(model.apply, return_features=True))(
      variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, projection_logits(features, bases), rtol=1e-5,
                             atol=1e-5)


def test_resnet_train_step_with_grassmann_optimizer(grassmann_resnet):
  model, variables, x = grassmann_resnet
  labels = jnp.arange(4)
  params = variables["params"]
  tx = optim.with_grassmann(optax.adamw(1e-3, weight_decay=0.05), optim.riemannian_sgd(0.1))

  @jax.jit
  def train_step(params, batch_stats, opt_state):
    def loss_fn(p):
      logits, state = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, state["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  new, _, _, loss = train_step(params, variables["batch_stats"], tx.init(params))
  assert np.isfinite(float(loss))
  bases = new["head"]["bases"]
  assert bases.dtype == jnp.float32 and float(G.orthonormality_error(bases)) <= 1e-5
  assert not np.allclose(bases, params["head"]["bases"])
  assert not np.allclose(new["stem_conv"]["kernel"], params["stem_conv"]["kernel"])


def test_checked_head_in_a_model_reports_nan_input(grassmann_resnet):
  model, variables, x = grassmann_resnet
  model = model.clone(head_kwargs={"subspace_dim": 4, "check": True})
  apply = jax.jit(checkify.checkify(model.apply))
  err, logits = apply(variables, x)
  assert err.get() is None and np.all(np.isfinite(logits))
  err, _ = apply(variables, x.at[0, 0, 0, 0].set(jnp.nan))
  assert err.get() is not None and "features contain NaN" in err.get()
