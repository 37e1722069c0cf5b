"""Tests for grassq.grassmann: QR/CholeskyQR2, projection, retractions, angles."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from grassq import grassmann as G

SETTINGS = hypothesis.settings(max_examples=15, deadline=None)


def np_qf(a):
  """Independent reference: numpy QR with diag(R) >= 0."""
  q, r = np.linalg.qr(a)
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def gaussian(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_setup(seed, batch, n, k):
  """Random orthonormal bases and a random Euclidean direction."""
  bases = G.orthonormalize(gaussian(seed, (batch, n, k)))
  return bases, gaussian(seed + 1, (batch, n, k))


# A few shapes (each new shape costs compilations), fresh random values each example;
# they cover k = 1, k = n and 1 < k < n.
shapes = st.sampled_from([(1, 1, 1), (1, 5, 1), (3, 8, 3), (2, 6, 6), (4, 24, 5)])
seeds = st.integers(0, 2**31 - 1)


@SETTINGS
@hypothesis.given(shape=shapes, seed=seeds)
def test_orthonormalize_is_sign_fixed_qr_and_idempotent(shape, seed):
  a = gaussian(seed, shape)
  q = G.orthonormalize(a)
  assert q.shape == a.shape and q.dtype == jnp.float32
  assert float(G.orthonormality_error(q)) <= 1e-5
  # Same span: Q Q^T a = a, and R = Q^T a upper triangular with a positive diagonal.
  r = np.asarray(jnp.swapaxes(q, -1, -2) @ a)
  np.testing.assert_allclose(np.asarray(q) @ r, a, atol=1e-4)
  np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-4)
  assert np.all(np.diagonal(r, axis1=-2, axis2=-1) > 0)
  for i in range(shape[0]):
    np.testing.assert_allclose(q[i], np_qf(np.asarray(a[i], np.float64)), atol=1e-4)
  np.testing.assert_allclose(G.orthonormalize(q), q, atol=2e-6)  # idempotent


@SETTINGS
@hypothesis.given(shape=shapes, seed=seeds)
def test_cholesky_qr2_equals_orthonormalize(shape, seed):
  a = gaussian(seed, shape)
  hypothesis.assume(np.linalg.cond(np.asarray(a, np.float64)).max() < 100)
  q = G.cholesky_qr2(a)
  assert float(G.orthonormality_error(q)) <= 1e-5
  np.testing.assert_allclose(q, G.orthonormalize(a), atol=1e-4)


def test_cholesky_retraction_matches_householder_on_steps():
  bases, e = random_setup(0, 8, 64, 8)
  step = -0.3 * G.project_tangent(bases, e)
  np.testing.assert_allclose(G.retract_qr(bases, step, method="cholesky"),
                             G.retract_qr(bases, step), atol=1e-5)


@SETTINGS
@hypothesis.given(shape=shapes, seed=seeds)
def test_projection_is_horizontal_and_idempotent(shape, seed):
  bases, v = random_setup(seed, *shape)
  xi = G.project_tangent(bases, v)
  np.testing.assert_allclose(jnp.swapaxes(bases, -1, -2) @ xi, 0.0, atol=1e-5)
  np.testing.assert_allclose(G.project_tangent(bases, xi), xi, atol=1e-5)
  # The removed part is vertical: it lies in span(S).
  vertical = v - xi
  np.testing.assert_allclose(bases @ (jnp.swapaxes(bases, -1, -2) @ vertical), vertical,
                             atol=1e-4)


@pytest.mark.parametrize("retract", [G.retract_qr, G.retract_polar, G.exp_map,
                                     lambda s, t: G.retract_qr(s, t, method="cholesky")])
def test_retractions_orthonormal_zero_step_identity_and_vmappable(retract):
  bases, e = random_setup(1, 5, 16, 4)
  xi = G.project_tangent(bases, e)
  new = jax.jit(retract)(bases, -0.5 * xi)
  assert new.shape == bases.shape and float(G.orthonormality_error(new)) <= 1e-5
  np.testing.assert_allclose(retract(bases, jnp.zeros_like(bases)), bases, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(retract)(bases, -0.5 * xi), new, atol=1e-5)


def test_retractions_agree_to_first_order_and_subspaces_to_second():
  """Retractions vs the geodesic for a horizontal step t*xi (float64).

  With xi = U diag(sigma) V^T, span(S + t xi) = span(S V + t U diag(sigma)): in the
  plane (S v_j, u_j) QR/polar turn by arctan(t sigma_j), the geodesic by t sigma_j.
  So the principal angles between the retracted and the geodesic subspaces are
  exactly t sigma_j - arctan(t sigma_j) = (t sigma_j)^3 / 3 + O(t^5): QR (and polar,
  which spans the same subspace) is a second-order retraction on the Grassmannian,
  and subspaces (projectors) differ at O(t^3). The QR *basis* differs from the
  geodesic basis at O(t^2) (a rotation inside the subspace); the polar basis at O(t^3).
  """
  with jax.enable_x64(True):
    bases = G.random_bases(jax.random.key(3), 1, 12, 3, dtype=jnp.float64)[0]
    xi = G.project_tangent(bases, jax.random.normal(jax.random.key(4), bases.shape,
                                                     jnp.float64))
    xi = xi / jnp.linalg.norm(xi)
    sigma = np.linalg.svd(np.asarray(xi), compute_uv=False)
    ts = np.geomspace(1e-3, 1e-1, 7)
    proj, basis_qr, basis_polar = [], [], []
    for t in ts:
      q = np.asarray(G.retract_qr(bases, t * xi))
      p = np.asarray(G.retract_polar(bases, t * xi))
      e = np.asarray(G.exp_map(bases, t * xi))
      assert q.dtype == np.float64
      angles = np.asarray(G.principal_angles(q, e))
      np.testing.assert_allclose(angles, np.sort(t * sigma - np.arctan(t * sigma)),
                                 rtol=1e-3, atol=1e-15)
      np.testing.assert_allclose(q @ q.T, p @ p.T, atol=1e-13)  # same subspace
      np.testing.assert_allclose(q, bases + t * xi, atol=2 * t**2)  # first order
      proj.append(np.linalg.norm(q @ q.T - e @ e.T))
      basis_qr.append(np.linalg.norm(q - e))
      basis_polar.append(np.linalg.norm(p - e))
    slope = lambda y: np.polyfit(np.log(ts), np.log(y), 1)[0]
    assert abs(slope(proj) - 3.0) < 0.05, slope(proj)
    assert abs(slope(basis_qr) - 2.0) < 0.05, slope(basis_qr)
    assert abs(slope(basis_polar) - 3.0) < 0.05, slope(basis_polar)


def test_exp_map_follows_the_geodesic():
  """Along the geodesic exp_map(S, t xi) the principal angles to S are t * sigma(xi)."""
  with jax.enable_x64(True):
    bases, e = (x.astype(jnp.float64) for x in random_setup(5, 2, 10, 3))
    bases = G.orthonormalize(bases)
    xi = G.project_tangent(bases, e)
    xi = xi / jnp.linalg.norm(xi, axis=(-2, -1), keepdims=True)  # so 0.7 sigma < pi / 2
    full = G.exp_map(bases, 0.7 * xi)
    # Along a geodesic the angles to the start are t * sigma (while t sigma < pi/2).
    sigma = np.linalg.svd(np.asarray(xi), compute_uv=False)
    np.testing.assert_allclose(G.principal_angles(bases, full), np.sort(0.7 * sigma, -1),
                               atol=1e-10)


@SETTINGS
@hypothesis.given(shape=shapes, seed=seeds)
def test_principal_angles(shape, seed):
  a, _ = random_setup(seed, *shape)
  b, _ = random_setup(seed + 1, *shape)
  q = jnp.linalg.qr(gaussian(seed + 2, shape[:1] + shape[2:] * 2))[0]
  angles = np.asarray(G.principal_angles(a, b))
  assert angles.shape == shape[:1] + shape[2:]
  assert np.all(angles >= 0) and np.all(angles <= np.pi / 2 + 1e-6)
  assert np.all(np.diff(angles, axis=-1) >= -1e-6)
  np.testing.assert_allclose(G.principal_angles(a, a @ q), 0.0, atol=1e-3)
  np.testing.assert_allclose(G.principal_angles(b, a), angles, atol=1e-3)
  # Projector distance: ||P_a - P_b||_F^2 = 2 sum sin^2(theta).
  pa, pb = a @ jnp.swapaxes(a, -1, -2), b @ jnp.swapaxes(b, -1, -2)
  np.testing.assert_allclose(np.sum((pa - pb) ** 2, axis=(-2, -1)),
                             2 * np.sum(np.sin(angles) ** 2, -1), atol=1e-4)


def test_principal_angles_orthogonal_subspaces():
  eye = jnp.eye(6)
  np.testing.assert_allclose(G.principal_angles(eye[:, :2], eye[:, 2:5]),
                             [np.pi / 2] * 2, atol=1e-6)


def test_random_bases_uniform_and_dtype():
  bases = G.random_bases(jax.random.key(0), 2000, 3, 1)
  assert bases.shape == (2000, 3, 1) and bases.dtype == jnp.float32
  # A uniformly random line in R^3 has |cos angle to e_1| ~ U(0, 1).
  c = np.abs(np.asarray(bases[:, 0, 0]))
  assert abs(c.mean() - 0.5) < 0.03 and abs((c < 0.25).mean() - 0.25) < 0.04
  assert not np.allclose(G.random_bases(jax.random.key(1), 2, 5, 2),
                         G.random_bases(jax.random.key(2), 2, 5, 2))


def test_low_precision_computes_in_float32():
  a = jax.random.normal(jax.random.key(0), (3, 8, 2)).astype(jnp.bfloat16)
  q = G.orthonormalize(a)
  assert q.dtype == jnp.float32 and float(G.orthonormality_error(q)) <= 1e-5


def test_bad_shapes_rejected():
  with pytest.raises(ValueError, match=r"k=5 > n=3"):
    G.orthonormalize(jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r"k=5 > n=3"):
    G.cholesky_qr2(jnp.ones((2, 3, 5)))
  with pytest.raises(ValueError, match=r"k=0"):
    G.orthonormalize(jnp.ones((3, 0)))
  with pytest.raises(ValueError, match="shape"):
    G.orthonormalize(jnp.ones(3))
  with pytest.raises(ValueError, match="0 < k <= n"):
    G.random_bases(jax.random.key(0), 2, 3, 4)
  with pytest.raises(ValueError, match="0 < k <= n"):
    G.random_bases(jax.random.key(0), 2, 3, 0)
  with pytest.raises(ValueError, match="unknown QR method"):
    G.retract_qr(jnp.eye(3)[:, :1], jnp.zeros((3, 1)), method="givens")


def test_check_bases():
  good = G.random_bases(jax.random.key(0), 2, 6, 3)
  G.check_bases(good)
  with pytest.raises(ValueError, match="not orthonormal"):
    G.check_bases(good * 1.01)
  with pytest.raises(ValueError, match="non-finite"):
    G.check_bases(good.at[0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="0 < k <= n"):
    G.check_bases(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="0 < k <= n"):
    G.check_bases(jnp.ones((2, 3, 0)))
  with pytest.raises(ValueError, match=r"shape \(..., n, k\)"):
    G.check_bases(jnp.ones(4))
  # Traced values: shapes are still checked, values cannot be.
  jax.jit(lambda s: G.check_bases(s) or s)(good * 2)
  with pytest.raises(ValueError, match="0 < k <= n"):
    jax.jit(lambda s: G.check_bases(s) or s)(jnp.ones((3, 4)))


def _dot_precisions(fn, *args):
  """The precision config of every dot_general in fn's jaxpr (sub-jaxprs included)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("name", ["retract_qr_cholesky", "retract_polar", "exp_map",
                                  "project_tangent", "principal_angles",
                                  "orthonormality_error"])
