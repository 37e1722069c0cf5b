"""Feature-quality measures against brute-force float64 references."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from grassq import analysis, grassmann


def brute_force(features, labels):
  """Kornblith et al.'s definitions, summed pair by pair."""
  x = features / np.linalg.norm(features, axis=1, keepdims=True)
  classes = np.unique(labels)
  groups = [x[labels == c] for c in classes]
  dist = lambda a, b: 1.0 - a @ b.T
  within = np.mean([dist(g, g).mean() for g in groups])
  total = np.mean([dist(g, h).mean() for g in groups for h in groups])
  return within, 1.0 - within / total


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12), classes=st.integers(2, 6),
       spread=st.floats(0.05, 3.0))
def test_class_separation_matches_pairwise_definition(seed, n, classes, spread):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, n))
  labels = np.repeat(np.arange(classes), rng.integers(2, 9, size=classes))
  feats = centers[labels] + spread * rng.normal(size=(len(labels), n))
  got = analysis.class_separation(feats, labels)
  within, r2 = brute_force(feats, labels)
  assert got["variability"] == pytest.approx(within, abs=1e-10)
  assert got["r2"] == pytest.approx(r2, abs=1e-10)
  # scale of features does not matter (cosine distances)
  again = analysis.class_separation(feats * rng.uniform(0.1, 10, size=(len(feats), 1)), labels)
  assert again["r2"] == pytest.approx(got["r2"], abs=1e-9)


def test_tighter_classes_have_lower_variability_and_higher_r2():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 16))
  labels = np.repeat(np.arange(5), 40)
  noise = rng.normal(size=(200, 16))
  tight = analysis.class_separation(centers[labels] + 0.1 * noise, labels)
  loose = analysis.class_separation(centers[labels] + 1.0 * noise, labels)
  assert tight["variability"] < loose["variability"]
  assert tight["r2"] > loose["r2"]


def test_class_separation_bad_input():
  with pytest.raises(ValueError, match="two classes"):
    analysis.class_separation(np.ones((4, 3)) + np.arange(12).reshape(4, 3), np.zeros(4))
  with pytest.raises(ValueError, match="NaN"):
    analysis.class_separation(np.full((4, 3), np.nan), np.array([0, 0, 1, 1]))
  with pytest.raises(ValueError, match="labels"):
    analysis.class_separation(np.ones((4, 3)), np.array([0, 1]))


def test_pairwise_principal_angles_against_numpy():
  import jax
  bases = np.asarray(grassmann.random_bases(jax.random.key(3), 5, 10, 3))
  got = analysis.pairwise_principal_angles(bases)
  assert got.shape == (10, 3)
  i, j = np.triu_indices(5, k=1)
  for p in range(10):
    s = np.linalg.svd(bases[i[p]].astype(np.float64).T @ bases[j[p]], compute_uv=False)
    np.testing.assert_allclose(got[p], np.sort(np.arccos(np.clip(s, 0, 1))), atol=1e-4)
  same = analysis.pairwise_principal_angles(np.stack([bases[0], bases[0]]))
  np.testing.assert_allclose(same, 0.0, atol=1e-3)


def test_linear_probe_separable_vs_random_labels():
  rng = np.random.default_rng(1)
  centers = 4 * rng.normal(size=(4, 8))
  ytr, yte = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
  xtr = centers[ytr] + rng.normal(size=(400, 8))
  xte = centers[yte] + rng.normal(size=(200, 8))
  assert analysis.linear_probe(xtr, ytr, xte, yte)["accuracy"] > 0.95
  shuffled = analysis.linear_probe(xtr, rng.permutation(ytr), xte, yte)["accuracy"]
  assert shuffled < 0.45  # chance is 0.25
  with pytest.raises(ValueError, match="do not match"):
    analysis.linear_probe(xtr, ytr, xte[:, :5], yte)
