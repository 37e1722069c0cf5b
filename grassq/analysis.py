"""Feature-quality measures used by the GCR paper: variability, class separation, transfer.

All measures take features as numpy arrays and compute in float64 on the host; they are
evaluation tools, not training code. Definitions follow Kornblith et al. (2021), "Why do better
loss functions lead to less transferable features?", as the GCR paper does:

* cosine distance d(x, y) = 1 − x·y / (‖x‖‖y‖);
* intra-class variability = mean over classes of the mean within-class cosine distance
  (over all ordered pairs, self-pairs included) = 1 − mean_k ‖μ_k‖², with μ_k the mean of the
  unit-normalised features of class k;
* class separation R² = 1 − d̄_within / d̄_total, d̄_total the mean cosine distance over all pairs of
  classes = 1 − ‖mean_k μ_k‖². Higher R² = classes further apart relative to their spread.
"""

from __future__ import annotations

import numpy as np


def _unit_rows(features) -> np.ndarray:
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be (N, n), got shape {x.shape}")
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf")
  return x / np.maximum(norms, 1e-12)


def _class_means(features, labels):
  x = _unit_rows(features)
  labels = np.asarray(labels)
  if labels.shape != (len(x),):
    raise ValueError(f"labels must be ({len(x)},), got {labels.shape}")
  classes = np.unique(labels)
  if len(classes) < 2:
    raise ValueError("need at least two classes")
  return np.stack([x[labels == c].mean(0) for c in classes])


def class_separation(features, labels) -> dict:
  """{'variability': mean within-class cosine distance, 'r2': class separation R²}."""
  mu = _class_means(features, labels)
  within = 1.0 - np.mean(np.sum(mu * mu, axis=1))
  total = 1.0 - float(np.sum(mu.mean(0) ** 2))
  return {"variability": float(within), "r2": float(1.0 - within / total)}


def pairwise_principal_angles(bases) -> np.ndarray:
  """Principal angles (radians) between every pair of class subspaces: (C(C−1)/2, k)."""
  from grassq import grassmann

  bases = np.asarray(bases, np.float32)
  if bases.ndim != 3:
    raise ValueError(f"bases must be (C, n, k), got shape {bases.shape}")
  i, j = np.triu_indices(len(bases), k=1)
  return np.asarray(grassmann.principal_angles(bases[i], bases[j]))


def linear_probe(train_features, train_labels, test_features, test_labels,
                 regularization=(1e-2, 1e-1, 1.0, 10.0, 100.0), seed: int = 0) -> dict:
  """Transfer accuracy of an L2-regularised multinomial logistic regression on frozen features.

  The inverse regularisation strength C is chosen on a held-out 20% of the training features,
  then the probe is refitted on all of them. Features are standardised with the training
  statistics. Returns {'accuracy', 'C'}.
  """
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import train_test_split
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  xtr, ytr = np.asarray(train_features, np.float64), np.asarray(train_labels)
  xte, yte = np.asarray(test_features, np.float64), np.asarray(test_labels)
  if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
    raise ValueError(f"feature shapes {xtr.shape} and {xte.shape} do not match")

  def fit(c, x, y):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)

  xa, xv, ya, yv = train_test_split(xtr, ytr, test_size=0.2, random_state=seed, stratify=ytr)
  best = max(regularization, key=lambda c: fit(c, xa, ya).score(xv, yv))
  return {"accuracy": float(fit(best, xtr, ytr).score(xte, yte)), "C": float(best)}