def test_matmuls_ask_for_full_float32_precision(name):
  """On tensor-core GPUs JAX's default float32 matmul is TF32; there CholeskyQR2 left bases 9e-4
  from orthonormal (measured on an H200). Every product must ask for HIGHEST, even when the
  user's default says otherwise."""
  rng = np.random.default_rng()
  s = G.orthonormalize(rng.normal(size=(3, 12, 4)).astype(np.float32))
  t = 0.1 * G.project_tangent(s, rng.normal(size=s.shape).astype(np.float32))
  fn, args = {
      "retract_qr_cholesky": (lambda s, t: G.retract_qr(s, t, method="cholesky"), (s, t)),
      "retract_polar": (G.retract_polar, (s, t)),
      "exp_map": (G.exp_map, (s, t)),
      "project_tangent": (G.project_tangent, (s, t)),
      "principal_angles": (G.principal_angles, (s, s + t)),
      "orthonormality_error": (G.orthonormality_error, (s,)),
  }[name]
  with jax.default_matmul_precision("bfloat16"):
    precisions = _dot_precisions(fn, *args)
  assert precisions, "no matrix product found"
  for p in precisions:
    assert p == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST), p


def test_qr_retraction_picks_its_method_per_platform():
  """retract_qr's default: Householder (LAPACK geqrf) when compiled for a CPU, CholeskyQR2 (no
  QR kernel) for GPUs and TPUs; on this CPU it equals the Householder retraction bit for bit."""
  import re

  from jax import export

  rng = np.random.default_rng()
  s = G.orthonormalize(rng.normal(size=(4, 16, 3)).astype(np.float32))
  t = 0.1 * G.project_tangent(s, rng.normal(size=s.shape).astype(np.float32))
  np.testing.assert_array_equal(G.retract_qr(s, t), G.retract_qr(s, t, method="householder"))

  def kernels(platform):
    text = export.export(jax.jit(G.retract_qr), platforms=[platform])(s, t).mlir_module()
    return " ".join(re.findall(r"custom_call @\w+|stablehlo\.cholesky", text))

  assert "geqrf" in kernels("cpu") and "potrf" not in kernels("cpu")
  assert "geqrf" not in kernels("cuda") and "potrf" in kernels("cuda")
  assert "geqrf" not in kernels("tpu") and "cholesky" in kernels("tpu")
  with pytest.raises(ValueError, match="auto, householder, cholesky"):
    G.retract_qr(s, t, method="givens")
